"""Training throughput: steps/s of train.py's step per arch preset x precision, the loader's share, workers x threads.

    python benchmarks/bench_train.py --data-dir <chips>                                  # b0, light; 10 steps each
    python benchmarks/bench_train.py --data-dir <chips> --steps 3 --size 256 --batch 8    # quick, the Kampala run's shape

Every figure times `lib.trainer.train_step` (forward, losses, backward, optimiser) of the segmentation task:
- model: one batch kept on the device -- the compute ceiling of the preset and precision;
- pipeline: batches from the task's real DataLoader (chips, augmentations, `--workers` workers). The loader's
  share is 1 - model / pipeline step time: what loading costs, by making the step wait or by taking the cores
  (on a 2-core CPU the workers compete with the model's threads); "wait" is the part spent waiting.
Ratios are against the first preset (b0) in fp32, measured in the same run. bf16 runs on CUDA and on CPUs
with native bf16 kernels (AVX512-BF16 / AMX); elsewhere it is emulated and far slower, so it is skipped.
Then, for the fastest preset and precision, the pipeline is timed for num_workers 0/1/2 x torch threads 1/2
(on CPU): the figures behind train.yaml's num_workers default. Last, the first preset's pipeline without
and with the decoded-chip cache (chip_cache_mb); then the first preset's model-only step in NCHW against the
default memory format (channels_last=auto); with `--compile`, that preset at its fastest precision under
torch.compile against eager. Precisions are explicit here, so no precision=auto trial runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from kampala_holdout import cpu_name

import train
from lib import trainer
from lib.cli import compose_config
from lib.devices import cpu_has_native_bf16, loader_workers, resolve_device


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def session(args, preset: str, precision: str, workers: int, threads: int | None, extra: tuple[str, ...] = (),
            warmup: int | None = None):
    steps = 2 * ((args.warmup if warmup is None else warmup) + args.steps) + 2  # the one-cycle schedule's length
    overrides = [*extra, f"arch={preset}", "pretrained=false", f"width={args.size}", f"batch_size={args.batch}",
                 f"num_workers={workers}", f"precision={precision}", f"max_steps={steps}",
                 "progress=false", f"device={args.device}", "output_dir=outputs/bench_train", "num_folds=2"]
    if args.data_dir:
        overrides.append(f"data_dir={args.data_dir}")
    if threads:
        overrides.append(f"threads={threads}")
    return train.prepare(compose_config("train", overrides))


def measure(s, steps: int, warmup: int, fixed=None) -> tuple[float, float]:
    """Seconds per step and seconds per step spent waiting for data (0 for a fixed on-device batch).

    A fixed batch gives the median step (the compute ceiling, robust to a busy moment on the machine); the
    loader gives the mean (waits come in bursts once the prefetched batches are used up).
    """
    it = s.task.train_batches(s) if fixed is None else None
    total = wait = 0.0
    times = []
    for i in range(warmup + steps):
        sync(s.device)
        t0 = time.perf_counter()
        batch = fixed if fixed is not None else next(it)
        sync(s.device)
        t1 = time.perf_counter()
        trainer.train_step(s, batch)
        sync(s.device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            total, wait = total + times[-1], wait + t1 - t0
    return (total / steps if fixed is None else statistics.median(times)), wait / steps


def precisions(device: torch.device, asked: list[str]) -> list[str]:
    """The asked precisions that run natively here (fp16 only on CUDA, bf16 where the hardware has it)."""
    native = {"fp32": True, "fp16": device.type == "cuda",
              "bf16": torch.cuda.is_bf16_supported() if device.type == "cuda" else
              device.type == "cpu" and cpu_has_native_bf16()}
    return [p for p in asked if native.get(p)]


def preset_rows(args, device) -> list[dict]:
    rows, base = [], None
    for preset in args.presets.split(","):
        for p in precisions(device, args.precision.split(",")):
            s = session(args, preset, p, args.workers, args.threads)
            batch = next(s.task.train_batches(s))
            model_s, _ = measure(s, args.steps, args.warmup, batch)
            pipe_s, wait_s = measure(s, args.steps, args.warmup)
            row = {"preset": preset, "precision": p, "model_steps_s": 1 / model_s, "pipeline_steps_s": 1 / pipe_s,
                   "loader_share": max(0.0, 1 - model_s / pipe_s), "data_wait_share": wait_s / pipe_s}
            base = base or row
            row["model_vs_b0_fp32"] = row["model_steps_s"] / base["model_steps_s"]
            row["pipeline_vs_b0_fp32"] = row["pipeline_steps_s"] / base["pipeline_steps_s"]
            rows.append(row)
            print_row(args, row)
    return rows


def loader_grid(args, best: dict, device) -> list[dict]:
    """Pipeline steps/s of the fastest preset x precision for num_workers 0/1/2 x torch threads 1/2."""
    rows = []
    for workers in (0, 1, 2):
        for threads in ((1, 2) if device.type == "cpu" else (None,)):
            s = session(args, best["preset"], best["precision"], workers, threads)
            pipe_s, wait_s = measure(s, args.steps, args.warmup)
            rows.append({"workers": workers, "threads": threads, "pipeline_steps_s": 1 / pipe_s,
                         "data_wait_share": wait_s / pipe_s})
            r = rows[-1]
            print(f"  workers {workers}  threads {threads}  {r['pipeline_steps_s']:6.3f} steps/s "
                  f"{args.batch * r['pipeline_steps_s']:6.2f} img/s  data wait {100 * r['data_wait_share']:5.1f}%",
                  flush=True)
            del s
    return rows


def cache_rows(args, device) -> list[dict]:
    """Pipeline steps/s of the first preset at its fastest precision without and with the decoded-chip cache
    (train.yaml's chip_cache_mb), alternated twice; the cached runs are measured after `--cache-warmup` steps,
    by when each worker has decoded most chips once, as a run of a few hundred steps is for nearly all of it."""
    preset, budget = args.presets.split(",")[0], float(compose_config("train").chip_cache_mb)
    precision = precisions(device, args.precision.split(","))[-1]
    warm = max(args.warmup, args.cache_warmup)
    print(f"decoded-chip cache: {preset} {precision}, pipeline after {warm} steps, chip_cache_mb 0 vs {budget:g}",
          flush=True)
    rows = []
    for _ in range(2):
        for mb in (0, budget):
            s = session(args, preset, precision, args.workers, args.threads, (f"chip_cache_mb={mb:g}",), warm)
            pipe_s, wait_s = measure(s, args.steps, warm)
            rows.append({"chip_cache_mb": mb, "pipeline_steps_s": 1 / pipe_s, "data_wait_share": wait_s / pipe_s})
            print(f"  chip_cache_mb {mb:>5g}  {1 / pipe_s:6.3f} steps/s  data wait {100 * wait_s / pipe_s:5.1f}%",
                  flush=True)
            del s
    speed = {mb: statistics.median(r["pipeline_steps_s"] for r in rows if r["chip_cache_mb"] == mb) for mb in (0, budget)}
    print(f"  cache vs none: {speed[budget] / speed[0]:.2f}x (medians)", flush=True)
    return rows


def compile_row(args, device, rows: list[dict]) -> dict:
    """Model-only steps/s of the first preset at its fastest precision with compile=true (torch.compile),
    against the same preset and precision eager (from `rows`); the first step, which compiles, timed apart."""
    preset = args.presets.split(",")[0]
    eager = max((r for r in rows if r["preset"] == preset), key=lambda r: r["model_steps_s"])
    s = session(args, preset, eager["precision"], args.workers, args.threads, ("compile=true",))
    batch = next(s.task.train_batches(s))
    sync(s.device)
    start = time.perf_counter()
    trainer.train_step(s, batch)  # compiles forward and backward
    sync(s.device)
    compile_s = time.perf_counter() - start
    model_s, _ = measure(s, args.steps, args.warmup, batch)
    row = {"preset": preset, "precision": eager["precision"], "compiled_steps_s": 1 / model_s,
           "eager_steps_s": eager["model_steps_s"], "compile_s": compile_s}
    print(f"torch.compile: {preset} {eager['precision']}, model-only {row['compiled_steps_s']:.3f} steps/s against "
          f"{row['eager_steps_s']:.3f} eager -> {row['compiled_steps_s'] / row['eager_steps_s']:.2f}x "
          f"(first step, compiling: {compile_s:.1f} s)", flush=True)
    return row


def format_rows(args, device) -> list[dict]:
    """Model-only steps/s of the first preset at each native precision with NCHW (channels_last=false)
    and with the default memory format (channels_last=auto: NHWC on CPU and CUDA), alternated twice."""
    preset, rows = args.presets.split(",")[0], []
    print(f"memory format: {preset}, model-only, channels_last=false vs auto (the default)", flush=True)
    for p in precisions(device, args.precision.split(",")):
        for _ in range(2):
            for flag in ("false", "auto"):
                s = session(args, preset, p, args.workers, args.threads, (f"channels_last={flag}",))
                model_s, _ = measure(s, args.steps, args.warmup, next(s.task.train_batches(s)))
                rows.append({"precision": p, "channels_last": flag, "model_steps_s": 1 / model_s})
                del s
        speed = {f: statistics.median(r["model_steps_s"] for r in rows if r["precision"] == p and r["channels_last"] == f)
                 for f in ("false", "auto")}
        print(f"  {p:>5}  NCHW {speed['false']:6.3f} steps/s  default {speed['auto']:6.3f} steps/s  "
              f"-> {speed['auto'] / speed['false']:.2f}x (medians of two)", flush=True)
    return rows


def print_row(args, r: dict) -> None:
    print(f"{r['preset']:>7} {r['precision']:>5} {r['model_steps_s']:8.3f} {args.batch * r['model_steps_s']:8.2f} "
          f"{r['pipeline_steps_s']:8.3f} {args.batch * r['pipeline_steps_s']:8.2f} {100 * r['loader_share']:6.1f}% "
          f"{100 * r['data_wait_share']:5.1f}% "
          f"{r['model_vs_b0_fp32']:7.2f}x {r['pipeline_vs_b0_fp32']:7.2f}x", flush=True)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="b0,light", help="arch presets (config/arch/), the first is the baseline")
    parser.add_argument("--precision", default="fp32,bf16,fp16", help="comma-separated; non-native ones are skipped")
    parser.add_argument("--size", type=int, default=256, help="training crop (width) in pixels")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before each measurement")
    parser.add_argument("--workers", type=int, default=None,
                        help="DataLoader workers (default: train.yaml's, auto resolved for the device)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data-dir", default=None, help="training chips (default: the built-in demo chips)")
    parser.add_argument("--no-grid", action="store_true", help="skip the workers x threads measurement")
    parser.add_argument("--cache-warmup", type=int, default=24, help="untimed steps before the chip-cache measurement")
    parser.add_argument("--no-cache", action="store_true", help="skip the decoded-chip cache measurement")
    parser.add_argument("--no-format", action="store_true", help="skip the memory-format measurement")
    parser.add_argument("--compile", action="store_true",
                        help="also the first preset at its fastest precision under torch.compile (compile=true)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message="all .* chips come from one scene")  # expected on one-scene chips
    device = resolve_device(args.device)
    if args.workers is None:
        args.workers = loader_workers(compose_config("train").num_workers, device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(f"train step, {args.size}x{args.size}, batch {args.batch}, {args.steps} steps after {args.warmup}; "
          f"device {device} ({where}); torch {torch.__version__}, {torch.get_num_threads()} threads; native bf16: "
          f"{cpu_has_native_bf16() if device.type == 'cpu' else device.type == 'cuda'}")
    base = f"vs {args.presets.split(',')[0]} fp32"
    print(f"{'preset':>7} {'prec':>5} {'model':>8} {'img/s':>8} {'pipeline':>8} {'img/s':>8} {'loader':>7} {'wait':>6} "
          f"{'model':>8} {'pipeline':>8}\n{'':>7} {'':>5} {'steps/s':>8} {'':>8} {'steps/s':>8} {'':>8} {'share':>7} "
          f"{'':>6} {base:>17}   ({args.workers} workers)", flush=True)
    rows = preset_rows(args, device)
    grid = []
    if not args.no_grid:
        best = max(rows, key=lambda r: r["model_steps_s"])
        print(f"loader: {best['preset']} {best['precision']}, pipeline for num_workers x torch threads", flush=True)
        grid = loader_grid(args, best, device)
    cache = [] if args.no_cache else cache_rows(args, device)
    formats = [] if args.no_format else format_rows(args, device)
    compiled = compile_row(args, device, rows) if args.compile else None
    result = {"args": vars(args), "device": str(device), "name": where, "presets": rows, "loader": grid,
              "chip_cache": cache, "memory_format": formats, "compile": compiled}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

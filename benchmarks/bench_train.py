"""Training throughput: images/s of train.py's step for fp32 vs mixed precision, and the data-loading share.

    python benchmarks/bench_train.py                                   # b1, 512 px, batch 8, on the GPU if any
    python benchmarks/bench_train.py --steps 3 --size 256 --batch 2 --threads 2      # a quick CPU run

For each precision it times `lib.trainer.train_step` (forward, losses, backward, optimiser) twice:
- model only: one batch kept on the device, so the figure is the compute ceiling;
- pipeline: batches from the segmentation task's real DataLoader (chips, augmentations, workers, pinned memory),
  measuring how long each step waits for its batch. The share of step time spent waiting is what the
  loader costs; near 0 % means it never starves the device.
The ratio printed is each precision's model-only images/s over fp32's, measured in the same process.
fp16 and bf16 run on CUDA; on CPU bf16 runs only where the CPU has native bf16 kernels (AMX / AVX-512 BF16;
elsewhere it is emulated and ~25x slower than fp32, see --force-bf16), fp16 is skipped.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import train
from lib import trainer
from lib.cli import compose_config
from lib.devices import resolve_device


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def session(args, precision: str):
    overrides = [f"model_name=efficientnet-{args.model}", "pretrained=false", f"width={args.size}",
                 f"batch_size={args.batch}", f"num_workers={args.workers}", f"precision={precision}",
                 f"max_steps={2 * (args.warmup + args.steps) + 2}", "progress=false", f"device={args.device}",
                 "output_dir=outputs/bench_train", f"augment={args.augment}", "num_folds=2"]
    if args.data_dir:
        overrides.append(f"data_dir={args.data_dir}")
    if args.threads:
        overrides.append(f"threads={args.threads}")
    return train.prepare(compose_config("train", overrides))


def measure(s, steps: int, warmup: int, fixed: tuple | None):
    """Seconds per step and seconds per step spent waiting for data (0 for a fixed on-device batch)."""
    it = s.task.train_batches(s) if fixed is None else None
    total = wait = 0.0
    for i in range(warmup + steps):
        sync(s.device)
        t0 = time.perf_counter()
        batch = fixed if fixed is not None else next(it)
        sync(s.device)
        t1 = time.perf_counter()
        trainer.train_step(s, batch)
        sync(s.device)
        t2 = time.perf_counter()
        if i >= warmup:
            total += t2 - t0
            wait += t1 - t0
    return total / steps, wait / steps


def cpu_bf16() -> bool:
    """Whether this CPU has native bf16 kernels (AMX / AVX-512 BF16); without them bf16 is emulated, ~25x slower."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def precisions(device: torch.device, asked: list[str], force: bool = False) -> list[str]:
    out = []
    for p in asked:
        if p == "fp16" and device.type != "cuda":
            continue
        if p == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            continue
        if p == "bf16" and device.type == "cpu" and not (force or cpu_bf16()):
            print("skipping bf16: this CPU has no native bf16 kernels (use --force-bf16 to time it anyway)")
            continue
        out.append(p)
    return out


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="b1", help="EfficientNet size: b0..b7")
    parser.add_argument("--size", type=int, default=512, help="training crop (width) in pixels")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before each measurement")
    parser.add_argument("--workers", type=int, default=4, help="DataLoader workers")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--precision", default="fp32,bf16,fp16", help="comma-separated; unavailable ones are skipped")
    parser.add_argument("--force-bf16", action="store_true", help="time bf16 even on CPUs without native bf16")
    parser.add_argument("--augment", default="seed", choices=["seed", "light"])
    parser.add_argument("--data-dir", default=None, help="training chips (default: the built-in demo chips)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    results = []
    base = None
    device = resolve_device(args.device)
    for p in precisions(device, ["fp32", *[q for q in args.precision.split(",") if q != "fp32"]], args.force_bf16):
        s = session(args, p)
        batch = next(s.task.train_batches(s))
        model_step, _ = measure(s, args.steps, args.warmup, batch)
        pipe_step, pipe_wait = measure(s, args.steps, args.warmup, None)
        row = {"precision": p, "model_img_s": args.batch / model_step, "pipeline_img_s": args.batch / pipe_step,
               "data_wait_share": pipe_wait / pipe_step}
        base = base or row["model_img_s"]
        row["speedup_vs_fp32"] = row["model_img_s"] / base
        results.append(row)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"train step, efficientnet-{args.model} FPN, {args.size}x{args.size}, batch {args.batch}, "
          f"{args.workers} workers, device {device} ({name}), torch threads {torch.get_num_threads()}")
    print(f"{'precision':>9} {'model img/s':>12} {'pipeline img/s':>15} {'data wait':>10} {'vs fp32':>8}")
    for r in results:
        print(f"{r['precision']:>9} {r['model_img_s']:12.2f} {r['pipeline_img_s']:15.2f} "
              f"{100 * r['data_wait_share']:9.1f}% {r['speedup_vs_fp32']:7.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "device": str(device), "name": name,
                                               "results": results}, indent=2))
    return results


if __name__ == "__main__":
    main()

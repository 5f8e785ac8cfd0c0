"""Inference benchmark: inference.py's defaults and each backend against the seed's loop; pipeline vs
model-only; precision; memory.

    python benchmarks/bench_inference.py                          # full: 16 tiles of 1024 px, b0 at 672
    python benchmarks/bench_inference.py --tiles 4 --size 512 --width 320 --skip memory   # quick

Figures printed (each against a baseline measured in the same run, same model and tiles):
1. 5-way TTA (none, hflip, vflip, hvflip, transpose) over generated tiles with one b0 model (random
   weights, pretrained=False; `--model` takes a trained checkpoint instead). The baseline is the seed's loop, emulated in this process: one run per TTA
   with batch 1 in fp32, each run loading the model, re-reading and resizing every image and writing its
   maps, then averaging the five runs' maps (no process start-up: that flatters the baseline). Against it,
   `python inference.py` as a user runs it, each a fresh process, resizing as the seed does (width /
   tile_size: `match_gsd=false`, else a trained checkpoint's GSD would change the model's input size): the defaults (backend=auto,
   precision=auto) with an empty cache, so the one-off backend trial and ONNX export are inside its time
   (and printed apart), the defaults again with the trial cached, and every backend/precision this machine
   offers forced. Wall and CPU time are both shown: on a shared machine CPU time is the steadier one.
2. Model-only throughput (the engine's own model call on the same batches of TTA inputs, with the backend
   and precision the defaults chose, no I/O) against the whole pipeline's, in a fresh process. Then the
   pipeline without the model (its outputs replayed): CPU per image, by stage (benchmarks/stage_clock.py),
   and the images/s its serial stages (one finishing thread, the GDAL lock) allow where cores are to spare,
   against model-only images/s: on an accelerator's host, whether the pipeline can keep up.
3. Precision: fp32 (NCHW), fp32 channels_last, bf16 autocast + channels_last: forward time and how many
   mask pixels agree with fp32. On CPUs without native bf16 (no AMX / AVX512-BF16) bf16 is emulated
   and measured at a small size only. `--compile` adds the fastest channels_last row under torch.compile (the
   compile time printed apart): whether compiling pays on this machine.
4. Peak resident memory of `inference.py` on a 2048^2 and an 8192^2 scene (separate processes). A
   2048-px scene at tile 1024 has only 3 windows a row to batch, so with a larger batch part of the
   difference is the model's memory at a larger batch; benchmarks/bench_memory.py compares a square
   scene with a 1024 x 65536 one at a batch both fill.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import cv2
import numpy as np
import rasterio
import torch
import torch.nn.functional as F
from stage_clock import StageClock

import model as M
from lib.backend_trial import describe
from lib.checkpoints import save_checkpoint
from lib.cli import compose_config
from lib.devices import cpu_has_native_bf16, finishing_threads
from lib.tta import tta_forward, tta_inverse

TTA = ["none", "hflip", "vflip", "hvflip", "transpose"]


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------

def make_tiles(folder: Path, n: int, size: int) -> list[Path]:
    """Demo-style drone tiles (roofs, roads, ground texture) as RGBA GeoTIFFs, like the test tiles."""
    from lib import demo_scene

    paths = []
    for i in range(n):
        scene = demo_scene.generate_scene(1000 + i, size=(size, size), detail=False, nodata_corner=False)
        p = folder / f"tile_{i:02d}.tif"
        demo_scene.write_scene(scene, p, folder.parent / "labels" / f"tile_{i:02d}.geojson")
        paths.append(p)
    return paths


def make_big_scene(path: Path, size: int, block: int = 1024) -> Path:
    """A size^2 RGBA GeoTIFF written block by block (repeating one generated block): no big array in memory."""
    from lib.demo_scene import write_repeated_scene

    return write_repeated_scene(path, size, size, block)


# ----------------------------------------------------------------------------------------------
# The two ways
# ----------------------------------------------------------------------------------------------

def ours(tiles_dir: Path, ckpt: Path, out: Path, args, cache: Path, extra: tuple[str, ...] = ()) -> dict:
    """`python inference.py` as a user runs it (a fresh process: start-up and imports included), with the
    run's defaults except the tiling and TTA of the comparison; `cache` is its BUILDINGS_CACHE (exports and
    backend trials). Wall and CPU seconds of the process, and its run.json's backend trial."""
    cmd = [sys.executable, "inference.py", f"data_dir={tiles_dir}", f"model={ckpt}", f"output_dir={out}",
           f"tile_size={args.size}", f"width={args.width}", f"tta=[{','.join(TTA)}]", "progress=false",
           f"device={args.device}", f"num_threads={args.threads}", "match_gsd=false", *extra]
    env = {**os.environ, "BUILDINGS_CACHE": str(cache)}
    start, before = time.perf_counter(), os.times()
    res = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True)
    wall, after = time.perf_counter() - start, os.times()
    if res.returncode:
        raise SystemExit(f"inference.py failed: {res.stderr.strip().splitlines()[-1:]}")
    run = json.loads((out / "run.json").read_text())
    image = next(iter(run["images"].values()))
    return {"wall": wall, "cpu": (after.children_user - before.children_user) + (after.children_system
                                                                               - before.children_system),
            "trial": run.get("backend_trial"), "backend": image.get("backend") or run.get("backend"),
            "precision": image.get("precision")}


def tta_runs(work: Path, ckpt: Path, tiles: list[Path], args, device) -> dict:
    """The seed loop, inference.py's defaults with a cold and a warm cache, and each backend forced."""
    from lib.backend_trial import candidates

    images = work / "tiles" / "images"
    forced = [] if "backends" in args.skip else [
        (f"backend={c.backend} precision={c.precision}", (f"backend={c.backend}", f"precision={c.precision}"))
        for c in candidates(device)]
    runs: dict[str, list] = {}
    for r in range(args.repeats):  # alternate, so load from other processes hits every way alike
        if device.type == "cpu":
            wall, cpu = original_way(tiles, ckpt, work / f"original{r}", args.width)
            runs.setdefault("seed loop", []).append({"wall": wall, "cpu": cpu})
        cold = work / f"cache{r}"
        shutil.rmtree(cold, ignore_errors=True)
        runs.setdefault("defaults, cold cache", []).append(ours(images, ckpt, work / f"cold{r}", args, cold))
        runs.setdefault("defaults, warm cache", []).append(ours(images, ckpt, work / f"warm{r}", args, cold))
        fp32 = "defaults, precision=fp32 (fp32 paths only)"  # the fp32 candidates
        ours(images, ckpt, work / f"fp32trial{r}", args, cold, ("precision=fp32",))  # its own trial, cached
        runs.setdefault(fp32, []).append(ours(images, ckpt, work / f"fp32{r}", args, cold, ("precision=fp32",)))
        for i, (label, extra) in enumerate(forced):
            runs.setdefault(label, []).append(ours(images, ckpt, work / f"forced{r}_{i}", args, cold, extra))
    return {k: min(v, key=lambda x: x["wall"]) for k, v in runs.items()}


def original_way(tiles: list[Path], ckpt: Path, out: Path, width: int, threshold: float = 0.5) -> float:
    """One run per TTA (model loaded each run), batch 1, re-read + resize each image, write maps; then average.

    The network computes as the seed's code does: its ASPP concatenates the branches (lib.decoder_blocks.ASPP,
    which does not, is part of what is measured against it: the emulation took 66.9 s with it against 80.6 s without, capped)."""
    from lib.decoder_blocks import ASPP

    start, cpu = time.perf_counter(), time.process_time()
    for name in TTA:
        run_dir = out / name
        run_dir.mkdir(parents=True, exist_ok=True)
        net = M.load_model(ckpt)
        for aspp in (m for m in net.modules() if isinstance(m, ASPP)):
            aspp.forward = aspp.concatenated
        for path in tiles:
            with rasterio.open(path) as ds:
                rgb = np.moveaxis(ds.read([1, 2, 3]), 0, -1)
            h, w = rgb.shape[:2]
            x = cv2.resize(rgb, (width, width), interpolation=cv2.INTER_LINEAR)
            t = M.normalize(torch.from_numpy(x).permute(2, 0, 1)[None])
            t = tta_forward(t, name).contiguous()
            with torch.no_grad():
                seg = net(t)[M.SEG]
            prob = tta_inverse(torch.softmax(seg, 1)[:, 1:2], name)
            prob = F.interpolate(prob, size=(h, w), mode="bilinear", align_corners=False)[0, 0]
            cv2.imwrite(str(run_dir / f"{path.stem}.png"), (prob * 255).round().byte().numpy())
    for path in tiles:  # the original combine step: average the runs' maps, threshold, write masks
        maps = [cv2.imread(str(out / name / f"{path.stem}.png"), cv2.IMREAD_GRAYSCALE).astype(np.float32)
                for name in TTA]
        mean = np.mean(maps, 0) / 255.0
        (out / "ensemble").mkdir(exist_ok=True)
        cv2.imwrite(str(out / "ensemble" / f"{path.stem}.png"), np.where(mean >= threshold, 255, 0).astype(np.uint8))
        cv2.imwrite(str(out / "ensemble" / f"{path.stem}_prob.png"), np.round(mean * 255).astype(np.uint8))
    return time.perf_counter() - start, time.process_time() - cpu


# ----------------------------------------------------------------------------------------------
# Model-only and precision

def pipeline_vs_model(ckpt: Path, tiles: list[Path], out: Path, args, device) -> tuple[list, str]:
    """Inputs/s of the whole per-image pipeline (read, resize, TTA, model, blend, write) and of the model
    alone on as many batches (the engine's own model call, so the same backend and precision; half of them
    before the pipeline and half after, so that both see the same machine load). The pipeline is one run
    over all tiles, as a folder is predicted. The backend is what the defaults chose (the trial cached by
    section 1, or a new one). With `--repeats`, the pair is measured that many times in a row:
    [(model-only inputs/s, pipeline inputs/s)] per repeat."""
    import inference

    os.environ["BUILDINGS_CACHE"] = str(out.parent / "cache0")
    cfg = compose_config("inference", [f"model={ckpt}", f"output_dir={out}", f"tile_size={args.size}",
                                       f"width={args.width}", f"tta=[{','.join(TTA)}]", f"batch_size={args.batch_size}",
                                       "progress=false", f"device={device}", "overwrite=true", "match_gsd=false",
                                       f"finish_workers={args.finish_workers}"])
    eng, records = inference.build_engine(cfg, device=device, images=[inference.ImageInput(t.stem, t) for t in tiles])
    net, exported = eng.models[0], eng.exported[0]
    per_call = max(1, args.batch_size // len(TTA)) * len(TTA)
    images = np.random.default_rng(0).integers(0, 256, (per_call, args.width, args.width, 3), dtype=np.uint8)
    x = eng._to_device(images, net)  # as the engine prepares a batch for this model (normalised, layout)

    def model_only(calls: int) -> tuple[float, float]:
        _sync(device)
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(calls):
            eng._forward(net, x, exported)
        _sync(device)
        return time.perf_counter() - start, time.process_time() - cpu

    def pipeline(batch: list[Path]) -> None:
        summary = {"predicted": 0, "skipped": 0, "empty": [], "failed": []}
        inference.predict_images(eng, [inference.ImageInput(t.stem, t) for t in batch], cfg, inference.run_settings(
            cfg, eng, records), {}, out / "run.json", records, summary)
        assert summary["predicted"] == len(batch), summary

    model_only(1)  # warm-up of both paths
    pipeline(tiles[:1])
    windows = eng.stats.windows
    inputs = windows * len(TTA) * len(tiles)
    calls = math.ceil(windows * len(TTA) / per_call) * len(tiles)
    ratios = []
    for _ in range(max(1, args.repeats)):
        fwd = model_only(calls // 2)  # half before and half after the pipeline: both see the same load
        start, cpu = time.perf_counter(), time.process_time()
        pipeline(tiles)  # one folder run, as a user's: each image's outputs are finished during the next
        _sync(device)
        pipe = time.perf_counter() - start, time.process_time() - cpu
        fwd = [a + b for a, b in zip(fwd, model_only(calls - calls // 2))]
        ratios.append({"model_only_inputs_s": inputs / fwd[0], "pipeline_inputs_s": inputs / pipe[0],
                       "model_only_images_s": len(tiles) / fwd[0],  # what benchmarks/folder_rate.py compares with
                       "model_only_cpu_s": fwd[1], "pipeline_cpu_s": pipe[1]})
    workers = finishing_threads(cfg.finish_workers, device)
    ratios[-1]["rest"] = {**without_the_model(eng, lambda: pipeline(tiles), len(tiles), inference, workers),
                          "windows_per_image": windows, "finish_workers": workers}
    return ratios, f"{records[0]['backend']} {eng.precision_used}"


def without_the_model(eng, run, images: int, inference_module, finish_workers: int = 1) -> dict:
    """What the pipeline spends besides the model: one more folder run records the model's outputs, and
    a run that replays them (no model at all) is timed: per image, its CPU seconds (reading, TTA, blending,
    writing, polygonizing: what takes cores from the model) and its wall seconds; then one more replay
    with its stages timed (benchmarks/stage_clock.py): their CPU per image and the images/s that the
    serial ones allow on a host with cores to spare."""
    real, tape = eng._forward, []

    def record(model, x, exported=False):
        tape.append(real(model, x, exported))
        return tape[-1]

    def replay(model, x, exported=False):
        return tape[next(calls)]

    eng._forward = record
    try:
        run()
        calls = iter(range(len(tape)))
        eng._forward = replay
        start, cpu = time.perf_counter(), time.process_time()
        run()
        rest = {"cpu_s_per_image": (time.process_time() - cpu) / images,
                "wall_s_per_image": (time.perf_counter() - start) / images}
        calls = iter(range(len(tape)))
        with StageClock().watching(inference_module) as clock:
            run()
        return {**rest, "stages_s_per_image": clock.per_image(images),
                "serial_images_s": clock.serial_limits(images, finish_workers)}
    finally:
        eng._forward = real

# ----------------------------------------------------------------------------------------------

def time_forward(net, x: torch.Tensor, dtype=None, repeats: int = 2, warmup: bool = True) -> tuple[float, torch.Tensor]:
    """Seconds per forward (after one warm-up) and the building probability."""
    ctx = torch.autocast(x.device.type, dtype=dtype) if dtype is not None else torch.autocast(x.device.type,
                                                                                              enabled=False)
    with torch.inference_mode(), ctx:
        if warmup:
            net(x)
        _sync(x.device)
        start = time.perf_counter()
        for _ in range(repeats):
            out = net(x)
        _sync(x.device)
    return (time.perf_counter() - start) / repeats, torch.softmax(out[M.SEG].float(), 1)[:, 1]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def precision_table(ckpt: Path, tiles: list[Path], size: int, batch: int, device,
                    compile_too: bool = False) -> list[dict]:
    """Forward time and agreement with fp32 per precision; `compile_too` adds the fastest channels_last row under
    torch.compile (its one-off compile time apart), to learn whether compiling pays on this machine."""
    net = M.load_model(ckpt).to(device)
    imgs = []
    for p in (tiles * batch)[:batch]:
        with rasterio.open(p) as ds:
            imgs.append(cv2.resize(np.moveaxis(ds.read([1, 2, 3]), 0, -1), (size, size), interpolation=cv2.INTER_AREA))
    x = M.normalize(torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2)).to(device)
    rows = []
    t_ref, p_ref = time_forward(net, x.contiguous())
    rows.append({"mode": "fp32 NCHW", "s_per_batch": t_ref, "agree": 1.0, "max_diff": 0.0})
    net_cl = net.to(memory_format=torch.channels_last)
    xc = x.contiguous(memory_format=torch.channels_last)
    cands = [("fp32 channels_last", None), ("bf16 autocast + channels_last", torch.bfloat16)]
    if device.type == "cuda":
        cands.append(("fp16 autocast + channels_last", torch.float16))
    thr_median = float(p_ref.median())

    def row(label: str, t: float, p: torch.Tensor, **extra) -> dict:
        return {"mode": label, "s_per_batch": t, "agree": float(((p >= 0.5) == (p_ref >= 0.5)).float().mean()),
                "agree_at_median": float(((p >= thr_median) == (p_ref >= thr_median)).float().mean()),
                "max_diff": float((p - p_ref).abs().max()), **extra}

    for label, dtype in cands:
        rows.append(row(label, *time_forward(net_cl, xc, dtype)))
    if compile_too:
        label, dtype = cands[min(range(len(cands)), key=lambda i: rows[1 + i]["s_per_batch"])]
        compiled = torch.compile(net_cl)
        start = time.perf_counter()
        time_forward(compiled, xc, dtype, repeats=1, warmup=False)  # the first call compiles
        compile_s = time.perf_counter() - start
        rows.append(row(f"{label} + torch.compile", *time_forward(compiled, xc, dtype), compile_s=compile_s))
    return rows


# ----------------------------------------------------------------------------------------------
# Memory (child processes)
# ----------------------------------------------------------------------------------------------

def memory_child(args) -> None:
    import inference

    torch.set_num_threads(args.threads)
    cfg = compose_config("inference", [
        f"data_dir={args.scene}", f"model={args.ckpt}", f"output_dir={args.out}", "tile_size=1024", "overlap=256",
        f"width={args.memory_width}", "progress=false", "precision=fp32", f"device={args.device}",
        f"batch_size={args.batch_size}"])
    start = time.perf_counter()
    inference.run(cfg)
    print(json.dumps({"maxrss_mb": peak_rss_mb(), "seconds": time.perf_counter() - start}))


def peak_rss_mb() -> float:
    """Peak resident memory of this process image (VmHWM). ru_maxrss is not used: Linux carries the
    parent's peak across fork + exec into it, so a child started from a big parent reads too high."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # other systems: best effort


def pipeline_in_child(work: Path, args) -> tuple[list, str]:
    """Section 2 in a fresh process, as a user's run is: measured in the process that has just run the
    seed loop (gigabytes of maps allocated and freed), the pipeline came out 5-10 points lower than alone."""
    cmd = [sys.executable, __file__, "--pipeline-child", "--workdir", str(work), "--size", str(args.size),
           "--width", str(args.width), "--batch-size", str(args.batch_size), "--repeats", str(args.repeats),
           "--threads", str(args.threads), "--device", args.device, "--finish-workers", str(args.finish_workers)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=REPO)
    if res.returncode:
        raise SystemExit(f"pipeline measurement failed: {res.stderr.strip().splitlines()[-1:]}")
    found = json.loads(res.stdout.strip().splitlines()[-1])
    return found["pairs"], found["how"]


def pipeline_child(args) -> None:
    from lib.devices import resolve_device

    torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    tiles = sorted((work / "tiles" / "images").glob("*.tif"))
    pairs, how = pipeline_vs_model(work / "model.pth", tiles, work / "pipe", args, resolve_device(args.device))
    print(json.dumps({"pairs": pairs, "how": how}))


def peak_memory(scene: Path, ckpt: Path, out: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--memory-child", "--scene", str(scene), "--ckpt", str(ckpt), "--out", str(out),
           "--memory-width", str(args.memory_width), "--threads", str(args.threads), "--device", args.device,
           "--batch-size", str(args.batch_size)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO)
    return json.loads(res.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiles", type=int, default=16)
    ap.add_argument("--size", type=int, default=1024, help="tile side in pixels")
    ap.add_argument("--width", type=int, default=672, help="model input side (multiple of 32)")
    ap.add_argument("--model-name", default="efficientnet-b0")
    ap.add_argument("--model", default=None, help="a trained checkpoint instead of random weights (its own model_name); "
                    "a random model calls every pixel a building, so every path agrees with fp32 on it")
    ap.add_argument("--batch-size", type=int, default=8, help="model inputs per forward call (inference.py's default)")
    ap.add_argument("--repeats", type=int, default=1, help="alternating runs of both ways; the best of each counts")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--finish-workers", default="auto", help="inference.py's finish_workers for section 2")
    ap.add_argument("--precision-size", type=int, default=None,
                    help="input side for the precision table (default: width, or 224 without native bf16 on CPU)")
    ap.add_argument("--precision-batch", type=int, default=4)
    ap.add_argument("--compile", action="store_true", help="section 3: also the fastest channels_last row under "
                    "torch.compile (compile time printed apart; minutes on a CPU)")
    ap.add_argument("--memory-sizes", type=int, nargs="*", default=[2048, 8192])
    ap.add_argument("--memory-width", type=int, default=None, help="model width for the memory runs (default width)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["tta", "backends", "pipeline", "precision", "memory"])
    ap.add_argument("--workdir", default=None)
    # internal: one memory measurement in a fresh process
    ap.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--scene", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--pipeline-child", action="store_true", help=argparse.SUPPRESS)  # section 2, fresh process
    args = ap.parse_args()
    args.memory_width = args.memory_width or args.width
    if args.memory_child:
        memory_child(args)
        return
    if args.pipeline_child:
        pipeline_child(args)
        return

    from lib.devices import resolve_device

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_inference_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} threads, device {device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if device.type == 'cuda' else ''}, native CPU bf16: "
          f"{cpu_has_native_bf16()}")
    torch.manual_seed(0)
    ckpt = work / "model.pth"
    if args.model:  # a trained checkpoint: the trial's agreement checks (int8, bf16) then mean something
        shutil.copyfile(args.model, ckpt)
        args.model_name = M.load_model(ckpt).config["model_name"]
    else:
        save_checkpoint(ckpt, M.build_model(args.model_name, pretrained=False))
    tiles = make_tiles(work / "tiles" / "images", args.tiles, args.size)
    results = {"args": vars(args)}

    if "tta" not in args.skip:
        print(f"\n[1] 5-way TTA, {args.tiles} tiles of {args.size}^2, {args.model_name} at width {args.width}"
              + (f", best of {args.repeats} alternating runs" if args.repeats > 1 else ""))
        results["runs"] = runs = tta_runs(work, ckpt, tiles, args, device)
        base = runs.get("seed loop")
        for label, r in runs.items():
            ratio = "" if label == "seed loop" or not base else (
                f"  -> {base['wall'] / r['wall']:5.2f} x wall {base['cpu'] / r['cpu']:5.2f} x CPU")
            how = f"  [{r['backend']} {r['precision']}]" if "backend" in r else ""
            print(f"  {label:38s} {r['wall']:7.1f} s wall {r['cpu']:7.1f} s CPU{ratio}{how}")
        cold = runs["defaults, cold cache"].get("trial")
        if cold:
            int8_s = cold.get("int8_s", 0.0)
            rest = runs["defaults, cold cache"]["wall"] - cold["trial_s"] - cold["export_s"] - int8_s
            print(f"  cold cache: the one-off trial ({cold['trial_s']:.1f} s), ONNX export ({cold['export_s']:.1f} s) "
                  f"and int8 graph ({int8_s:.1f} s) are inside its time; without them {rest:.1f} s")
            print("  " + describe(cold))
        print("  (the seed loop runs in this process, so it pays no start-up; every other line is a fresh "
              "`python inference.py` process; target: defaults >= 2x the seed loop)")

    if "pipeline" not in args.skip:
        pairs, how = pipeline_in_child(work, args)
        shares = sorted(100 * p["pipeline_inputs_s"] / p["model_only_inputs_s"] for p in pairs)
        print(f"\n[2] {how}: pipeline against model-only (target >= 90 %; each a folder run, with model-only "
              "before and after it; CPU: the model-only CPU seconds over the pipeline's)")
        for p in pairs:
            print(f"  model-only {p['model_only_inputs_s']:6.3f} inputs/s vs pipeline {p['pipeline_inputs_s']:6.3f} "
                  f"inputs/s -> pipeline at {100 * p['pipeline_inputs_s'] / p['model_only_inputs_s']:5.1f} % of "
                  f"model-only; CPU {100 * p['model_only_cpu_s'] / p['pipeline_cpu_s']:5.1f} %")
        if len(pairs) > 1:
            print(f"    median of {len(pairs)}: {shares[len(shares) // 2]:5.1f} % (range {shares[0]:.1f}-{shares[-1]:.1f} %)")
        rest, model_cpu = pairs[-1]["rest"], pairs[-1]["model_only_cpu_s"] / args.tiles
        print(f"  without the model (its outputs replayed): {rest['cpu_s_per_image']:.3f} s CPU, "
              f"{rest['wall_s_per_image']:.3f} s wall per image, against {model_cpu:.3f} s CPU of model per image")
        print("    by stage, per image (thread CPU s; the lock: wall s it is held):")
        for stage, seconds in rest["stages_s_per_image"].items():
            print(f"      {seconds:6.3f}  {stage}")
        limits = rest["serial_images_s"]
        slowest = min(limits, key=limits.get)
        print(f"    with cores to spare (an accelerator's host), serial stages allow at most "
              f"{limits[slowest]:.1f} images/s ({slowest}; finish_workers={rest['finish_workers']}; GIL not "
              f"counted), against model-only "
              f"{pairs[-1]['model_only_images_s']:.1f} images/s")
        results["pipeline_vs_model"] = pairs

    if "precision" not in args.skip:
        native = device.type == "cuda" or cpu_has_native_bf16()
        size = args.precision_size or (args.width if native else 128)
        print(f"\n[3] precision, batch {args.precision_batch} at {size}^2"
              + ("" if native else " (bf16 is emulated on this CPU: small size only)"))
        rows = precision_table(ckpt, tiles, size, args.precision_batch, device, args.compile)
        ref = rows[0]["s_per_batch"]
        for r in rows:
            extra = f"  agree@median {100 * r['agree_at_median']:.2f} %" if "agree_at_median" in r else ""
            extra += f"  (compiled in {r['compile_s']:.1f} s)" if "compile_s" in r else ""
            print(f"  {r['mode']:46s} {r['s_per_batch']:8.3f} s/batch  x{ref / r['s_per_batch']:5.2f}  "
                  f"masks agree {100 * r['agree']:.2f} %  max|dp| {r['max_diff']:.4f}{extra}")
        results["precision"] = rows

    if "memory" not in args.skip and args.memory_sizes:
        print(f"\n[4] peak RSS of inference.py (tile 1024, overlap 256, width {args.memory_width}, fresh process)")
        mem = {}
        for s in args.memory_sizes:
            scene = make_big_scene(work / f"scene_{s}.tif", s)
            mem[s] = peak_memory(scene, ckpt, work / f"mem_{s}", args)
            print(f"  {s:5d}^2: {mem[s]['maxrss_mb']:8.1f} MB peak, {mem[s]['seconds']:7.1f} s")
            scene.unlink()
        sizes = sorted(mem)
        ratio = mem[sizes[-1]]["maxrss_mb"] / mem[sizes[0]]["maxrss_mb"]
        print(f"  ratio {sizes[-1]}^2 / {sizes[0]}^2 = {ratio:.3f} (target <= 1.3)")
        results["memory"] = {str(k): v for k, v in mem.items()}
        results["memory_ratio"] = ratio

    (work / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"\nresults: {work / 'results.json'}")
    if not args.workdir:
        shutil.rmtree(work / "tiles", ignore_errors=True)


if __name__ == "__main__":
    main()

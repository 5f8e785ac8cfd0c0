"""Peak memory of inference on a square scene against a very wide one: flat in the scene's width.

    python benchmarks/bench_memory.py                     # 2048 x 2048 vs 1024 x 65536, b0, tile = width = 512
    python benchmarks/bench_memory.py --tile 1024         # tile = width = 1024
    python benchmarks/bench_memory.py --sizes 2048x2048 1024x16384 --modes inference   # quicker

Each scene is predicted in a fresh process (peak RSS = VmHWM of that process), with a b0 model of
random weights (pretrained=False) at width = tile_size (overlap tile/4, fp32). The batch is one that
both scenes fill (default: the square scene's windows per row, at most 8): a model call's memory
(ONNX Runtime's arena grows with the batch) belongs to the model and batch, not to the scene, and
a 2048-px scene at tile 1024 only has 3 windows a row to batch while a wide one fills batches of 8.
- `inference`: `inference.py` with its defaults (ONNX Runtime on CPU, probability + mask COGs,
  footprints) -- what a user runs;
- `engine`: the tiling engine and the raster writer only (no footprints, no COG): the part whose
  accumulator used to be one window tall and the whole scene wide.
The ratio of the wide scene's peak to the square one's is printed per mode (target <= 1.3), with
the engine's own figures (blend buffer shape and bytes, carried strip on disk or not) next to
the accumulator the previous sweep held (one window tall, the whole scene wide).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch

from lib.demo_scene import write_repeated_scene

SIMD = re.compile(r"^(avx|amx|fma|f16c|sse4)")


def cpu_description() -> tuple[str, list[str]]:
    """The CPU model and its SIMD flags (AVX*, AMX*, FMA, F16C, SSE4) from /proc/cpuinfo."""
    model, flags = platform.processor() or platform.machine(), []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = sorted(f for f in value.split() if SIMD.match(f))
                break
    except OSError:
        pass
    return model, flags


def peak_rss_mb() -> float:
    """Peak resident memory of this process (VmHWM). ru_maxrss is not used: Linux carries the
    parent's peak across fork + exec into it, so a child started from a big parent reads too high."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


# ----------------------------------------------------------------------------------------------
# Children: one scene each
# ----------------------------------------------------------------------------------------------

def config(args):
    from lib.cli import compose_config

    return compose_config("inference", [
        f"data_dir={args.scene}", f"model={args.ckpt}", f"output_dir={args.out}", f"tile_size={args.tile}",
        f"width={args.tile}", "progress=false", "precision=fp32", f"batch_size={args.batch_size}",
        f"num_threads={args.threads}", f"onnx_cache={args.onnx_cache}", "overwrite=true"])


def child_inference(args) -> dict:
    import inference

    inference.run(config(args))
    run = json.loads((Path(args.out) / "run.json").read_text())
    image = next(iter(run["images"].values())) if isinstance(run.get("images"), dict) else {}
    return {"windows": image.get("windows"), "buildings": image.get("buildings")}


def child_engine(args) -> dict:
    import inference
    from lib import geo_io
    from lib.raster_outputs import SceneWriter, raster_profile

    cfg = config(args)
    eng, _ = inference.build_engine(cfg)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with geo_io.gdal_env(), inference.open_source(Path(args.scene), cfg) as src, SceneWriter(
            out / "prob.tif", out / "mask.tif", raster_profile(src.ds), cog=False, nodata_mask=True) as writer:
        stats = eng.predict_into(src, writer)
        writer.commit()
    return {"windows": stats.windows, "accumulator_shape": list(stats.accumulator_shape),
            "accumulator_mb": stats.accumulator_bytes / 2**20, "carry_on_disk": stats.carry_on_disk}


def run_child(args) -> None:
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    figures = (child_inference if args.child == "inference" else child_engine)(args)
    figures.update(maxrss_mb=peak_rss_mb(), seconds=time.perf_counter() - start)
    print(json.dumps(figures))


def measure(mode: str, scene: Path, ckpt: Path, out: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--scene", str(scene), "--ckpt", str(ckpt), "--out", str(out),
           "--tile", str(args.tile), "--threads", str(args.threads), "--batch-size", str(args.batch_size),
           "--onnx-cache", str(args.onnx_cache)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=False)
    if res.returncode != 0:
        raise SystemExit(f"{mode} on {scene.name} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs=2, default=["2048x2048", "1024x65536"], help="HxW of the two scenes")
    ap.add_argument("--tile", type=int, default=512, help="tile_size = width (1024 or 512)")
    ap.add_argument("--modes", nargs="+", default=["inference", "engine"], choices=["inference", "engine"])
    ap.add_argument("--batch-size", type=int, default=0, help="0: the first scene's windows per row, at most 8")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--child", choices=["inference", "engine"], help=argparse.SUPPRESS)
    for name in ("--scene", "--ckpt", "--out", "--onnx-cache"):
        ap.add_argument(name, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        run_child(args)
        return

    import model as M
    from lib.checkpoints import save_checkpoint
    from lib.exported import onnxruntime_models
    from lib.windows import window_offsets

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_memory_"))
    work.mkdir(parents=True, exist_ok=True)
    cpu, flags = cpu_description()
    print(f"machine: {cpu}, {os.cpu_count()} CPUs, {args.threads} threads, torch {torch.__version__}, "
          f"Python {platform.python_version()}\nCPU flags: {' '.join(flags) or 'unknown'}")
    torch.manual_seed(0)
    ckpt = work / "b0.pth"
    save_checkpoint(ckpt, M.build_model("efficientnet-b0", pretrained=False))
    args.onnx_cache = work / "onnx"
    onnxruntime_models([M.load_model(ckpt)], [ckpt], args.onnx_cache)  # exported once, outside the measured runs
    scenes, shapes = {}, {}
    for size in args.sizes:
        shapes[size] = h, w = tuple(int(v) for v in size.lower().split("x"))
        scenes[size] = write_repeated_scene(work / f"scene_{size}.tif", h, w)
    first_w = shapes[args.sizes[0]][1]
    args.batch_size = args.batch_size or min(8, len(window_offsets(first_w, min(args.tile, first_w), args.tile // 4)))
    print(f"b0 (random weights), tile_size = width = {args.tile}, overlap {args.tile // 4}, batch {args.batch_size}, "
          "fp32; one fresh process per scene and mode; peak RSS = VmHWM")
    results = {"cpu": cpu, "flags": flags, "args": {k: str(v) for k, v in vars(args).items()}}
    for mode in args.modes:
        figures = {}
        for size, scene in scenes.items():
            figures[size] = f = measure(mode, scene, ckpt, work / f"out_{mode}_{size}", args)
            h, w = shapes[size]
            before = min(args.tile, h) * w * 5 / 2**20  # one float map + validity, window tall x scene wide
            extra = (f", blend buffers {f['accumulator_shape'][0]} x {f['accumulator_shape'][1]} "
                     f"({f['accumulator_mb']:.1f} MB; previous sweep {before:.1f} MB), carried strip "
                     f"{'on disk' if f['carry_on_disk'] else 'in memory'}" if mode == "engine"
                     else f", {f['buildings']} footprints")
            print(f"  {mode:9s} {size:>11s}: {f['maxrss_mb']:8.1f} MB peak, {f['seconds']:7.1f} s, "
                  f"{f['windows']} windows{extra}")
        a, b = (figures[s]["maxrss_mb"] for s in args.sizes)
        print(f"  {mode:9s} ratio {args.sizes[1]} / {args.sizes[0]} = {b / a:.3f} (target <= 1.3)")
        results[mode] = {"figures": figures, "ratio": b / a}
    (work / "results.json").write_text(json.dumps(results, indent=2))
    print(f"results: {work / 'results.json'}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

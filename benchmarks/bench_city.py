"""City scale: streaming footprints at 10^4 and 10^5 buildings, and one large scene on 2 processes vs 1.

Footprints: a mask raster holding N rectangular buildings (10^4, 5 x 10^4, 10^5; a jittered grid,
0.3 m/px, UTM) is made band by band -- the whole mask is never in memory -- and fed in the engine's
blocks (1024 rows x 2048 columns)
to `Polygonizer` -> `FootprintWriter` with inference's defaults (min_area 4 m^2, simplify 0.15 m but at least 1 px,
squared outlines, GPKG + EPSG:4326 GeoJSON), in a fresh subprocess per size. Printed: footprints per
second, the per-building CPU time ratio 10^5 vs 10^4 (1.0 = linear growth) and the peak RSS of each
run (it grows until footprints are written chunk by chunk, past STREAM_CHUNK, then stays).

Scene split: `inference.py` on one generated scene (b0, pretrained=False, width=tile 512, fp32,
PyTorch) in one process (one thread, then two) and under `torchrun --nproc_per_node=2` (one thread
each), where the scene (5120 px: 13 x 13 windows, split with the default split_windows=32) goes to
the ranks in two bands of 7 window rows (the row across the seam is computed by both); the outputs
are compared (they must be equal), wall and CPU seconds and the speed-up printed (target >= 1.7x on
2 cores against one process with one thread; the ideal is 169 / 91 windows = 1.86x). The GPU
commands are printed too.

    .venv/bin/python benchmarks/bench_city.py                       # both parts
    .venv/bin/python benchmarks/bench_city.py --skip-split --sizes 10000 100000
    .venv/bin/python benchmarks/bench_city.py --skip-footprints --scene 4096
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BAND_ROWS, BLOCK_COLS, CELL = 1024, 2048, 24  # engine-like blocks; one building per 24 x 24 px cell
GSD = 0.3


def houses_band(r0: int, r1: int, side: int, n: int):
    """Rows [r0, r1) of a mask with `n` buildings on a jittered grid of CELL-pixel cells, `side` pixels wide.

    Each cell row draws from its own seed, so a band is the same whichever band size cuts it.
    """
    import numpy as np

    mask = np.zeros((r1 - r0, side), bool)
    cols = side // CELL
    for i in range(r0 // CELL, min((r1 - 1) // CELL + 1, -(-n // cols))):
        rng = np.random.default_rng(i)
        hs, ws = rng.integers(9, 19, cols), rng.integers(9, 19, cols)
        dy, dx = rng.integers(0, CELL - 19, cols), rng.integers(0, CELL - 19, cols)
        for j in range(min(cols, n - i * cols)):
            top = i * CELL + dy[j]
            a, b = max(top, r0), min(top + hs[j], r1)
            if a < b:
                mask[a - r0:b - r0, j * CELL + dx[j]:j * CELL + dx[j] + ws[j]] = True
    return mask


def footprints_child(n: int, out: str) -> None:
    """One size, in this (fresh) process: print a JSON line with the figures."""
    import numpy as np
    from rasterio.transform import from_origin

    from lib import footprints
    from lib.cli import compose_config

    cols = int(np.ceil(np.sqrt(n)))
    side = cols * CELL
    cfg = compose_config("inference", [])
    start, cpu = time.perf_counter(), time.process_time()
    writer = footprints.FootprintWriter(Path(out) / "city.geojson", from_origin(500000, 4000000, GSD, GSD),
                                        "EPSG:32632", cfg)
    poly = footprints.Polygonizer(side, side, sink=writer)
    held = 0
    for r0 in range(0, side, BAND_ROWS):
        band = houses_band(r0, min(side, r0 + BAND_ROWS), side, n)
        prob = np.where(band, np.uint8(230), np.uint8(0))
        for c0 in range(0, side, BLOCK_COLS):
            poly.add(r0, band[:, c0:c0 + BLOCK_COLS], prob[:, c0:c0 + BLOCK_COLS], c0)
        held = max(held, len(poly.open) + len(writer.pending))
    poly.finish()
    found = writer.close()
    print(json.dumps({"n": n, "found": found, "mpx": side * side / 1e6, "seconds": time.perf_counter() - start,
                      "cpu": time.process_time() - cpu, "held": held,
                      "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def bench_footprints(sizes: list[int]) -> None:
    from lib import footprints

    print("\n## Streaming footprints (Polygonizer -> FootprintWriter, defaults: min_area 4 m^2, simplify 0.15 m (at least 1 px), squared)")
    print(f"{'buildings':>9} {'found':>7} {'Mpx':>6} {'seconds':>8} {'CPU s':>7} {'fp/s':>7} {'held':>5} "
          f"{'peak RSS MB':>11}")
    rows = []
    for n in sizes:
        with tempfile.TemporaryDirectory() as out:
            proc = subprocess.run([sys.executable, __file__, "--footprints-child", str(n), out], capture_output=True,
                                  text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(r)
        print(f"{r['n']:>9,} {r['found']:>7,} {r['mpx']:>6.1f} {r['seconds']:>8.1f} {r['cpu']:>7.1f} "
              f"{r['found'] / r['seconds']:>7.0f} {r['held']:>5} {r['rss_mb']:>11.0f}")
    if len(rows) >= 2:
        a, b = rows[0], rows[-1]
        per = (b["cpu"] / b["found"]) / (a["cpu"] / a["found"])
        print(f"CPU time per building, {b['n']:,} vs {a['n']:,}: {per:.2f}x (1.00 = linear growth); "
              f"peak RSS {b['rss_mb'] / a['rss_mb']:.2f}x; held pieces at most {b['held']:,} "
              f"(a chunk of {footprints.STREAM_CHUNK:,} + the pieces on a seam)")
        past = [r for r in rows if r["found"] > 2 * footprints.STREAM_CHUNK]
        if len(past) >= 2:  # memory stops growing once footprints are written chunk by chunk
            print(f"peak RSS {past[-1]['n']:,} vs {past[0]['n']:,} buildings (both streamed): "
                  f"{past[-1]['rss_mb'] / past[0]['rss_mb']:.2f}x")


def make_scene(path: Path, side: int) -> None:
    """A georeferenced RGB scene with bright roofs on textured ground (the demo scene's look)."""
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin

    rng = np.random.default_rng(0)
    profile = {"driver": "GTiff", "width": side, "height": side, "count": 3, "dtype": "uint8", "crs": "EPSG:32632",
               "transform": from_origin(500000, 4000000, GSD, GSD), "tiled": True, "blockxsize": 512,
               "blockysize": 512, "compress": "deflate"}
    with rasterio.open(path, "w", **profile) as ds:
        for r0 in range(0, side, 1024):
            r1 = min(side, r0 + 1024)
            houses = houses_band(r0, r1, side, 10 ** 9)
            img = rng.integers(60, 110, (3, r1 - r0, side), dtype=np.uint8)
            img[:, houses] = 200
            ds.write(img, window=rasterio.windows.Window(0, r0, side, r1 - r0))


def inference_args(scene: Path, model: Path, out: Path, threads: int) -> list[str]:
    return [f"data_dir={scene}", f"model={model}", f"output_dir={out}", "tile_size=512", "width=512",
            "backend=torch", "precision=fp32", "progress=false", "num_workers=1", f"num_threads={threads}"]


def bench_split(side: int) -> None:
    import numpy as np
    import rasterio
    import torch

    import model as model_lib
    from lib.checkpoints import save_checkpoint

    print(f"\n## One {side} x {side} scene: 2 processes (split into bands) vs 1 (b0, width = tile 512, fp32)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_scene(tmp / "city.tif", side)
        torch.manual_seed(0)
        save_checkpoint(tmp / "b0.pth", model_lib.build_model("efficientnet-b0", pretrained=False), meta={})
        timings = {}
        runs = (("1 process, 1 thread", "one", 1, [sys.executable, "inference.py"]),
                ("1 process, 2 threads", "one2", 2, [sys.executable, "inference.py"]),
                ("2 processes, 1 thread each", "two", 1, [sys.executable, "-m", "torch.distributed.run",
                                                          "--standalone", "--nproc_per_node=2", "inference.py"]))
        for name, folder, threads, prefix in runs:
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            start, cpu0 = time.perf_counter(), _children_cpu()
            proc = subprocess.run([*prefix, *inference_args(tmp / "city.tif", tmp / "b0.pth", tmp / folder, threads)],
                                  cwd=REPO, env=env, capture_output=True, text=True, check=False)
            timings[folder] = time.perf_counter() - start
            cpu = _children_cpu() - cpu0
            if proc.returncode:
                sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
            record = json.loads((tmp / folder / "run.json").read_text())["images"]["city"]
            print(f"{name:>26}: {timings[folder]:7.1f} s wall, {cpu:7.1f} s CPU (all processes), windows per rank "
                  f"{record.get('ranks')}, {record['buildings']} buildings")
        same = []
        for kind in ("probabilities", "masks"):
            with rasterio.open(tmp / "one" / kind / "city.tif") as a, rasterio.open(tmp / "two" / kind / "city.tif") as b:
                same.append(np.array_equal(a.read(), b.read()) and a.transform == b.transform and a.crs == b.crs)
        one = json.loads((tmp / "one" / "footprints" / "city.geojson").read_text())["features"]
        two = json.loads((tmp / "two" / "footprints" / "city.geojson").read_text())["features"]
        same.append(one == two)
        print(f"speed-up of 2 processes: {timings['one'] / timings['two']:.2f}x vs 1 process with 1 thread "
              f"(target >= 1.7x), {timings['one2'] / timings['two']:.2f}x vs 1 process with 2 threads; outputs "
              f"identical to the 1-thread run: {all(same)} (probabilities, masks, footprints: {same})")
    print("GPU, one machine: torchrun --standalone --nproc_per_node=<GPUs> inference.py data_dir=city.tif "
          "model=models/m40000.pth width=672 output_dir=outputs/city")
    print("GPU, N nodes: torchrun --nnodes=<N> --nproc_per_node=<GPUs> --rdzv-backend=c10d "
          "--rdzv-endpoint=<host0>:29500 --rdzv-id=city inference.py data_dir=city.tif model=models/m40000.pth "
          "width=672 output_dir=<shared folder>")


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, python {platform.python_version()}, load {os.getloadavg()[0]:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000, 100_000], help="buildings per scene")
    ap.add_argument("--scene", type=int, default=5120, help="side of the scene split among 2 processes (px)")
    ap.add_argument("--skip-footprints", action="store_true")
    ap.add_argument("--skip-split", action="store_true")
    ap.add_argument("--footprints-child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.footprints_child:
        footprints_child(int(args.footprints_child[0]), args.footprints_child[1])
        return
    print(machine())
    if not args.skip_footprints:
        bench_footprints(args.sizes)
    if not args.skip_split:
        bench_split(args.scene)


if __name__ == "__main__":
    main()

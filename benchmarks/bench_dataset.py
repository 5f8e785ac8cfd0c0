"""Data preparation speed: `dataset.py` against the original per-building algorithm.

The original pipeline wrote one chip per building by cropping the chip with `rasterio.mask.mask` and
then burning *every* footprint of the scene onto it with `geometry_mask`, so each chip costs O(N) and a
scene O(N^2). `dataset.py` finds the footprints of a chip with a spatial index and burns only those,
and spreads chips over `num_workers` processes.

Both run on the same generated scenes (pairs layout, tiled deflate GeoTIFF at 0.3 m/px) with the same
`pad`, writing the same files (JPEG chip + PNG mask). The baseline is timed on a random subset of
chips and extrapolated per chip (it is far too slow to run in full on large scenes).

    .venv/bin/python benchmarks/bench_dataset.py                   # 2,000 / 8,000 / 32,000 buildings
    .venv/bin/python benchmarks/bench_dataset.py --sizes 2000 8000 --baseline-chips 100
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2
import numpy as np

import dataset
from lib import demo_scene


def make_scene(root: Path, n: int, seed: int) -> tuple[Path, Path, int]:
    """Generate a scene with about `n` buildings as `images/x.tif` + `labels/x.geojson` under `root`."""
    scene = demo_scene.big_scene(n, seed=seed)
    name = f"scene_{n}"
    image, labels = root / "images" / f"{name}.tif", root / "labels" / f"{name}.geojson"
    demo_scene.write_scene(scene, image, labels)
    return image, labels, len(scene.footprints)


def run_ours(base_dir: Path, out_dir: Path, pad: int, workers: int) -> tuple[float, int, float]:
    """(wall seconds, chips, CPU seconds spent writing chips in all processes)."""
    cfg = dataset.default_config(base_dir=str(base_dir), out_dir=str(out_dir), source="pairs", mode="buildings",
                                 pad=pad, num_workers=workers, progress=False)
    start = time.perf_counter()
    summary = dataset.run(cfg)
    return time.perf_counter() - start, summary["written"], summary["cpu_s"]


def run_baseline(image: Path, labels: Path, out_dir: Path, pad: int, sample: int, seed: int,
                 budget_s: float = 60.0) -> tuple[float, int, int, float]:
    """The original per-building loop on up to `sample` random buildings (at least 20, stopping after
    `budget_s` seconds): (seconds, chips done, buildings, CPU seconds of the loop)."""
    import geopandas as gpd
    import rasterio
    from rasterio.features import geometry_mask
    from rasterio.mask import mask as rio_mask
    from shapely.geometry import box

    out_dir.mkdir(parents=True, exist_ok=True)
    start, cpu_start = time.perf_counter(), time.process_time()
    with rasterio.open(image) as ds:
        gdf = gpd.read_file(labels).to_crs(ds.crs)
        geoms = list(gdf.geometry)
        res = ds.res[0]
        picks = np.random.default_rng(seed).choice(len(geoms), size=min(sample, len(geoms)), replace=False)
        setup = time.perf_counter() - start
        start, cpu_start = time.perf_counter(), time.process_time()
        done = 0
        for i in picks:
            if done >= 20 and time.perf_counter() - start > budget_s:
                break
            done += 1
            minx, miny, maxx, maxy = geoms[i].bounds
            chip_box = box(minx - pad * res, miny - pad * res, maxx + pad * res, maxy + pad * res)
            img, transform = rio_mask(ds, [chip_box], crop=True, indexes=[1, 2, 3])
            # every footprint of the scene, for every chip: the quadratic step
            gt = geometry_mask(geoms, out_shape=img.shape[1:], transform=transform, invert=True, all_touched=True)
            cv2.imwrite(str(out_dir / f"1_{i}.jpg"), cv2.cvtColor(np.moveaxis(img, 0, -1), cv2.COLOR_RGB2BGR))
            cv2.imwrite(str(out_dir / f"1_{i}_mask.png"), gt.astype(np.uint8) * 255)
    cpu = time.process_time() - cpu_start
    return time.perf_counter() - start + setup * done / len(geoms), done, len(geoms), cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 8000, 32000])
    parser.add_argument("--pad", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--baseline-chips", type=int, default=200, help="most buildings timed for the baseline")
    parser.add_argument("--baseline-seconds", type=float, default=60.0, help="time budget of each baseline run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the generated scenes and chips")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench_dataset_", dir=args.workdir))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"pad={args.pad}, ours num_workers={args.workers}, baseline 1 process (as the original)")
    print(f"{'buildings':>9} {'chips':>7} {'ours s':>8} {'ours chip/s':>11} {'cores':>5} {'base s/chip':>11} "
          f"{'base chip/s':>11} {'base total s':>12} {'speed-up':>8}")
    rows, sampled, cpu_rows = {}, {}, {}
    workers_line = ""
    try:
        for k, n in enumerate(args.sizes):
            scene_dir = root / f"scene_{n}"
            image, labels, count = make_scene(scene_dir, n, args.seed + k)
            seconds, chips, cpu = run_ours(scene_dir, root / f"ours_{n}", args.pad, args.workers)
            shutil.rmtree(root / f"ours_{n}", ignore_errors=True)
            if k == 0 and args.workers > 1:  # what the extra processes buy, on the smallest scene
                single, _, _ = run_ours(scene_dir, root / f"ours1_{n}", args.pad, 1)
                shutil.rmtree(root / f"ours1_{n}", ignore_errors=True)
                workers_line = (f"num_workers at {n:,} buildings: 1 -> {chips / single:.1f} chips/s, "
                                f"{args.workers} -> {chips / seconds:.1f} chips/s ({single / seconds:.2f}x)")
            base_s, base_n, _, base_cpu = run_baseline(image, labels, root / f"base_{n}", args.pad, args.baseline_chips,
                                             args.seed, args.baseline_seconds)
            sampled[n] = base_n
            shutil.rmtree(root / f"base_{n}", ignore_errors=True)
            per_chip = base_s / base_n
            base_total = per_chip * chips
            rows[n] = (seconds, base_total)
            cpu_rows[n] = (cpu, base_cpu / base_n * chips)
            print(f"{count:>9,} {chips:>7,} {seconds:>8.1f} {chips / seconds:>11.1f} {cpu / seconds:>5.2f} {per_chip:>11.4f} "
                  f"{1 / per_chip:>11.1f} {base_total:>12.1f} {base_total / seconds:>7.1f}x", flush=True)
            if not args.keep:
                shutil.rmtree(scene_dir, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print("baseline totals are extrapolated per chip from random buildings timed per scene ("
          + ", ".join(f"{n:,}: {k}" for n, k in sampled.items()) + " chips)")
    if workers_line:
        print(workers_line)
    print("cores = CPU seconds of all chip-writing processes per wall second (2.0 = both cores busy; less when "
          "other jobs share the machine)")
    sizes = sorted(rows)
    for a in sizes:
        if 4 * a in rows:
            ours = rows[4 * a][0] / rows[a][0]
            base = rows[4 * a][1] / rows[a][1]
            print(f"scaling {a:,} -> {4 * a:,} buildings (time at 4N / time at N): ours {ours:.2f}, baseline {base:.2f}")
            ours_cpu = cpu_rows[4 * a][0] / cpu_rows[a][0]
            base_cpu = cpu_rows[4 * a][1] / cpu_rows[a][1]
            print(f"  same in CPU seconds (insensitive to other jobs on the machine): ours {ours_cpu:.2f}, "
                  f"baseline {base_cpu:.2f}")


if __name__ == "__main__":
    main()

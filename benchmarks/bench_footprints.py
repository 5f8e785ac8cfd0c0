"""Footprint post-processing cost: polygonise + square outlines against polygonise only.

A generated scene's footprints are rasterised at its GSD, blurred and noised at the edges (what a
model's mask looks like), then turned into footprints the way inference does: `Polygonizer` fed in
1024-row bands, then `footprints_frame` with inference's default `simplify` (0.15 m, at least 1 px:
1 px at 0.3 m) -- once with `regularize=False` (plain connected components + simplification, the baseline) and once with `regularize=True`. Both print
seconds per megapixel and per 1,000 buildings; the ratio is the price of squared outlines. The
outline statistics (vertices per polygon, right-angle share) of both outputs are printed too.

A third line per size prices instance separation: the same mask with border and contact maps made
from the scene's own buildings (lib.instance_targets, 1 px border, 2 px contact, as a well-trained
instance head would give them), fed in the same bands to lib.instances' `InstancePolygonizer` (seeds +
watershed), then `footprints_frame` with squaring -- against the plain connected components
(`Polygonizer`) on the same maps: seconds per megapixel and per 1,000 buildings, and both ratios.
The demo scenes hold rows of touching roofs, so the separation has real work to do.

    .venv/bin/python benchmarks/bench_footprints.py                  # 2,000 and 8,000 buildings
    .venv/bin/python benchmarks/bench_footprints.py --sizes 500 --repeat 1
    .venv/bin/python benchmarks/bench_footprints.py --sizes 200 --repeat 1        # a quick check that it runs
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2
import numpy as np

from lib import demo_scene, footprints, geo_io, metrics

BAND_ROWS = 1024


def model_like_mask(scene, seed: int) -> np.ndarray:
    """The scene's footprints as a mask with soft, noisy edges (about a pixel of jitter)."""
    h, w = scene.rgba.shape[1:]
    mask = geo_io.rasterize_footprints(scene.footprints, (h, w), scene.transform).astype(np.float32)
    rng = np.random.default_rng(seed)
    jitter = cv2.GaussianBlur(rng.random((h, w), dtype=np.float32), (0, 0), 2) - 0.5
    return (cv2.GaussianBlur(mask, (0, 0), 1.5) + 0.6 * jitter) > 0.5


def polygonise(mask: np.ndarray) -> list:
    poly = footprints.Polygonizer(*mask.shape)
    for r in range(0, mask.shape[0], BAND_ROWS):
        poly.add(r, mask[r:r + BAND_ROWS])
    return poly.finish()


def instance_maps(scene, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 probability, border and contact maps of the scene's buildings (the mask's soft edges kept)."""
    from rasterio.features import rasterize

    from lib.instance_targets import instance_targets

    h, w = mask.shape
    ids = rasterize(zip(scene.footprints, range(1, len(scene.footprints) + 1)), out_shape=(h, w),
                    transform=scene.transform, dtype="int32")
    border, contact = instance_targets(ids, 1, 2)
    to_u8 = (lambda a: (np.clip(a, 0, 1) * 255).astype(np.uint8))
    return to_u8(mask.astype(np.float32)), to_u8(border), to_u8(contact)


def run_instances(mask, maps, scene):
    from lib.instances import InstancePolygonizer

    prob, border, contact = maps
    start, cpu = time.perf_counter(), time.process_time()
    poly = InstancePolygonizer(*mask.shape, seed_threshold=0.5, seed_min_px=4)
    for r in range(0, mask.shape[0], BAND_ROWS):
        rows = slice(r, r + BAND_ROWS)
        poly.add(r, mask[rows], prob[rows], border_u8=border[rows], contact_u8=contact[rows])
    gdf = footprints.footprints_frame(poly.finish(), scene.transform, scene.crs, min_area=4, simplify=None,
                                      regularize=True, angles=90)
    return time.perf_counter() - start, time.process_time() - cpu, gdf


def run_once(mask, scene, regularize: bool):
    start, cpu = time.perf_counter(), time.process_time()
    gdf = footprints.footprints_frame(polygonise(mask), scene.transform, scene.crs, min_area=4, simplify=None,
                                      regularize=regularize, angles=90)
    return time.perf_counter() - start, time.process_time() - cpu, gdf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 8000], help="buildings per scene")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each variant (the fastest counts)")
    args = ap.parse_args()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}")
    print(f"{'buildings':>9} {'Mpx':>6} {'found':>6} {'plain s':>8} {'squared s':>9} {'plain s/Mpx':>11} "
          f"{'sq s/Mpx':>8} {'plain s/1k':>10} {'sq s/1k':>8} {'ratio':>6} {'squared %':>9}")
    warm = demo_scene.big_scene(50, seed=1)
    run_once(model_like_mask(warm, 1), warm, True)  # imports, PROJ database: not part of the figures
    for n in args.sizes:
        scene = demo_scene.big_scene(n, seed=n)
        mask = model_like_mask(scene, n)
        mpx = mask.size / 1e6
        plain = min((run_once(mask, scene, False) for _ in range(args.repeat)), key=lambda r: r[1])
        sq = min((run_once(mask, scene, True) for _ in range(args.repeat)), key=lambda r: r[1])
        found = len(sq[2])
        print(f"{len(scene.footprints):>9,} {mpx:>6.1f} {found:>6,} {plain[0]:>8.2f} {sq[0]:>9.2f} "
              f"{plain[0] / mpx:>11.3f} {sq[0] / mpx:>8.3f} {plain[0] / found * 1000:>10.3f} "
              f"{sq[0] / found * 1000:>8.3f} {sq[0] / plain[0]:>5.2f}x {100 * sq[2]['squared'].mean():>8.1f}%")
        print(f"    CPU seconds: plain {plain[1]:.2f}, squared {sq[1]:.2f} (ratio {sq[1] / plain[1]:.2f}x)")
        maps = instance_maps(scene, mask)
        inst = min((run_instances(mask, maps, scene) for _ in range(args.repeat)), key=lambda r: r[1])
        print(f"    instances (InstancePolygonizer + squaring): {len(inst[2]):,} footprints, {inst[0]:.2f} s, "
              f"{inst[0] / mpx:.3f} s/Mpx, {inst[0] / max(len(inst[2]), 1) * 1000:.3f} s/1k; "
              f"{inst[0] / plain[0]:.2f}x plain components, {inst[0] / sq[0]:.2f}x squared components "
              f"(CPU {inst[1]:.2f} s, {inst[1] / plain[1]:.2f}x plain)")
        for name, gdf in (("plain", plain[2]), ("squared", sq[2]), ("instances", inst[2])):
            s = metrics.outline_stats(gdf)
            print(f"    {name:>9}: {s['vertices_per_polygon']:.1f} vertices per polygon, "
                  f"{100 * s['right_angle_share']:.1f} % right-angle corners")


if __name__ == "__main__":
    main()

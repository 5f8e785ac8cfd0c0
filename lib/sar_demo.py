"""Synthetic Sentinel-1 scenes with vessels, in the xView3 layout: data for the point task's demo and tests.

Each scene is a deterministic function of (seed, scene index):
- sea clutter: a mean backscatter that drifts smoothly across the scene (wind), VV around -17 dB and
  VH 7.5 dB lower, times gamma-distributed speckle of 4.4 looks (Sentinel-1 IW GRDH), in dB;
- land on one side behind an irregular coast (smooth random coastline), brighter (-7 dB VV) and
  textured; a triangular nodata corner (-32768, as at the edge of a real swath);
- objects on the sea: vessels as small elongated bright ellipses of a known length (20-300 m at
  10 m/px, i.e. 2-30 px) in any heading, fishing vessels among them (mostly 15-70 m), and non-vessels
  (platforms, a grid of wind turbines: a crowded region); a few vessel pairs 3-6 px apart. Every object
  is centred on a pixel centre and symmetric, so its label pixel is its brightest one.
- labels as in xView3: some objects unlabelled (not in the CSV), some with unknown is_vessel /
  is_fishing / length (empty cells), confidence HIGH / MEDIUM / LOW.

Layout written by `make_sar_demo`:

    <root>/<scene_id>/VV_dB.tif, VH_dB.tif      float32 dB, UTM 31N, 10 m pixels, nodata -32768
    <root>/labels.csv                           the xView3 label columns
    <root>/shoreline/<scene_id>_shoreline.npy   object array of (row, col) coast contours (xView3 format)
    <root>/objects.csv                          every drawn object, labelled or not (the demo's truth)
    <root>/objects.geojson                      the same objects as points (EPSG:4326), for point F1
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from rasterio.transform import from_origin

from lib.files import atomic_path
from lib.geo_io import write_raster
from lib.sar import DB_NODATA

GENERATOR_VERSION = 1
DEMO_CRS = "EPSG:32631"  # UTM 31N: the southern North Sea
DEMO_GSD = 10.0
DEMO_ORIGIN = (480_000.0, 5_800_000.0)  # upper-left corner of scene 0, metres
ENL = 4.4  # equivalent number of looks of Sentinel-1 IW GRDH
SEA_VV_DB, LAND_VV_DB = -17.0, -7.0
VH_BELOW_VV_DB = {"sea": 7.5, "land": 6.0, "object": 7.0}
LABEL_COLUMNS = ("scene_id", "detect_scene_row", "detect_scene_column", "is_vessel", "is_fishing",
                 "vessel_length_m", "distance_from_shore_km", "confidence")


@dataclass
class SarDemo:
    """Where a generated demo lives: scene folders, the label CSV, the shoreline folder, every object."""
    root: Path
    scenes: list[Path]
    labels: Path
    shoreline_dir: Path
    objects: Path


def make_sar_demo(root, n_scenes: int = 2, size: int = 1024, seed: int = 0) -> SarDemo:
    """Write `n_scenes` synthetic scenes of `size` x `size` px under `root` (layout in the module docstring)."""
    root = Path(root)
    scenes, objects = [], []
    for i in range(n_scenes):
        scene_id = f"sar{seed}_{i:02d}"
        rng = np.random.default_rng([GENERATOR_VERSION, seed, i])
        vv, vh, objs, contours = generate_scene(size, rng)
        objs.insert(0, "scene_id", scene_id)
        origin = (DEMO_ORIGIN[0] + i * (size + 100) * DEMO_GSD, DEMO_ORIGIN[1])
        objs["x"] = origin[0] + (objs["col"] + 0.5) * DEMO_GSD  # pixel centre, scene CRS (for objects.geojson)
        objs["y"] = origin[1] - (objs["row"] + 0.5) * DEMO_GSD
        profile = {"driver": "GTiff", "crs": DEMO_CRS, "transform": from_origin(*origin, DEMO_GSD, DEMO_GSD),
                   "nodata": DB_NODATA, "compress": "deflate", "tiled": True, "blockxsize": 256, "blockysize": 256}
        folder = root / scene_id
        write_raster(folder / "VV_dB.tif", vv, profile)
        write_raster(folder / "VH_dB.tif", vh, profile)
        _save_shoreline(root / "shoreline" / f"{scene_id}_shoreline.npy", contours)
        scenes.append(folder)
        objects.append(objs)
    table = pd.concat(objects, ignore_index=True)
    with atomic_path(root / "objects.csv") as tmp:
        table.to_csv(tmp, index=False)
    with atomic_path(root / "labels.csv") as tmp:
        label_table(table).to_csv(tmp, index=False)
    _save_object_points(root / "objects.geojson", table)
    return SarDemo(root, scenes, root / "labels.csv", root / "shoreline", root / "objects.csv")


def _save_object_points(path: Path, objects: pd.DataFrame) -> None:
    """Every object as a point at its pixel centre, in EPSG:4326 (what `evaluate.py task=points` reads)."""
    import logging

    import geopandas as gpd

    logging.getLogger("pyogrio").setLevel(logging.WARNING)  # not "Created N records"
    gdf = gpd.GeoDataFrame(objects[["scene_id", "kind", "length_m"]].copy(),
                           geometry=gpd.points_from_xy(objects["x"], objects["y"]), crs=DEMO_CRS).to_crs("EPSG:4326")
    with atomic_path(path) as tmp:
        gdf.to_file(tmp, driver="GeoJSON")


def label_table(objects: pd.DataFrame) -> pd.DataFrame:
    """The xView3 label CSV of the labelled objects: unknown values as empty cells, booleans as True/False."""
    lab = objects[objects["labelled"]]

    def tristate(v):
        return "" if np.isnan(v) else str(bool(v))

    return pd.DataFrame({
        "scene_id": lab["scene_id"], "detect_scene_row": lab["row"], "detect_scene_column": lab["col"],
        "is_vessel": lab["is_vessel"].map(tristate), "is_fishing": lab["is_fishing"].map(tristate),
        "vessel_length_m": lab["length_label_m"], "distance_from_shore_km": lab["distance_from_shore_km"].round(3),
        "confidence": lab["confidence"]}, columns=list(LABEL_COLUMNS))


def _save_shoreline(path: Path, contours: list[np.ndarray]) -> None:
    arr = np.empty(len(contours), dtype=object)
    for k, c in enumerate(contours):
        arr[k] = c
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, arr, allow_pickle=True)


# ----- one scene ----------------------------------------------------------------------------------


def generate_scene(size: int, rng: np.random.Generator):
    """(VV dB, VH dB, objects table, shoreline contours) of one synthetic scene."""
    land = _land_mask(size, rng)
    nodata = _nodata_corner(size, rng)
    sea_vv = SEA_VV_DB + 1.5 * _smooth_field(size, 4, rng)
    land_vv = LAND_VV_DB + 2.5 * _smooth_field(size, 24, rng)
    mean_vv = np.where(land, land_vv, sea_vv)
    mean_vh = mean_vv - np.where(land, VH_BELOW_VV_DB["land"], VH_BELOW_VV_DB["sea"])
    sea_dist_px = cv2.distanceTransform((~land).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    objs = _place_objects(size, rng, land, nodata, sea_dist_px)
    obj_vv, obj_vh = _render_objects(size, objs, rng)
    out = []
    for mean_db, obj in ((mean_vv, obj_vv), (mean_vh, obj_vh)):
        speckle = rng.gamma(ENL, 1.0 / ENL, (size, size)).astype(np.float32)
        intensity = 10.0 ** (mean_db.astype(np.float32) / 10.0) * speckle + obj
        db = (10.0 * np.log10(np.maximum(intensity, 1e-6))).astype(np.float32)
        db[nodata] = DB_NODATA
        out.append(db)
    return out[0], out[1], objs, _contours(land)


def _smooth_field(size: int, cells: int, rng) -> np.ndarray:
    """Zero-mean, unit-ish smooth noise: a `cells` x `cells` random grid upsampled bicubically."""
    grid = rng.standard_normal((cells + 3, cells + 3)).astype(np.float32)
    big = cv2.resize(grid, (size + 3 * size // cells, size + 3 * size // cells), interpolation=cv2.INTER_CUBIC)
    o = size // (2 * cells)
    return big[o:o + size, o:o + size]


def _land_mask(size: int, rng) -> np.ndarray:
    """Land on one side (left, then rotated by a random quarter turn) behind an irregular coastline."""
    r = np.arange(size, dtype=np.float32)
    coast = size * rng.uniform(0.12, 0.28) * np.ones(size, np.float32)
    for _ in range(4):  # a few bays and headlands of different widths
        period = size * rng.uniform(0.15, 1.2)
        coast += size * rng.uniform(0.01, 0.05) * np.sin(2 * np.pi * r / period + rng.uniform(0, 2 * np.pi))
    walk = np.cumsum(rng.standard_normal(size)).astype(np.float32)  # rocky irregularity
    coast += cv2.GaussianBlur(walk[None], (0, 0), 3)[0] * 0.6
    land = np.arange(size)[None, :] < coast[:, None]
    return np.rot90(land, int(rng.integers(4))).copy()


def _nodata_corner(size: int, rng) -> np.ndarray:
    """A triangular nodata corner (swath edge) at a random corner."""
    rr, cc = np.mgrid[0:size, 0:size]
    corner = rr + cc < size * rng.uniform(0.1, 0.16)
    return np.rot90(corner, int(rng.integers(4))).copy()


def _contours(land: np.ndarray) -> list[np.ndarray]:
    """Coast contours as (row, col) float arrays; the scene border is not coast."""
    found, _ = cv2.findContours(land.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    h, w = land.shape
    out = []
    for c in found:
        rc = c[:, 0, ::-1].astype(np.float64)
        inner = (rc[:, 0] > 0) & (rc[:, 0] < h - 1) & (rc[:, 1] > 0) & (rc[:, 1] < w - 1)
        if inner.any():
            out.append(rc[inner])
    return out


# ----- objects ------------------------------------------------------------------------------------


def _place_objects(size: int, rng, land, nodata, sea_dist_px) -> pd.DataFrame:
    """Positions, kinds, lengths and label attributes of every object of a scene."""
    margin = 20  # px from the scene border and the nodata corner: objects lie wholly on valid sea
    free = ~land & (sea_dist_px >= 4)
    free &= cv2.erode((~nodata).astype(np.uint8), np.ones((2 * margin + 1,) * 2, np.uint8)).astype(bool)
    free[:margin], free[-margin:], free[:, :margin], free[:, -margin:] = False, False, False, False
    near = free & (sea_dist_px <= 190)
    far_pool, near_pool = np.flatnonzero(free & ~near), np.flatnonzero(near)
    n = int(rng.integers(40, 70))
    kinds = rng.choice(["vessel", "fishing", "other"], size=n, p=[0.55, 0.27, 0.18])
    rows = []
    taken = np.zeros((0, 2))

    def pick(pool, min_gap=12.0):
        for _ in range(200):
            idx = pool[int(rng.integers(len(pool)))] if len(pool) else int(rng.integers(size * size))
            rc = np.array(divmod(idx, size), float)
            if not len(taken) or np.min(np.hypot(*(taken - rc).T)) >= min_gap:
                return rc
        return rc

    for kind in kinds:
        pool = near_pool if (rng.random() < 0.3 and len(near_pool)) else far_pool
        rc = pick(pool)
        taken = np.vstack([taken, rc])
        rows.append((*rc, kind, _length(kind, rng)))
    for _ in range(3):  # close pairs of small vessels, 3-6 px apart
        rc = pick(far_pool, 20.0)
        angle = rng.uniform(0, np.pi)
        gap = rng.uniform(3, 6)
        other = np.round(rc + gap * np.array([np.sin(angle), np.cos(angle)]))
        for p in (rc, other):
            taken = np.vstack([taken, p])
            rows.append((*p, "vessel", rng.uniform(20, 35)))
    if rng.random() < 0.7:  # a wind farm: a 3 x 3 grid of turbines, 400-600 m apart
        spacing = rng.uniform(40, 60)
        rc = pick(far_pool, 3 * spacing)
        for dr in range(3):
            for dc in range(3):
                p = np.round(rc + spacing * np.array([dr - 1, dc - 1]))
                if 0 <= p[0] < size and 0 <= p[1] < size and free[int(p[0]), int(p[1])]:
                    taken = np.vstack([taken, p])
                    rows.append((*p, "turbine", rng.uniform(20, 30)))
    objs = pd.DataFrame(rows, columns=["row", "col", "kind", "length_m"])
    objs[["row", "col"]] = objs[["row", "col"]].astype(int)
    objs["distance_from_shore_km"] = sea_dist_px[objs["row"], objs["col"]] * DEMO_GSD / 1000.0
    return _label_attributes(objs, rng)


def _length(kind: str, rng) -> float:
    if kind == "fishing":
        return float(np.exp(rng.uniform(np.log(15), np.log(70))))
    if kind == "other":
        return float(rng.uniform(20, 60))
    return float(np.exp(rng.uniform(np.log(20), np.log(300))))


def _label_attributes(objs: pd.DataFrame, rng) -> pd.DataFrame:
    """Truth plus the label as a noisy xView3 annotator would leave it (unknowns, LOW, unlabelled)."""
    n = len(objs)
    vessel = objs["kind"].isin(["vessel", "fishing"]).to_numpy()
    objs["true_vessel"] = vessel
    objs["true_fishing"] = (objs["kind"] == "fishing").to_numpy()
    is_vessel = vessel.astype(float)
    is_fishing = objs["true_fishing"].to_numpy().astype(float)
    is_fishing[vessel & (rng.random(n) < 0.15)] = np.nan
    unknown = rng.random(n) < 0.08
    is_vessel[unknown], is_fishing[unknown] = np.nan, np.nan
    length = objs["length_m"].round(1).to_numpy()
    length_label = np.where(rng.random(n) < 0.15, np.nan, length)
    objs["is_vessel"], objs["is_fishing"], objs["length_label_m"] = is_vessel, is_fishing, length_label
    objs["confidence"] = rng.choice(["HIGH", "MEDIUM", "LOW"], size=n, p=[0.6, 0.3, 0.1])
    objs["labelled"] = ~(vessel & (rng.random(n) < 0.06))
    return objs


def _render_objects(size: int, objs: pd.DataFrame, rng) -> tuple[np.ndarray, np.ndarray]:
    """Linear-intensity VV and VH images of all objects: soft ellipses blurred by a small PSF."""
    vv = np.zeros((size, size), np.float32)
    vh = np.zeros((size, size), np.float32)
    for row, col, kind, length_m in objs[["row", "col", "kind", "length_m"]].itertuples(index=False):
        length_px = length_m / DEMO_GSD
        width_px = max(length_px / (1.2 if kind in ("other", "turbine") else 5.0), 0.8)
        if kind in ("other", "turbine"):
            peak_db = rng.uniform(6, 14)
        else:
            peak_db = rng.uniform(-1, 5) + 6 * np.log10(length_m / 50)
        shape = _ellipse(length_px, width_px, rng.uniform(0, np.pi))
        half = shape.shape[0] // 2
        r0, c0 = row - half, col - half
        sl = (slice(max(r0, 0), min(r0 + shape.shape[0], size)), slice(max(c0, 0), min(c0 + shape.shape[1], size)))
        part = shape[sl[0].start - r0:sl[0].stop - r0, sl[1].start - c0:sl[1].stop - c0]
        amp = 10.0 ** (peak_db / 10.0) * rng.gamma(20.0, 1 / 20.0)
        vv[sl] += amp * part
        vh[sl] += amp * 10.0 ** (-VH_BELOW_VV_DB["object"] / 10.0) * part
    return vv, vh


def _ellipse(length_px: float, width_px: float, heading: float, oversample: int = 4) -> np.ndarray:
    """An ellipse (length x width px) centred on the centre pixel, pixel coverage by oversampling, blurred by
    the sensor's PSF, peak 1 at the centre: point-symmetric, so the centre is the brightest pixel."""
    half = int(np.ceil(length_px / 2)) + 3
    n = 2 * half + 1
    t = (np.arange(n * oversample) + 0.5) / oversample - half - 0.5
    yy, xx = np.meshgrid(t, t, indexing="ij")
    u = xx * np.cos(heading) + yy * np.sin(heading)
    v = -xx * np.sin(heading) + yy * np.cos(heading)
    a, b = max(length_px / 2, 0.5), max(width_px / 2, 0.4)
    inside = ((u / a) ** 2 + (v / b) ** 2 <= 1).astype(np.float32)
    cover = inside.reshape(n, oversample, n, oversample).mean(axis=(1, 3))
    cover[half, half] = max(cover[half, half], 1.0)
    blurred = cv2.GaussianBlur(cover, (0, 0), 0.7)
    return blurred / blurred[half, half]


def ensure_sar_demo(root=None, n_scenes: int = 3, size: int = 1024, seed: int = 0) -> SarDemo:
    """The built-in point-task demo under `<demo dir>/sar` (generated once; regenerated on a new version)."""
    from lib.cli import demo_dir

    root = Path(root) if root else demo_dir() / "sar"
    marker = root / ".complete"
    stamp = f"{GENERATOR_VERSION} {n_scenes} {size} {seed}\n"
    if marker.is_file() and marker.read_text() == stamp and (root / "objects.geojson").is_file():
        scenes = [root / f"sar{seed}_{i:02d}" for i in range(n_scenes)]
        return SarDemo(root, scenes, root / "labels.csv", root / "shoreline", root / "objects.csv")
    demo = make_sar_demo(root, n_scenes, size, seed)
    marker.write_text(stamp)
    return demo


def ensure_sar_test_scene(root=None, size: int = 1024) -> SarDemo:
    """One more scene drawn with another seed, never used in training or model selection: the demo
    scores on it (`<demo dir>/sar_test`)."""
    from lib.cli import demo_dir

    return ensure_sar_demo(root or demo_dir() / "sar_test", n_scenes=1, size=size, seed=1)


if __name__ == "__main__":  # scripts/demo.sh: `python -m lib.sar_demo` writes the held-out test scene
    print(ensure_sar_test_scene().root)

"""Scenes -> chips on disk: plan every chip window, then write the chips in worker processes.

Every scene is validated and planned (`scene_plan`) before the first chip is written. A scene whose
image or labels cannot be read is reported in one line (`error: ...`) and left out, the other scenes
are written, and the run's summary counts the failures (a rerun retries them; chips already on disk
are skipped). Chips without imagery (valid share under `MIN_VALID_SHARE`: all nodata) are not written.
`mode=buildings` plans one window centred on every building with
`pad` chip pixels around it; `mode=grid` tiles the scene (`lib.windows.window_offsets`, as inference
cuts it). Footprints are looked up with a spatial index and burned once per chip window, so the cost is
linear in the number of buildings (the original pipeline burned every footprint once per building chip).

Every chip also gets an instance-id image, so training can learn where touching buildings meet: each
footprint is burned with its own value (`ChipMasks.burn_ids`, the mask's own rule, `all_touched`) in
label-file order, so where label polygons overlap (common in OSM) the later one wins the shared pixels;
the planner warns once per scene with the number of overlapping pairs. The ids are renumbered 1..K per
chip (file order kept); a chip without buildings gets an all-zero file, so "has an instances file" always
means "prepared by a version that writes them". A rerun over chips written by an older version adds
the missing instance files (the chips themselves are kept).

Workers resolve `init_worker`/`process_batch` by this module's name, so `python dataset.py` (run as
`__main__`) can hand them to a process pool. Layout of the output:

    <out_dir>/<collection>/<scene>/<scale>_<index>.<jpg|png|tif>   image (RGB uint8)
    <out_dir>/<collection>/<scene>/<scale>_<index>_mask.png        0/255 building mask
    <out_dir>/<collection>/<scene>/<scale>_<index>_instances.png   uint16 ids: 0 = none, 1..K = buildings
    <out_dir>/<collection>/<scene>/<scale>_<index>_ignore.png      255 = nodata (only when present)
    <out_dir>/resolutions.json                                     {"<collection>/<scene>": m/px}
"""

from __future__ import annotations

import json
import random
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from lib.cli import progress_bar
from lib.errors import UserError
from lib.files import atomic_path, write_json
from lib.scene_sources import Scene, find_scenes, warn
from lib.windows import window_offsets

MASK_SUFFIX = "_mask.png"
IGNORE_SUFFIX = "_ignore.png"
INSTANCES_SUFFIX = "_instances.png"
RESOLUTIONS_FILE = "resolutions.json"
# A chip with less imagery than this (share of valid, non-nodata pixels) carries no information: a grid
# tile wholly outside a mosaic's footprint would otherwise be written as a negative.
MIN_VALID_SHARE = 0.001
# Two label polygons "overlap" when they share more than this share of the smaller one's area; below it
# the shared sliver is digitising noise (neighbours drawn along one wall), not a duplicated building.
OVERLAP_SHARE = 0.01


@dataclass
class ScenePlan:
    """A validated scene, its footprints in the image CRS, and the chip windows to write."""
    scene: Scene
    geoms: np.ndarray  # shapely geometries in the image CRS
    stretch: np.ndarray | None
    zero_is_nodata: bool
    gsd: float | None
    chips: list[tuple] = field(default_factory=list)  # (name, col_off, row_off, width, height, scale)
    layout: tuple | None = None  # geo_io.band_layout: (RGB band indexes, alpha band), found once per scene


# --- planning: validate every scene and decide every chip window before writing anything ------------


def chip_scales(cfg) -> list[float]:
    """`scale` as a list of positive factors (one value or a list: each scale is a pass over every scene)."""
    from omegaconf import ListConfig

    values = list(cfg.scale) if isinstance(cfg.scale, (list, tuple, ListConfig)) else [cfg.scale]
    scales = [float(s) for s in values]
    if not scales or any(s <= 0 for s in scales):
        raise UserError(f"scale={cfg.scale}: must be positive (1 = native, 2 = half resolution, 0.5 = double)")
    return scales


def scene_plan(scene: Scene, cfg, scales: list[float]) -> ScenePlan:
    """Validate one scene (readable, georeferenced, labels overlapping) and plan its chip windows."""
    import shapely
    from rasterio.enums import Resampling

    from lib.geo_io import (
        band_layout,
        check_readable,
        gdal_reason,
        load_footprints_report,
        open_raster,
        raster_gsd,
        resolve_zero_is_nodata,
        stretch_range,
    )

    with open_raster(scene.image) as ds:
        check_readable(ds, scene.image)
        try:  # a decimated read touches every block, so truncated files fail here, not mid-run
            ds.read(1, out_shape=(min(ds.height, 256), min(ds.width, 256)), resampling=Resampling.nearest)
        except Exception as err:  # noqa: BLE001 - any failure here means unreadable input
            raise UserError(f"{scene.image}: corrupt or truncated raster ({gdal_reason(err, scene.image)})") from None
        if ds.crs is None or ds.transform.is_identity:
            raise UserError(f"{scene.image}: image has no CRS/georeferencing, so its labels cannot be placed; "
                            "use a GeoTIFF with a CRS")
        gdf, report = load_footprints_report(scene.labels, ds.crs)
        if report["repaired"]:
            warn(f"{scene.labels}: repaired {report['repaired']} invalid geometr{'y' if report['repaired'] == 1 else 'ies'}")
        if report["dropped"]:
            warn(f"{scene.labels}: dropped {report['dropped']} empty, zero-area or non-polygon geometr"
                 f"{'y' if report['dropped'] == 1 else 'ies'}")
        geoms = np.asarray(gdf.geometry.values, dtype=object)
        # Degenerate rings (collinear points) survive reprojection with a rounding-error area; anything
        # under 1 % of a pixel is not a building at this resolution.
        tiny = shapely.area(geoms) < 0.01 * abs(ds.transform.a * ds.transform.e - ds.transform.b * ds.transform.d)
        if tiny.any():
            warn(f"{scene.labels}: dropped {int(tiny.sum())} zero-area geometr{'y' if tiny.sum() == 1 else 'ies'}")
            geoms = geoms[~tiny]
        overlaps = overlapping_pairs(geoms)
        if overlaps:
            warn(f"{scene.labels}: {overlaps} pair{'s' if overlaps != 1 else ''} of footprints overlap"
                 f"{'s' if overlaps == 1 else ''}; shared pixels go to the later one")
        bounds = shapely.box(*ds.bounds)
        if len(geoms) and not shapely.intersects(geoms, bounds).any():
            raise UserError(f"{scene.labels}: no footprint overlaps the image {scene.image} "
                            "(wrong label file or CRS?)")
        layout = band_layout(ds, cfg.bands)
        stretch = stretch_range(ds, layout[0], cfg.stretch, *cfg.stretch_percentiles,
                                value_range=tuple(cfg.stretch_range) if cfg.stretch_range else None, layout=layout)
        plan = ScenePlan(scene, geoms, stretch, resolve_zero_is_nodata(cfg.zero_is_nodata, ds, layout),
                         raster_gsd(ds), layout=layout)
        if not len(geoms):
            warn(f"{scene.labels}: no building footprints; {scene.key} yields negative chips only")
        for scale in scales:
            if cfg.mode == "buildings" and len(geoms):
                plan.chips += _building_windows(geoms, ds, scale, cfg.pad, cfg.crop1024)
            else:
                plan.chips += _grid_windows(geoms, ds, scale, cfg, scene.key)
    return plan


def overlapping_pairs(geoms: np.ndarray, share: float = OVERLAP_SHARE) -> int:
    """Pairs of footprints whose intersection exceeds `share` of the smaller one's area (STRtree)."""
    import shapely

    if len(geoms) < 2:
        return 0
    i, j = shapely.STRtree(geoms).query(geoms, predicate="intersects")
    i, j = i[i < j], j[i < j]
    if not len(i):
        return 0
    shared = shapely.area(shapely.intersection(geoms[i], geoms[j]))
    areas = shapely.area(geoms)
    return int((shared > share * np.minimum(areas[i], areas[j])).sum())


def _building_windows(geoms, ds, scale: float, pad: int, crop1024: bool) -> list[tuple]:
    """One window per building: its bounding box plus `pad` chip pixels on each side (vectorised)."""
    import shapely

    b = shapely.bounds(geoms)  # minx, miny, maxx, maxy in the image CRS
    inv = ~ds.transform  # applied by hand: Affine works on scalars, these are arrays

    def to_pixels(x, y):
        return inv.a * x + inv.b * y + inv.c, inv.d * x + inv.e * y + inv.f

    c_a, r_a = to_pixels(b[:, 0], b[:, 3])
    c_b, r_b = to_pixels(b[:, 2], b[:, 1])
    c0, c1 = np.minimum(c_a, c_b), np.maximum(c_a, c_b)
    r0, r1 = np.minimum(r_a, r_b), np.maximum(r_a, r_b)
    inside = (c1 > 0) & (c0 < ds.width) & (r1 > 0) & (r0 < ds.height)
    p = round(pad * scale)
    col0, col1 = np.floor(c0).astype(int) - p, np.ceil(c1).astype(int) + p
    row0, row1 = np.floor(r0).astype(int) - p, np.ceil(r1).astype(int) + p
    if crop1024:  # cap at 1024 chip pixels, centred on the building
        cap = round(1024 * scale)
        for lo, hi in ((col0, col1), (row0, row1)):
            big = hi - lo > cap
            centre = (lo + hi) // 2
            lo[big] = centre[big] - cap // 2
            hi[big] = lo[big] + cap
    # whole output pixels of exactly `scale` source pixels, so the chip grid is the source grid resampled
    width = np.ceil(np.ceil((col1 - col0) / scale - 1e-9) * scale - 1e-9).astype(int)
    height = np.ceil(np.ceil((row1 - row0) / scale - 1e-9) * scale - 1e-9).astype(int)
    return [(f"{scale:g}_{i}", int(col0[i]), int(row0[i]), int(width[i]), int(height[i]), scale)
            for i in np.flatnonzero(inside)]


def _grid_windows(geoms, ds, scale: float, cfg, key: str) -> list[tuple]:
    """Regular tiles covering the scene; tiles without footprints are kept at `negative_ratio`."""
    import shapely
    from rasterio.windows import Window
    from rasterio.windows import bounds as window_bounds

    tile = round(cfg.tile_size * scale)
    stride = max(1, round((cfg.tile_size - cfg.overlap) * scale))
    if cfg.overlap < 0 or cfg.overlap >= cfg.tile_size:
        raise UserError(f"overlap={cfg.overlap}: must be in 0..tile_size-1 ({cfg.tile_size - 1})")
    rows, cols = window_offsets(ds.height, tile, tile - stride), window_offsets(ds.width, tile, tile - stride)
    tree = shapely.STRtree(geoms) if len(geoms) else None
    rng = np.random.default_rng([int(cfg.seed), zlib.crc32(f"{key}@{scale:g}".encode())])
    out = []
    index = 0
    for row in rows:
        for col in cols:
            window = Window(col, row, tile, tile)
            has = tree is not None and len(tree.query(shapely.box(*window_bounds(window, ds.transform)),
                                                       predicate="intersects")) > 0
            if has or rng.random() < cfg.negative_ratio:
                out.append((f"{scale:g}_{index}", col, row, tile, tile, scale))
            index += 1
    if not out and index and cfg.negative_ratio > 0:  # a scene always contributes at least one negative
        pick = int(rng.integers(index))
        row, col = rows[pick // len(cols)], cols[pick % len(cols)]
        out.append((f"{scale:g}_{pick}", col, row, tile, tile, scale))
    return out


# --- writing chips -----------------------------------------------------------------------------------

_WORKER: dict = {}


def init_worker(plans: list[ScenePlan], opts: dict) -> None:
    cv2.setNumThreads(1)
    _WORKER.clear()
    _WORKER.update(plans=plans, opts=opts, datasets={}, trees={})


def process_batch(batch: tuple[int, list[tuple]]) -> dict:
    """Write the chips of one batch (neighbouring chips of one scene); returns counts.

    A read error (a file damaged past the blocks checked while planning) is returned as `error`
    (scene key, one-line message) rather than raised, so the other scenes' batches go on.

    When the chips overlap (dense buildings), the batch's bounding window is read and its footprints
    rasterised once, and every chip is a slice of it; sparse chips are read one by one. Both give the
    same pixels: the grids are aligned.
    """
    plan_idx, _ = batch
    try:
        return _process_batch(batch)
    except UserError as err:
        return {"written": 0, "skipped": 0, "positive": 0, "nodata": 0, "instances_added": 0, "cpu_s": 0.0,
                "error": (_WORKER["plans"][plan_idx].scene.key, str(err))}


def _process_batch(batch: tuple[int, list[tuple]]) -> dict:
    from rasterio.windows import Window

    from lib.geo_io import open_raster, read_window

    started = time.process_time()
    plan_idx, specs = batch
    plan = _WORKER["plans"][plan_idx]
    opts = _WORKER["opts"]
    if plan_idx not in _WORKER["datasets"]:
        _WORKER["datasets"][plan_idx] = open_raster(plan.scene.image)
        _WORKER["trees"][plan_idx] = ChipMasks(plan.geoms, opts["all_touched"])
    ds, masks = _WORKER["datasets"][plan_idx], _WORKER["trees"][plan_idx]
    folder = Path(opts["out_dir"]) / plan.scene.collection / plan.scene.name
    ext = opts["image_format"]
    todo = [s for s in specs if not ((folder / f"{s[0]}.{ext}").exists() and (folder / f"{s[0]}{MASK_SUFFIX}").exists())]
    older = [s for s in specs if s not in todo and not (folder / f"{s[0]}{INSTANCES_SUFFIX}").exists()]
    for name, col, row, width, height, scale in older:
        _add_instances(ds, masks, Window(col, row, width, height), scale, folder / name)
    counts = {"written": 0, "skipped": len(specs) - len(todo), "positive": 0, "nodata": 0,
              "instances_added": len(older), "cpu_s": 0.0}
    if not todo:
        counts["cpu_s"] = time.process_time() - started
        return counts
    c0, r0 = min(s[1] for s in todo), min(s[2] for s in todo)
    c1, r1 = max(s[1] + s[3] for s in todo), max(s[2] + s[4] for s in todo)
    shared = len(todo) > 1 and (c1 - c0) * (r1 - r0) <= sum(s[3] * s[4] for s in todo)
    if shared:
        union = Window(c0, r0, c1 - c0, r1 - r0)
        rgb_all, valid_all = read_window(ds, union, plan.stretch, plan.zero_is_nodata, plan.layout)
        ids_all = masks.burn_ids(ds, union, 1.0) if all(s[5] == 1 for s in todo) else None
    for name, col, row, width, height, scale in todo:
        window = Window(col, row, width, height)
        if shared:
            rows, cols = slice(row - r0, row - r0 + height), slice(col - c0, col - c0 + width)
            rgb, valid = rgb_all[rows, cols], valid_all[rows, cols]
            ids = ids_all[rows, cols].copy() if ids_all is not None else None
        else:
            rgb, valid = read_window(ds, window, plan.stretch, plan.zero_is_nodata, plan.layout)
            ids = None
        if valid.mean() < MIN_VALID_SHARE:
            counts["nodata"] += 1
            continue
        positive = _write_chip(ds, masks, window, scale, rgb, valid, ids, folder / name, opts)
        counts["written"] += 1
        counts["positive"] += positive
    counts["cpu_s"] = time.process_time() - started
    return counts


class ChipMasks:
    """Burns the footprints that intersect a window (found with an STRtree) onto that window's grid.

    Each footprint is burned with its own id (1 + its index in the label file), in file order: rasterio
    replaces earlier values, so the later of two overlapping footprints owns the shared pixels, and the
    building mask is exactly `ids > 0` (the same pixels a union burn gives).
    """
    def __init__(self, geoms: np.ndarray, all_touched: bool):
        import shapely

        self.geoms = geoms
        self.all_touched = all_touched
        self.tree = shapely.STRtree(geoms) if len(geoms) else None

    def burn_ids(self, ds, window, scale: float = 1.0) -> np.ndarray:
        """int32 footprint ids (1 + file index, 0 = none) of `window` resampled by 1/scale (rasterised
        directly on the output grid)."""
        import shapely
        from affine import Affine
        from rasterio.features import rasterize
        from rasterio.windows import bounds as window_bounds

        out_w, out_h = max(1, round(window.width / scale)), max(1, round(window.height / scale))
        transform = ds.window_transform(window) * Affine.scale(window.width / out_w, window.height / out_h)
        hits = np.zeros(0, dtype=int)
        if self.tree is not None:
            hits = np.sort(self.tree.query(shapely.box(*window_bounds(window, ds.transform)), predicate="intersects"))
        if not len(hits):
            return np.zeros((out_h, out_w), dtype=np.int32)
        return rasterize(((self.geoms[k], int(k) + 1) for k in hits), out_shape=(out_h, out_w), transform=transform,
                         fill=0, all_touched=self.all_touched, dtype="int32")


def consecutive_ids(ids: np.ndarray, path: Path) -> np.ndarray:
    """uint16 ids renumbered 1..K in their original order (a chip sees few of a scene's footprints)."""
    present = np.flatnonzero(np.bincount(ids.ravel()))
    present = present[present > 0]
    if len(present) > np.iinfo(np.uint16).max:
        raise UserError(f"{path}: {len(present)} buildings in one chip, more than a uint16 instance image holds; "
                        "use smaller chips")
    lut = np.zeros(int(ids.max()) + 1, dtype=np.uint16)
    lut[present] = np.arange(1, len(present) + 1)
    return lut[ids]


def _add_instances(ds, masks: ChipMasks, window, scale: float, stem: Path) -> None:
    """Write the missing instance ids of a chip an older version wrote, inside the mask already on disk."""
    mask_path = stem.with_name(stem.name + MASK_SUFFIX)
    mask = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE)
    ids = masks.burn_ids(ds, window, scale)
    if mask is None or mask.shape != ids.shape:
        raise UserError(f"{mask_path}: unreadable or not the chip's size; delete the chip and re-run dataset.py")
    ids[mask < 128] = 0  # the mask on disk already excludes nodata
    path = stem.with_name(stem.name + INSTANCES_SUFFIX)
    _imwrite(path, consecutive_ids(ids, path))


def _write_chip(ds, masks: ChipMasks, window, scale: float, rgb: np.ndarray, valid: np.ndarray,
                ids: np.ndarray | None, stem: Path, opts: dict) -> bool:
    """Resample one chip to 1/scale, burn its ids if not given, and write it; True if it has buildings.

    The image is written last: its presence marks a complete chip, which is what resuming checks.
    """
    from affine import Affine

    from lib.geo_io import write_raster

    width, height = int(window.width), int(window.height)
    out_w, out_h = max(1, round(width / scale)), max(1, round(height / scale))
    if (out_w, out_h) != (width, height):
        interp = cv2.INTER_AREA if scale > 1 else cv2.INTER_LINEAR
        rgb = cv2.resize(rgb, (out_w, out_h), interpolation=interp)
        valid = cv2.resize(valid.astype(np.uint8), (out_w, out_h), interpolation=cv2.INTER_NEAREST) > 0
    if ids is None:
        ids = masks.burn_ids(ds, window, scale)
    ids[~valid] = 0  # nodata is never "building"; the ignore file tells training to skip it
    instances_path = stem.with_name(stem.name + INSTANCES_SUFFIX)
    ids = consecutive_ids(ids, instances_path)
    mask = (ids > 0).astype(np.uint8)
    stem.parent.mkdir(parents=True, exist_ok=True)
    _imwrite(stem.with_name(stem.name + MASK_SUFFIX), mask * 255)
    _imwrite(instances_path, ids)
    ignore_path = stem.with_name(stem.name + IGNORE_SUFFIX)
    if not valid.all():
        _imwrite(ignore_path, (~valid).astype(np.uint8) * 255)
    elif ignore_path.exists():
        ignore_path.unlink()
    image_path = stem.with_name(f"{stem.name}.{opts['image_format']}")
    if opts["image_format"] == "tif":
        transform = ds.window_transform(window) * Affine.scale(width / out_w, height / out_h)
        profile = {"driver": "GTiff", "crs": ds.crs, "transform": transform, "compress": "deflate",
                   "photometric": "RGB"}
        write_raster(image_path, np.moveaxis(rgb, -1, 0), profile)
    else:
        _imwrite(image_path, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), opts["jpeg_quality"])
    return bool(mask.any())


def _imwrite(path: Path, array: np.ndarray, jpeg_quality: int = 95) -> None:
    params = [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)] if path.suffix == ".jpg" else []
    with atomic_path(path) as tmp:
        if not cv2.imwrite(str(tmp), array, params):
            raise UserError(f"{path}: could not write the chip (disk full or folder not writable?)")


def chip_batches(plans: list[ScenePlan], cfg) -> list[tuple[int, list[tuple]]]:
    """All chips, optionally shuffled and capped at `max_samples`, grouped into batches of neighbours.

    Chips are ordered along 512-pixel strips of their scene so that a batch covers a compact area
    (overlapping chips are then read and rasterised once per batch).
    """
    chips = [(i, spec) for i, plan in enumerate(plans) for spec in plan.chips]
    if cfg.shuffle:
        random.Random(int(cfg.seed)).shuffle(chips)
    if cfg.max_samples:
        chips = chips[: int(cfg.max_samples)]
    by_scene: dict[int, list[tuple]] = {}
    for i, spec in chips:
        by_scene.setdefault(i, []).append(spec)
    size = max(1, int(cfg.batch_chips))
    out = []
    for i, specs in by_scene.items():
        specs.sort(key=lambda s: (s[5], (s[2] + s[4] // 2) // 512, s[1] + s[3] // 2))
        out += [(i, specs[k:k + size]) for k in range(0, len(specs), size)]
    return out


def _map_batches(batches, plans, opts, workers: int):
    """Batches in worker processes (`num_workers` > 1) or inline; results as they complete."""
    if workers <= 1:
        init_worker(plans, opts)
        try:
            yield from map(process_batch, batches)
        finally:
            close_worker()
        return
    import multiprocessing as mp

    # forkserver: workers start from a clean process, never from a copy of this one with OpenCV or GDAL
    # threads holding locks (forking those deadlocks); the server preloads the libraries once so each
    # worker starts in milliseconds. Plans are pickled to each worker once.
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["lib.chip_writer", "lib.geo_io", "rasterio", "shapely"])
    else:
        ctx = mp.get_context("spawn")
    # Contiguous runs of neighbouring batches per worker keep each process's GDAL block cache useful.
    chunk = max(1, len(batches) // (workers * 8))
    with ctx.Pool(workers, initializer=init_worker, initargs=(plans, opts)) as pool:
        yield from pool.imap_unordered(process_batch, batches, chunksize=chunk)


def close_worker() -> None:
    for ds in _WORKER.get("datasets", {}).values():
        ds.close()
    _WORKER.clear()


def update_resolutions(out_dir: Path, gsds: dict) -> None:
    path = out_dir / RESOLUTIONS_FILE
    current = {}
    if path.exists():
        try:
            current = json.loads(path.read_text())
        except json.JSONDecodeError:
            current = {}
    merged = {**current, **{k: round(float(v), 6) for k, v in gsds.items()}}
    if merged != current:
        write_json(path, dict(sorted(merged.items())))


def write_chips(cfg) -> dict:
    """Find, validate and plan every scene of `cfg`, then write the chips; returns counts.

    Chips that already exist are skipped (resume after an interruption); `resolutions.json` gets the
    GSD of every planned scene before the first chip is written. `failed` lists one line per scene
    that could not be read (printed as it is found); those scenes are left out.
    """
    out_dir = Path(cfg.out_dir)
    scales = chip_scales(cfg)
    failures: list[str] = []
    scenes = find_scenes(cfg, failures)
    for message in failures:
        _report(message)
    plans = []
    for scene in scenes:
        try:
            plans.append(scene_plan(scene, cfg, scales))
        except UserError as err:
            failures.append(_report(str(err)))
    batches = chip_batches(plans, cfg)
    total = sum(len(specs) for _, specs in batches)
    update_resolutions(out_dir, {p.scene.key: p.gsd for p in plans if p.gsd})
    opts = {"out_dir": str(out_dir), "image_format": cfg.image_format, "all_touched": bool(cfg.all_touched),
            "jpeg_quality": int(cfg.jpeg_quality)}
    counts = {"written": 0, "skipped": 0, "positive": 0, "nodata": 0, "instances_added": 0, "cpu_s": 0.0}
    broken: set[str] = set()  # scenes whose chips failed to read while writing (reported once each)
    workers = min(int(cfg.num_workers or 0), len(batches))
    with progress_bar(total=total, unit="chip", desc="chips", disable=not cfg.progress) as bar:
        for result in _map_batches(batches, plans, opts, workers):
            for k in counts:
                counts[k] += result[k]
            if "error" in result and result["error"][0] not in broken:
                broken.add(result["error"][0])
                failures.append(_report(result["error"][1]))
            bar.update(result["written"] + result["skipped"] + result["nodata"])
    return {"out_dir": out_dir, "scenes": len(plans) - len(broken), "chips": total, "failed": failures, **counts}


def _report(message: str) -> str:
    print(f"error: {message} (scene skipped)", file=sys.stderr, flush=True)
    return message

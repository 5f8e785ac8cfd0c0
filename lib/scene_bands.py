"""One large scene shared among the ranks of a `torchrun` job in bands of rows, and the bands merged.

Under `torchrun --nproc_per_node=N` (or several nodes) the work is a list of units: whole images,
and the bands of rows of each scene with at least `split_windows` x N windows, cut by
`Engine.band_rows` into N bands at window-row starts (each band computes every window touching its
rows, so its rows equal the same rows of a whole-scene run). Units go to ranks largest first, each
to the least-loaded rank (`share`), so a city mosaic keeps every rank busy and small images fill in.

Each rank writes each of its bands as a partial file in the run folder,

    <run>/.bands/<stem>/<r0>-<r1>.tif    3 bands uint8: probability 0-255, mask 0/1, valid 0/1
                                         (+ border, contact 0-255 for models with the instance head)
    <run>/.bands/<stem>/<r0>-<r1>.json   the image's settings fingerprint, rows, rank, windows, figures
                                         and the blocks as the engine handed them over

atomically, the JSON last: a band with its JSON is finished, so a rerun after a kill computes only
the bands that are missing (or were made with other settings). After every rank is done, each split
scene is merged by one rank (`replay`): the blocks of its bands are fed, in order, through the usual
`SceneWriter` and `Polygonizer`, so the probability and mask COGs and the footprints are those of a
single-process run -- the same blocks in the same order -- and the band folder is removed.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.windows import Window

from lib import geo_io
from lib.files import AbortOnError, atomic_path, write_json
from lib.image_sources import ImageInput
from lib.raster_outputs import DRAFT_ZLEVEL, instance_u8, quantize
from lib.segmentation import BUILDING
from lib.tiling import SceneStats
from lib.windows import window_offsets, windows_touching

BANDS_DIR = ".bands"


@dataclass(frozen=True)
class Unit:
    """A share of the work: a whole image (`band` None) or one band of rows of a split one."""

    image: ImageInput
    cost: int  # windows to compute
    band: tuple[int, int] | None = None

    @property
    def key(self) -> tuple:
        return self.image.stem, self.band or (0, 0)


def window_grid(eng, height: int, width: int) -> tuple[list[int], int, int]:
    """(window row offsets, window height, number of window columns) of a scene, as the engine cuts it."""
    eh, ew = min(eng.tile_size, height), min(eng.tile_size, width)
    return window_offsets(height, eh, eng.overlap), eh, len(window_offsets(width, ew, eng.overlap))


def plan(images: list[ImageInput], shapes: list[tuple[int, int]] | None, eng, world: int,
         split_windows: int) -> list[Unit]:
    """Every image as one unit, except scenes with at least `split_windows` x `world` windows: one
    unit per band of `Engine.band_rows(height, world)`. Without torchrun (world 1) nothing is split."""
    if world <= 1:
        return [Unit(image, 0) for image in images]
    units = []
    for image, (h, w) in zip(images, shapes):
        offsets, eh, cols = window_grid(eng, h, w)
        windows = len(offsets) * cols
        bands = eng.band_rows(h, world) if split_windows and windows >= split_windows * world else []
        if len(bands) < 2:
            units.append(Unit(image, windows))
            continue
        units += [Unit(image, len(windows_touching(offsets, eh, *b)) * cols, tuple(b)) for b in bands]
    return units


def share(items: list, costs: list[int], keys: list, rank: int, world: int) -> list:
    """This rank's items: largest first, each to the least-loaded rank (ties: lowest rank), in key order.

    Every rank computes the same assignment from the same list, so no communication is needed."""
    if world <= 1:
        return list(items)
    load = [0] * world
    mine = []
    for cost, key, item in sorted(zip(costs, keys, items), key=lambda t: (-t[0], t[1])):
        owner = min(range(world), key=lambda r: (load[r], r))
        load[owner] += cost
        if owner == rank:
            mine.append((key, item))
    return [item for _, item in sorted(mine, key=lambda t: t[0])]


def split_images(units: list[Unit]) -> dict[str, list[tuple[int, int]]]:
    """stem -> its bands, for the images the plan splits (stems in name order)."""
    out: dict[str, list] = {}
    for u in units:
        if u.band is not None:
            out.setdefault(u.image.stem, []).append(u.band)
    return {s: sorted(out[s]) for s in sorted(out)}


def band_dir(run_dir, stem: str) -> Path:
    return Path(run_dir) / BANDS_DIR / stem


def band_paths(run_dir, stem: str, band: tuple[int, int]) -> tuple[Path, Path]:
    base = band_dir(run_dir, stem) / f"{band[0]}-{band[1]}"
    return base.with_suffix(".tif"), base.with_suffix(".json")


def finished_band(run_dir, stem: str, band: tuple[int, int], fingerprint: str) -> dict | None:
    """The record of a band finished with these settings, or None (missing, partial, other settings)."""
    tif, meta_path = band_paths(run_dir, stem, band)
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    if meta.get("fingerprint") != fingerprint or tuple(meta.get("rows", ())) != tuple(band) or not tif.is_file():
        return None
    return meta


def remove_bands(run_dir, stem: str) -> None:
    """Drop a scene's partial files (merged, or made obsolete by a whole-scene run)."""
    folder = band_dir(run_dir, stem)
    if folder.exists():
        shutil.rmtree(folder, ignore_errors=True)
    try:
        folder.parent.rmdir()  # the last scene's bands: no empty .bands folder left behind
    except OSError:
        pass


class BandWriter(AbortOnError):
    """Sink for `Engine.predict(src, rows=band)`: each block quantised as `SceneWriter` does it, written
    to the band's partial raster and listed; `commit` renames the raster, then writes the JSON."""

    def __init__(self, run_dir, stem: str, band: tuple[int, int], width: int, threshold: float,
                 instance: bool = False):
        self.tif, self.meta_path = band_paths(run_dir, stem, band)
        self.band, self.threshold, self.instance = tuple(band), threshold, bool(instance)
        self._atomic = atomic_path(self.tif)
        tmp = self._atomic.__enter__()
        profile = {"driver": "GTiff", "width": width, "height": band[1] - band[0], "count": 5 if instance else 3,
                   "dtype": "uint8",
                   "tiled": True, "blockxsize": 512, "blockysize": 512, "compress": "deflate", "zlevel": DRAFT_ZLEVEL}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            self._ds = rasterio.open(tmp, "w", **profile)
        self.blocks: list[list[int]] = []
        self.start = time.perf_counter()

    def add(self, block) -> None:
        prob_u8, mask = quantize(block.maps[BUILDING], block.valid, self.threshold)
        h, w = prob_u8.shape
        layers = [prob_u8, mask.astype(np.uint8), block.valid.astype(np.uint8)]
        if self.instance:
            layers += list(instance_u8(block))
        data = np.stack(layers)
        with geo_io.GDAL_LOCK:  # the engine's reader threads use GDAL at the same time
            self._ds.write(data, window=Window(block.col_off, block.row_off - self.band[0], w, h))
        self.blocks.append([block.row_off, block.col_off, h, w])

    def commit(self, stats: SceneStats, fingerprint: str, rank: int, precision: str) -> dict:
        self._ds.close()
        self._atomic.__exit__(None, None, None)
        meta = {"fingerprint": fingerprint, "rows": list(self.band), "rank": rank, "windows": stats.windows,
                "skipped": stats.skipped, "precision": precision,
                "scores": {k: None if math.isnan(v) else v for k, v in stats.scores.items()},
                "map_max": dict(stats.map_max), "seconds": round(time.perf_counter() - self.start, 3),
                "blocks": self.blocks, "instance": self.instance}
        write_json(self.meta_path, meta)
        return meta

    def abort(self) -> None:
        if not self._ds.closed:
            self._ds.close()
        self._atomic.__exit__(RuntimeError, RuntimeError("aborted"), None)


def replay(run_dir, stem: str, metas: list[dict], writer) -> SceneStats:
    """Write the bands' blocks, in order, through `writer` (a SceneWriter, with its polygonizer): the
    same blocks in the same order as a single-process run. Returns the scene's figures."""
    for meta in sorted(metas, key=lambda m: m["rows"][0]):
        r0 = meta["rows"][0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            ds = rasterio.open(band_paths(run_dir, stem, tuple(meta["rows"]))[0])
        with ds:
            for row_off, col_off, h, w in meta["blocks"]:
                prob, mask, valid, *instance = ds.read(window=Window(col_off, row_off - r0, w, h))
                maps = dict(zip(("border_u8", "contact_u8"), instance))  # {} without the instance head
                writer.write(row_off, prob, mask.astype(bool), col_off, valid=valid.astype(bool), **maps)
    return merged_stats(metas)


def merged_stats(metas: list[dict]) -> SceneStats:
    """Windows and nodata windows summed over the bands (windows on a seam count once per band),
    scores and map maxima the maximum over them."""
    stats = SceneStats(windows=sum(m["windows"] for m in metas), skipped=sum(m["skipped"] for m in metas))
    for m in metas:
        for k, v in m["scores"].items():
            old = stats.scores.get(k, float("nan"))
            stats.scores[k] = old if v is None else v if math.isnan(old) else max(old, v)
        for k, v in m["map_max"].items():
            stats.map_max[k] = max(stats.map_max.get(k, 0.0), v)
    return stats


def windows_per_rank(metas: list[dict]) -> dict[str, int]:
    """`{"0": 40, "1": 41}`: windows the model ran on, per rank (in whichever run made each band)."""
    out: dict[str, int] = {}
    for m in metas:
        out[str(m["rank"])] = out.get(str(m["rank"]), 0) + m["windows"]
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


def precision_of(metas: list[dict]) -> str:
    return "+".join(sorted({p for m in metas for p in m["precision"].split("+")}))

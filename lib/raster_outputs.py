"""The segmentation task's rasters: probability + mask GeoTIFFs written by Window, atomically, with footprints.

`SceneWriter` is the sink the tiling engine hands finished blocks to (inference), and the writer of
averaged maps (combine_images), so both write the same files: uint8 probability (0-255) and mask
(0/255) aligned with the source, tagged with their provenance, Cloud-Optimized when georeferenced.

Nodata: with `nodata_mask` the rasters carry an internal mask band (GDAL per-dataset mask, kept by the
COG layout and its overviews) that is 0 where the input had no imagery (alpha, nodata value, mask). GIS
software (QGIS, GDAL, rasterio's `dataset_mask()`) shows those pixels as transparent, while a
probability of 0 stays a valid value -- a nodata *value* could not tell the two apart in uint8.

Instance maps (models with the instance head): with `instance_path` a third raster holds the border
and contact probabilities (2 bands uint8 0-255, same grid and nodata mask), so combine_images can
average them; the polygonizer (lib.instances.InstancePolygonizer) gets them with each block.
"""

from __future__ import annotations

import contextlib
import math
import os
import uuid
import warnings
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil
import torch
from rasterio.windows import Window

from lib import geo_io
from lib.errors import UserError
from lib.files import AbortOnError, atomic_path
from lib.footprints import Polygonizer
from lib.instances import InstancePolygonizer
from lib.segmentation import BORDER, BUILDING, CONTACT


def raster_profile(src_ds, georeferenced: bool | None = None) -> dict:
    """uint8 single-band profile aligned with the source; plain (non-georeferenced) images stay plain."""
    profile = geo_io.output_profile(src_ds)
    if georeferenced is None:
        georeferenced = src_ds.crs is not None
    if not georeferenced:
        profile.pop("crs", None)
        profile.pop("transform", None)
    return profile


def quantize(prob: torch.Tensor, valid: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Probability (0..1, any device) -> (uint8 0-255 map, bool mask at `threshold`), computed on the device.

    Nodata pixels are never building, whatever the threshold.
    """
    mask = (prob >= threshold) & torch.from_numpy(np.ascontiguousarray(valid)).to(prob.device)
    return to_u8(prob), mask.cpu().numpy()


def to_u8(prob: torch.Tensor) -> np.ndarray:
    """Probability (0..1, any device) -> uint8 0-255 map (every map is written in these units)."""
    return (prob.clamp(0, 1) * 255.0).round().to(torch.uint8).cpu().numpy()


def instance_u8(block) -> tuple[np.ndarray | None, np.ndarray | None]:
    """A block's border and contact maps as uint8 (None, None for models without the instance head)."""
    if BORDER not in block.maps:
        return None, None
    return to_u8(block.maps[BORDER]), to_u8(block.maps[CONTACT])


MEMORY_DRAFT_PX = 4096 * 4096  # a COG scene up to this many pixels is drafted in memory (~16 MB a raster)
DRAFT_ZLEVEL = 1  # DEFLATE level of files that are rewritten (COG, torchrun bands): several times faster than 6
COG_LEVELS = range(1, 10)  # DEFLATE levels of the COGs (`cog_level`)
# A COG whose longer side is at most this gets no overviews: a viewer shows it whole from at most 4 x 4
# blocks of 512^2, and on a 1024^2 tile the overview level was more than half of the COG's CPU.
OVERVIEW_MIN_SIDE = 2048
BAND_DESCRIPTIONS = (("building probability (0-255)",), ("building mask (0/255)",),
                     ("building border probability (0-255)", "building contact probability (0-255)"))


def footprint_polygonizer(height: int, width: int, sink=None, *, instance: bool, seed_threshold: float,
                          seed_min_area: float, gsd: float | None):
    """The polygonizer of a scene's footprints: one per instance (seeds + watershed on the border and
    contact maps, lib.instances) with `instance`, else one per connected component of the mask.
    `seed_min_area` is m^2 with a GSD (m/px), pixels without one."""
    if not instance:
        return Polygonizer(height, width, sink=sink)
    return InstancePolygonizer(height, width, sink, seed_threshold=seed_threshold,
                               seed_min_px=seed_min_px(seed_min_area, gsd))


def seed_min_px(area: float, gsd: float | None) -> int:
    """A seed's least size in pixels: `area` m^2 over the pixel's ground area (`area` px without a GSD)."""
    px = float(area) / (gsd * gsd) if gsd else float(area)
    return max(1, math.ceil(px - 1e-6))


class SceneWriter(AbortOnError):
    """Write one scene's probability and mask rasters block by block, then footprints; commit atomically.

    Files are written to temporary names beside their targets and renamed only by `commit()`, so an
    interrupted run never leaves a file that a resumed run would take as finished.
    """

    def __init__(self, prob_path, mask_path, profile: dict, tags: dict | None = None, *, cog: bool = True,
                 polygonizer=None, threshold: float = 0.5, nodata_mask: bool = False, instance_path=None,
                 cog_level: int = 1):
        self.targets = [Path(prob_path), Path(mask_path)] + ([Path(instance_path)] if instance_path else [])
        self.instance = instance_path is not None
        self.profile = dict(profile)
        self.georef = "crs" in profile and profile.get("crs") is not None
        self.cog = cog and self.georef
        self.cog_level = int(cog_level)
        self.tags = {k: str(v) for k, v in (tags or {}).items()}
        self.polygonizer = polygonizer
        self.threshold = threshold
        self.nodata_mask = nodata_mask
        self._stack = contextlib.ExitStack()
        self._tmps = [self._stack.enter_context(atomic_path(t)) for t in self.targets]
        self.in_memory = self.cog and self.profile["height"] * self.profile["width"] <= MEMORY_DRAFT_PX
        self._drafts = self._draft_paths()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            self._dsts = [rasterio.open(t, "w", **{**self.profile, "count": 2 if i == 2 else 1, **self._draft_options()})
                          for i, t in enumerate(self._drafts)]
        self.pixels_written = 0

    def _draft_paths(self) -> list:
        """Where the blocks are written: the files themselves, or for a COG the drafts it is rewritten from
        at commit -- in GDAL's memory for a scene of at most MEMORY_DRAFT_PX (no compression to undo: a
        third less CPU per 1024^2 raster), else beside the targets (a city's drafts would not fit in memory)."""
        if not self.in_memory:
            return list(self._tmps)
        return [f"/vsimem/buildings-{uuid.uuid4().hex}-{t.name}" for t in self._tmps]

    def _draft_options(self) -> dict:
        if self.in_memory:
            return {"compress": "none"}
        # a COG is rewritten from these files at commit: fast compression is enough for them
        deflate = self.cog and str(self.profile.get("compress", "")).lower() == "deflate"
        return {"zlevel": DRAFT_ZLEVEL} if deflate else {}

    def add(self, block) -> None:
        """Sink for the tiling engine: quantise a finished block's building map at `threshold` and write it."""
        prob_u8, mask = quantize(block.maps[BUILDING], block.valid, self.threshold)
        border_u8, contact_u8 = instance_u8(block)
        self.write(block.row_off, prob_u8, mask, block.col_off, valid=block.valid, border_u8=border_u8,
                   contact_u8=contact_u8)

    def write(self, row_off: int, prob_u8: np.ndarray, mask: np.ndarray, col_off: int = 0,
              valid: np.ndarray | None = None, border_u8: np.ndarray | None = None,
              contact_u8: np.ndarray | None = None) -> None:
        """Write a block; with `nodata_mask`, `valid` (None: all valid) goes into every raster's mask.

        `border_u8`/`contact_u8` (instance maps, uint8 0-255) go to the instance raster, if any, and
        to the polygonizer."""
        h, w = prob_u8.shape
        window = Window(col_off, row_off, w, h)
        if self.instance and (border_u8 is None or contact_u8 is None):
            raise ValueError("this writer has an instance raster: blocks need border_u8 and contact_u8")
        # the engine's reader threads use GDAL at the same time (geo_io.GDAL_LOCK); the polygonizer's GDAL
        # calls work on in-memory rasters of their own, as COGs and vector files are written beside reads
        with geo_io.GDAL_LOCK:
            self._dsts[0].write(prob_u8, 1, window=window)
            self._dsts[1].write(mask.astype(np.uint8) * np.uint8(255), 1, window=window)
            if self.instance:
                self._dsts[2].write(np.stack([border_u8, contact_u8]), window=window)
            if self.nodata_mask:
                m = np.full((h, w), 255, np.uint8) if valid is None else valid.astype(np.uint8) * np.uint8(255)
                for dst in self._dsts:
                    dst.write_mask(m, window=window)
        if self.polygonizer is not None:
            if border_u8 is None:
                self.polygonizer.add(row_off, mask, prob_u8, col_off)
            else:
                self.polygonizer.add(row_off, mask, prob_u8, col_off, border_u8=border_u8, contact_u8=contact_u8)
        self.pixels_written += h * w

    def commit(self) -> None:
        """Finish files (tags, COG layout) and rename them over their targets."""
        try:
            total = self.profile["height"] * self.profile["width"]
            if self.pixels_written != total:
                raise RuntimeError(f"wrote {self.pixels_written} of {total} pixels")
            for dst, descriptions in zip(self._dsts, BAND_DESCRIPTIONS):
                dst.update_tags(**self.tags)
                for band, text in enumerate(descriptions, 1):
                    dst.set_band_description(band, text)
                dst.close()
            if self.cog:
                overviews = max(self.profile["height"], self.profile["width"]) > OVERVIEW_MIN_SIDE
                # a scene drafted in memory is finished beside the next image's model call: one thread spends
                # a third less CPU than GDAL's pool; a large scene's rewrite has the machine to itself
                threads = 1 if self.in_memory else "ALL_CPUS"
                for draft, tmp, resampling in zip(self._drafts, self._tmps, ("average", "nearest", "average")):
                    to_cog(draft, tmp, resampling, self.cog_level, overviews=overviews, threads=threads)
            self._drop_memory_drafts()
            self._stack.close()  # renames the temporary files over the targets
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        for dst in self._dsts:
            if not dst.closed:
                dst.close()
        self._drop_memory_drafts()
        self._stack.__exit__(RuntimeError, RuntimeError("aborted"), None)

    def _drop_memory_drafts(self) -> None:
        if self.in_memory:
            for draft in self._drafts:
                with contextlib.suppress(rasterio.errors.RasterioIOError):
                    rasterio.shutil.delete(draft)


def check_settings(cfg) -> None:
    """Raster output settings, checked before any work."""
    if cfg.cog_level not in COG_LEVELS:
        raise UserError(f"cog_level must be 1 (fastest) .. 9 (smallest), not {cfg.cog_level}")


def to_cog(draft, path: Path, resampling: str, level: int = 1, *, overviews: bool = True,
           threads: int | str = "ALL_CPUS") -> None:
    """Write the GeoTIFF `draft` (a file, or a /vsimem/ one) as a Cloud-Optimized GeoTIFF at `path`
    (streamed by GDAL, same values); `draft` may be `path` itself, which is then rewritten in place.

    `level` is the DEFLATE level: on 7.5 cm drone maps level 1 took a third of level 6's CPU for files
    about 8 % larger, and this runs beside the model, so 1 is the default. `overviews` (made with
    `resampling`) as GDAL's COG driver plans them, or none; `threads` compress (GDAL's NUM_THREADS)."""
    from rasterio.shutil import copy as rio_copy

    tmp = path.with_name(path.name + ".cog.tif")
    try:
        rio_copy(str(draft), tmp, driver="COG", compress="DEFLATE", level=level, overview_resampling=resampling,
                 overviews="AUTO" if overviews else "NONE", blocksize=512, num_threads=threads)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()

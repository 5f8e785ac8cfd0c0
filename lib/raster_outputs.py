"""The segmentation task's rasters: probability + mask GeoTIFFs written by Window, atomically, with footprints.

`SceneWriter` is the sink the tiling engine hands finished blocks to (inference), and the writer of
averaged maps (combine_images), so both write the same files: uint8 probability (0-255) and mask
(0/255) aligned with the source, tagged with their provenance, Cloud-Optimized when georeferenced.

Nodata: with `nodata_mask` the rasters carry an internal mask band (GDAL per-dataset mask, kept by the
COG layout and its overviews) that is 0 where the input had no imagery (alpha, nodata value, mask). GIS
software (QGIS, GDAL, rasterio's `dataset_mask()`) shows those pixels as transparent, while a
probability of 0 stays a valid value -- a nodata *value* could not tell the two apart in uint8.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path

import numpy as np
import rasterio
import torch
from rasterio.windows import Window

from lib import geo_io
from lib.files import AbortOnError, atomic_path
from lib.segmentation import BUILDING


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
    prob_u8 = (prob.clamp(0, 1) * 255.0).round().to(torch.uint8)
    mask = (prob >= threshold) & torch.from_numpy(np.ascontiguousarray(valid)).to(prob.device)
    return prob_u8.cpu().numpy(), mask.cpu().numpy()


class SceneWriter(AbortOnError):
    """Write one scene's probability and mask rasters block by block, then footprints; commit atomically.

    Files are written to temporary names beside their targets and renamed only by `commit()`, so an
    interrupted run never leaves a file that a resumed run would take as finished.
    """

    def __init__(self, prob_path, mask_path, profile: dict, tags: dict | None = None, *, cog: bool = True,
                 polygonizer=None, threshold: float = 0.5, nodata_mask: bool = False):
        self.targets = [Path(prob_path), Path(mask_path)]
        self.profile = dict(profile)
        self.georef = "crs" in profile and profile.get("crs") is not None
        self.cog = cog and self.georef
        self.tags = {k: str(v) for k, v in (tags or {}).items()}
        self.polygonizer = polygonizer
        self.threshold = threshold
        self.nodata_mask = nodata_mask
        self._stack = contextlib.ExitStack()
        self._tmps = [self._stack.enter_context(atomic_path(t)) for t in self.targets]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            self._dsts = [rasterio.open(t, "w", **self.profile) for t in self._tmps]
        self.pixels_written = 0

    def add(self, block) -> None:
        """Sink for the tiling engine: quantise a finished block's building map at `threshold` and write it."""
        prob_u8, mask = quantize(block.maps[BUILDING], block.valid, self.threshold)
        self.write(block.row_off, prob_u8, mask, block.col_off, valid=block.valid)

    def write(self, row_off: int, prob_u8: np.ndarray, mask: np.ndarray, col_off: int = 0,
              valid: np.ndarray | None = None) -> None:
        """Write a block; with `nodata_mask`, `valid` (None: all valid) goes into both rasters' masks."""
        h, w = prob_u8.shape
        window = Window(col_off, row_off, w, h)
        with geo_io.GDAL_LOCK:  # the engine's reader threads use GDAL at the same time
            self._dsts[0].write(prob_u8, 1, window=window)
            self._dsts[1].write(mask.astype(np.uint8) * np.uint8(255), 1, window=window)
            if self.nodata_mask:
                m = np.full((h, w), 255, np.uint8) if valid is None else valid.astype(np.uint8) * np.uint8(255)
                for dst in self._dsts:
                    dst.write_mask(m, window=window)
            if self.polygonizer is not None:
                self.polygonizer.add(row_off, mask, prob_u8, col_off)
        self.pixels_written += h * w

    def commit(self) -> None:
        """Finish files (tags, COG layout) and rename them over their targets."""
        try:
            total = self.profile["height"] * self.profile["width"]
            if self.pixels_written != total:
                raise RuntimeError(f"wrote {self.pixels_written} of {total} pixels")
            for i, dst in enumerate(self._dsts):
                dst.update_tags(**self.tags)
                if i == 0:
                    dst.set_band_description(1, "building probability (0-255)")
                else:
                    dst.set_band_description(1, "building mask (0/255)")
                dst.close()
            if self.cog:
                for tmp, resampling in zip(self._tmps, ("average", "nearest")):
                    to_cog(tmp, resampling)
            self._stack.close()  # renames the temporary files over the targets
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        for dst in self._dsts:
            if not dst.closed:
                dst.close()
        self._stack.__exit__(RuntimeError, RuntimeError("aborted"), None)


def to_cog(path: Path, resampling: str) -> None:
    """Rewrite a strip-written GeoTIFF as a Cloud-Optimized GeoTIFF (streamed by GDAL, same values)."""
    from rasterio.shutil import copy as rio_copy

    tmp = path.with_name(path.name + ".cog.tif")
    try:
        rio_copy(path, tmp, driver="COG", compress="DEFLATE", overview_resampling=resampling, blocksize=512)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()

"""Images the tiling engine reads window by window: a raster file, or an array in memory.

A source has `height`, `width`, `gsd` (metres per pixel or None), `read(row, col, h, w)` ->
(RGB uint8 [h, w, 3] with nodata set to 0, valid bool [h, w]), `reopen()` (a handle for another
reading thread) and `close()`.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import rasterio
from rasterio.windows import Window

from lib import geo_io


class RasterSource:
    """A georeferenced (or plain) image read by windows with the data-preparation rules."""

    def __init__(self, path: str | os.PathLike, stretch: str = geo_io.STRETCH_PERCENTILE, stretch_low: float = 2,
                 stretch_high: float = 98, stretch_range=None, zero_is_nodata: bool = False):
        self.path = Path(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            self.ds = geo_io.open_raster(self.path)
        geo_io.check_readable(self.ds, self.path)
        bands, _ = geo_io.band_layout(self.ds)
        value_range = tuple(stretch_range) if stretch_range is not None else None
        self.stretch = geo_io.stretch_range(self.ds, bands, stretch, stretch_low, stretch_high, value_range)
        self.zero_is_nodata = zero_is_nodata
        self.height, self.width = self.ds.height, self.ds.width
        self.gsd = geo_io.raster_gsd(self.ds)

    def read(self, row: int, col: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        return geo_io.read_window(self.ds, Window(col, row, w, h), self.stretch, self.zero_is_nodata)

    def reopen(self) -> RasterSource:
        """Another handle on the same image with the same stretch (one per reading thread)."""
        other = object.__new__(RasterSource)
        other.__dict__.update(self.__dict__)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            other.ds = rasterio.open(self.path)
        return other

    def close(self) -> None:
        self.ds.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ArraySource:
    """An in-memory RGB uint8 image (validation, tests) with an optional valid mask."""

    def __init__(self, rgb: np.ndarray, valid: np.ndarray | None = None, gsd: float | None = None):
        self.rgb = np.ascontiguousarray(rgb)
        self.valid = np.ones(rgb.shape[:2], bool) if valid is None else valid.astype(bool)
        self.height, self.width = rgb.shape[:2]
        self.gsd = gsd

    def read(self, row: int, col: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        rgb = self.rgb[row:row + h, col:col + w].copy()
        valid = self.valid[row:row + h, col:col + w].copy()
        rgb[~valid] = 0
        return rgb, valid

    def reopen(self) -> ArraySource:
        return self

    def close(self) -> None:
        pass

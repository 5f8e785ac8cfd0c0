"""SAR scenes: reading Sentinel-1 dB rasters, the sigmoid normalisation to uint8, and the engine's source.

A scene is either an xView3 scene folder, `<scene_id>/VV_dB.tif` + `VH_dB.tif` (float32 backscatter
in dB, nodata -32768; NaN is nodata too; extra channels such as `bathymetry.tif` by name through
`channels=`), a GeoTIFF whose float bands are those channels in order, or a scene prepared by
`dataset.py task=points`: a uint8 GeoTIFF already normalised by `normalize_db`, 0 = nodata.

Training chips and inference windows go through the same `normalize_db`, so the model sees the same
numbers in both. `SarSource` reads windows (any window: parts outside the scene come back invalid)
and follows the tiling engine's source protocol (lib.image_sources): `read(row, col, h, w)` ->
(uint8 [h, w, C] with 0 on nodata, valid bool [h, w]); a pixel is valid only where every channel has
data.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import rasterio
from rasterio.errors import RasterioError
from rasterio.windows import Window

from lib import geo_io
from lib.errors import UserError

DB_NODATA = -32768.0
DEFAULT_CHANNELS = ("VV", "VH")

# Sigmoid stretch per channel, dB: uint8 = 255 * sigmoid((dB - offset) / scale).
# Sentinel-1 GRD over open sea sits near -20..-15 dB in VV and -28..-22 dB in VH, while vessels,
# platforms and most land return -10 dB and more (ships often above 0 dB). The offset is put between
# the two, about 7 dB above typical sea clutter, and a scale of 3 dB maps a +-5 dB band around it to
# ~0.16..0.84: the dim fringes and side lobes of targets -- what separates a small boat from a bright
# speckle -- use the middle of the range, open sea saturates towards 0 (-20 dB VV -> 9/255) and land
# and ship cores towards 1 (0 dB VV -> 246/255). Sea texture keeps a few grey levels per dB, so the
# model can still see wind streaks and sea state. Channels not listed need an explicit scale/offset.
DEFAULT_NORMALIZATION = {"VV": (3.0, -10.0), "VH": (3.0, -17.0)}

PREPARED_TAGS = ("channels", "sar_scale", "sar_offset")  # GeoTIFF tags of a prepared scene


def normalize_db(db: np.ndarray, scale, offset) -> np.ndarray:
    """uint8 of 255 * sigmoid((db - offset) / scale), per channel (the last axis), 0 where nodata.

    `scale` and `offset` are scalars or one value per channel. Valid values are rounded (half to
    even) and clipped to 1..255, so 0 always means nodata; NaN, infinities and -32768 are nodata.
    The sigmoid is evaluated as (1 + tanh(x / 2)) / 2 in float32: stable for any dB value.
    """
    db = np.asarray(db, dtype=np.float32)
    scale = np.asarray(scale, dtype=np.float32)
    offset = np.asarray(offset, dtype=np.float32)
    if np.any(scale <= 0):
        raise UserError(f"sar_scale={scale.tolist()}: every scale must be positive (dB per sigmoid unit)")
    nodata = ~np.isfinite(db) | (db == DB_NODATA)
    x = (np.where(nodata, offset, db) - offset) / scale
    value = np.rint((1.0 + np.tanh(x * 0.5)) * 127.5)
    out = np.clip(value, 1, 255).astype(np.uint8)
    out[nodata] = 0
    return out


def channel_normalization(channels: Sequence[str], scale=None, offset=None) -> tuple[list[float], list[float]]:
    """(scales, offsets) for `channels`: given values (one per channel) or DEFAULT_NORMALIZATION's."""
    channels = list(channels)
    out = []
    for what, given, k in (("sar_scale", scale, 0), ("sar_offset", offset, 1)):
        if given is None:
            unknown = [c for c in channels if c not in DEFAULT_NORMALIZATION]
            if unknown:
                raise UserError(f"{what}: no default for channel(s) {', '.join(unknown)}; give one value per "
                                f"channel ({', '.join(channels)})")
            out.append([DEFAULT_NORMALIZATION[c][k] for c in channels])
            continue
        values = [float(v) for v in (given if hasattr(given, "__iter__") and not isinstance(given, str)
                                     else [given])]
        if len(values) != len(channels):
            raise UserError(f"{what}={values}: give one value per channel ({', '.join(channels)})")
        out.append(values)
    return out[0], out[1]


def channel_file(scene_dir: Path, channel: str) -> Path:
    """The file of `channel` in an xView3 scene folder: `<channel>_dB.tif`, else `<channel>.tif`."""
    for name in (f"{channel}_dB.tif", f"{channel}.tif"):
        if (scene_dir / name).is_file():
            return scene_dir / name
    return scene_dir / (f"{channel}_dB.tif" if channel in DEFAULT_NORMALIZATION else f"{channel}.tif")


def is_scene_dir(path: Path, channels: Sequence[str] = DEFAULT_CHANNELS) -> bool:
    """A folder holding at least one channel file (a scene missing the others is still a scene: an error)."""
    return path.is_dir() and any(channel_file(path, c).is_file() for c in channels)


def _check_band(ds, path: Path) -> None:
    if ds.dtypes[0].startswith("complex"):  # rasterio names CInt16 'complex_int16', unknown to numpy
        raise UserError(f"{path}: complex-valued SAR (SLC) is not supported; use GRD backscatter in dB "
                        "(the xView3 VV_dB.tif / VH_dB.tif)")


def _check_grid(ds, path: Path, ref, ref_path: Path) -> None:
    """Channels of a scene must share one pixel grid: the same size, transform and CRS."""
    if (ds.height, ds.width) != (ref.height, ref.width):
        raise UserError(f"{path}: {ds.width}x{ds.height} px but {ref_path.name} is {ref.width}x{ref.height}; "
                        "the channels of a scene must share one grid")
    if ds.crs != ref.crs or not ds.transform.almost_equals(ref.transform):
        raise UserError(f"{path}: georeferencing (CRS/transform) differs from {ref_path.name}; the channels "
                        "of a scene must share one grid")


class SarSource:
    """A SAR scene read by windows as normalised uint8 (see the module docstring for what it accepts).

    `channels`, `scale` and `offset` apply to dB input; a prepared uint8 GeoTIFF carries its channels
    and normalisation in its tags (`PREPARED_TAGS`) and is read as it is.
    """

    def __init__(self, path: str | os.PathLike, channels: Sequence[str] = DEFAULT_CHANNELS, scale=None, offset=None):
        self.path = Path(path)
        if not self.path.exists():
            raise UserError(f"{self.path}: SAR scene does not exist (a scene folder with VV_dB.tif/VH_dB.tif "
                            "or a prepared GeoTIFF)")
        self.files = self._files(list(channels))
        self.datasets = []
        try:
            for p in self.files:
                self.datasets.append(self._open(p))
            self._describe(list(channels), scale, offset)
        except UserError:
            self.close()  # a refused scene leaves no open handle behind
            raise

    def _describe(self, channels: list[str], scale, offset) -> None:
        """Check the channels against each other and set the grid, channel names and normalisation."""
        ref = self.datasets[0]
        for ds, p in zip(self.datasets[1:], self.files[1:]):
            _check_grid(ds, p, ref, self.files[0])
        self.prepared = not self.path.is_dir() and ref.dtypes[0] == "uint8"
        if not self.prepared and np.dtype(ref.dtypes[0]).kind != "f":
            raise UserError(f"{self.files[0]}: {ref.dtypes[0]} data; SAR channels are float dB (a prepared "
                            "scene is uint8)")
        if self.prepared:
            tags = ref.tags()
            names = tags.get("channels")
            self.channels = names.split(",") if names else [f"band{i + 1}" for i in range(ref.count)]
            self.scale = _floats(tags.get("sar_scale"))
            self.offset = _floats(tags.get("sar_offset"))
        else:
            self.channels = channels
            if len(self.files) == 1 and ref.count != len(self.channels):
                raise UserError(f"{self.path}: {ref.count} band(s) but channels={self.channels}; give one "
                                "channel name per band")
            self.scale, self.offset = channel_normalization(self.channels, scale, offset)
        self.height, self.width = ref.height, ref.width
        self.crs, self.transform = ref.crs, ref.transform
        self.gsd = geo_io.raster_gsd(ref)

    def _files(self, channels: list[str]) -> list[Path]:
        if not self.path.is_dir():
            return [self.path]
        files = [channel_file(self.path, c) for c in channels]
        for c, f in zip(channels, files):
            if not f.is_file():
                raise UserError(f"{f}: channel {c} is missing (scene {self.path.name} needs "
                                f"{', '.join(p.name for p in files)})")
        return files

    @staticmethod
    def _open(path: Path):
        ds = geo_io.open_raster(path)
        _check_band(ds, path)
        geo_io.check_readable(ds, path)
        return ds

    @property
    def count(self) -> int:
        return len(self.channels)

    def read(self, row: int, col: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 [h, w, C], valid bool [h, w]) of a window; outside the scene is nodata."""
        h, w = int(h), int(w)
        out = np.zeros((h, w, self.count), dtype=np.uint8)
        valid = np.zeros((h, w), dtype=bool)
        r0, c0 = max(int(row), 0), max(int(col), 0)
        r1, c1 = min(int(row) + h, self.height), min(int(col) + w, self.width)
        if r1 <= r0 or c1 <= c0:
            return out, valid
        inner = Window(c0, r0, c1 - c0, r1 - r0)
        rows, cols = slice(r0 - int(row), r1 - int(row)), slice(c0 - int(col), c1 - int(col))
        if self.prepared:
            ds = self.datasets[0]
            data = np.moveaxis(self._read(ds, self.files[0], inner, list(range(1, ds.count + 1))), 0, -1)
        else:
            data = normalize_db(self._read_db(inner), self.scale, self.offset)
        ok = np.all(data != 0, axis=-1)
        data[~ok] = 0
        out[rows, cols] = data
        valid[rows, cols] = ok
        return out, valid

    def _read_db(self, window: Window) -> np.ndarray:
        """[h, w, C] float32 dB with NaN on nodata: band 1 of each channel file, or every band of one file."""
        parts = []
        for ds, path in zip(self.datasets, self.files):
            bands = list(range(1, ds.count + 1)) if len(self.files) == 1 else [1]
            data = self._read(ds, path, window, bands).astype(np.float32, copy=False)
            if ds.nodata is not None and not math.isnan(ds.nodata):
                data = np.where(data == np.float32(ds.nodata), np.float32(np.nan), data)
            parts.append(data)
        return np.moveaxis(np.concatenate(parts), 0, -1)

    @staticmethod
    def _read(ds, path: Path, window: Window, bands):
        try:
            with geo_io.GDAL_LOCK:  # reading threads and writers share GDAL (see geo_io.GDAL_LOCK)
                return ds.read(bands, window=window)
        except RasterioError as err:
            raise UserError(f"{path}: corrupt or truncated raster ({geo_io.gdal_reason(err, path)})") from None

    def reopen(self) -> SarSource:
        """Another handle on the same scene (one per reading thread: rasterio handles are not thread-safe)."""
        other = object.__new__(SarSource)
        other.__dict__.update(self.__dict__)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            other.datasets = [rasterio.open(p) for p in self.files]
        return other

    def close(self) -> None:
        for ds in self.datasets:
            ds.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _floats(text: str | None) -> list[float] | None:
    return [float(v) for v in text.split(",")] if text else None

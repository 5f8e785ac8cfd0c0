"""Input images: which files a run predicts (`list_images`, `check_images`) and how each is read.

`list_images` turns `data_dir` (one image, a folder searched recursively through symlinked folders,
or a STAC catalog) into `ImageInput`s; `check_images` opens each before any work and sets the
unreadable ones aside as `ImageFailure`s (one line each), so one bad file never stops the others.

The tiling engine reads images window by window from a source: a raster file, or an array in memory.
A source has `height`, `width`, `gsd` (metres per pixel or None), `read(row, col, h, w)` ->
(RGB uint8 [h, w, 3] with nodata set to 0, valid bool [h, w]), `reopen()` (a handle for another
reading thread) and `close()`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.windows import Window

from lib import geo_io
from lib.errors import UserError, one_line
from lib.files import walk_files

IMAGE_SUFFIXES = (".tif", ".tiff", ".jpg", ".jpeg", ".png")
SIDE_SUFFIXES = ("_mask", "_ignore")  # training-chip companions, never inputs


@dataclass
class ImageInput:
    stem: str
    path: Path


@dataclass(frozen=True)
class ImageFailure:
    """An input image that cannot be read, and why: `message` is one line naming the file."""
    image: ImageInput
    message: str


def default_data_dir() -> Path:
    """The built-in demo's held-out test images (generated on first use)."""
    from lib import demo_scene

    return Path(demo_scene.ensure_demo_scene()) / "test" / "images"


def list_images(data_dir: str | os.PathLike, exclude: Sequence[Path] = ()) -> list[ImageInput]:
    """One image, a folder of images (searched recursively, into symlinked folders) or a STAC catalog.

    Files under `exclude` (this run's own output folders) are left out. Whether each file can be read
    is `check_images`' business, so a listing never fails because of one bad file.
    """
    path = Path(data_dir)
    if not path.exists():
        raise UserError(f"{path}: data_dir does not exist; pass an image, a folder of images or a STAC catalog.json")
    if path.is_dir() and (path / "catalog.json").is_file():
        path = path / "catalog.json"
    if path.is_file() and path.suffix.lower() == ".json":
        images = _stac_images(path)
    elif path.is_file():
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise UserError(f"{path}: not an image ({', '.join(IMAGE_SUFFIXES)}) or STAC catalog.json")
        images = [ImageInput(path.stem, path)]
    else:
        files = [p for p in walk_files(path) if p.suffix.lower() in IMAGE_SUFFIXES
                 and not p.stem.endswith(SIDE_SUFFIXES) and not p.name.startswith(".")]
        excluded = [Path(d).resolve() for d in exclude]
        images = [ImageInput(p.stem, p) for p in files
                  if not any(p.resolve().is_relative_to(d) for d in excluded)]
    if not images:
        raise UserError(f"{path}: no images found (looked for {', '.join(IMAGE_SUFFIXES)})")
    seen: dict[str, Path] = {}
    for im in images:
        if im.stem in seen:
            raise UserError(f"{im.path}: same name as {seen[im.stem]}; outputs are named by stem, so rename one")
        seen[im.stem] = im.path
    return images


def _stac_images(catalog_path: Path) -> list[ImageInput]:
    """Image assets of every item in a STAC catalog; label items (label extension) are skipped.

    An asset whose file is missing is still listed: `check_images` reports it with the others.
    """
    import pystac

    try:
        catalog = pystac.read_file(str(catalog_path))
    except Exception as err:  # noqa: BLE001 - pystac raises many types for broken catalogs
        raise UserError(f"{catalog_path}: not a readable STAC catalog ({one_line(err)})") from None
    out = []
    for item in catalog.get_items(recursive=True):
        if any("label" in ext for ext in item.stac_extensions):
            continue
        for asset in item.assets.values():
            media = (asset.media_type or "").lower()
            href = asset.get_absolute_href() or asset.href
            if "labels" in (asset.roles or []):
                continue
            if media.startswith("image/") or Path(href).suffix.lower() in IMAGE_SUFFIXES:
                out.append(ImageInput(item.id, Path(href.removeprefix("file://"))))
                break
    return sorted(out, key=lambda im: im.stem)


def _header(path: Path, read):
    """`read(ds)` of the opened image, quietly: a plain image's transform warns on every access."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with geo_io.open_raster(path) as ds:
            return read(ds)


def image_gsd(path: Path) -> float | None:
    """The image's GSD (m/px), read before predicting: it is part of the image's settings."""
    return _header(path, geo_io.raster_gsd)


def image_shape(path: Path) -> tuple[int, int]:
    """(height, width) of the image, for sharing work among torchrun ranks before any is read."""
    return _header(path, lambda ds: (ds.height, ds.width))


def check_images(images: list[ImageInput], bands=None) -> tuple[list[ImageInput], list[int], list[ImageFailure]]:
    """Open every image before any work: (readable images, their pixel counts, failures).

    A missing, truncated or unreadable file -- or one without the `bands` asked for -- becomes an
    `ImageFailure` instead of stopping the run; the pixel counts (the work each image will take)
    share the readable images among ranks.
    """
    geo_io.check_bands(bands)  # a malformed option is one error, not one per image
    readable, pixels, failures = [], [], []
    for im in images:
        try:
            pixels.append(_check_image(im.path, bands))
            readable.append(im)
        except UserError as err:
            failures.append(ImageFailure(im, str(err)))
    return readable, pixels, failures


def _check_image(path: Path, bands) -> int:
    with geo_io.open_raster(path) as ds:
        geo_io.check_readable(ds, path)
        geo_io.band_layout(ds, bands)
        return ds.width * ds.height


class RasterSource:
    """A georeferenced (or plain) image read by windows with the data-preparation rules."""

    def __init__(self, path: str | os.PathLike, stretch: str = geo_io.STRETCH_PERCENTILE, stretch_low: float = 2,
                 stretch_high: float = 98, stretch_range=None, zero_is_nodata: bool = False, bands=None):
        self.path = Path(path)
        self.ds = geo_io.open_raster(self.path)
        geo_io.check_readable(self.ds, self.path)
        self.layout = geo_io.band_layout(self.ds, bands)  # (RGB band indexes, alpha band): read once
        value_range = tuple(stretch_range) if stretch_range is not None else None
        self.stretch = geo_io.stretch_range(self.ds, self.layout[0], stretch, stretch_low, stretch_high, value_range,
                                            self.layout)
        self.zero_is_nodata = zero_is_nodata
        self.height, self.width = self.ds.height, self.ds.width
        self.gsd = geo_io.raster_gsd(self.ds)

    def read(self, row: int, col: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        return geo_io.read_window(self.ds, Window(col, row, w, h), self.stretch, self.zero_is_nodata, self.layout)

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

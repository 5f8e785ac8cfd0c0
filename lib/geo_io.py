"""Reading scenes and labels, and writing georeferenced rasters: one code path for every script.

Data preparation and inference read imagery the same way: the first three bands as RGB (a single
band replicated), alpha / nodata / internal masks as an *invalid* region, uint16 and other
non-uint8 data stretched to uint8 by per-scene percentiles (2-98 by default, the SpaceNet method)
or a fixed range. Labels are read with geopandas, reprojected to the image CRS and repaired.
A 4th band without colour interpretation that holds only 0 and 255 is read as alpha; `bands` picks
other bands as RGB (WorldView-2/3 8-band: [5, 3, 2]).

Failures become one-line `UserError`s that name the file once: GDAL's own message is folded into
that line (`gdal_reason`) and rasterio's log records of GDAL errors are silenced, so a bad file
prints one line, not GDAL's lines followed by the toolkit's.
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import rasterio
import rasterio.warp
from rasterio.enums import ColorInterp
from rasterio.errors import RasterioError, RasterioIOError
from rasterio.windows import Window

from lib.errors import UserError
from lib.files import atomic_path

# Values for the `stretch` option.
STRETCH_PERCENTILE = "percentile"
STRETCH_RANGE = "range"
STRETCH_NONE = "none"

# rasterio logs every GDAL error it is about to raise (and GDAL's warnings) as log records; Hydra's
# job logging prints those on stdout before the toolkit's own one-line error. The exception carries
# the same text, which `gdal_reason` folds into that line.
logging.getLogger("rasterio").setLevel(logging.CRITICAL)

# GDAL's advice on an unrecognised file, not useful to someone who gave an image or a label file.
_GDAL_ADVICE = re.compile(r"[.;\s]*It might help to specify the correct driver.*$", re.DOTALL)
_NOTED_ALPHA: set[str] = set()  # files whose 0/255 4th band was reported as alpha (once per file)

# Reading windows (the tiling engine's read-ahead threads) and writing raster blocks (lib.raster_outputs)
# hold this lock: creating a mask band while another thread read crashed GDAL (a segfault seen once in
# several runs). GDAL work on datasets of its own -- polygonizing in-memory rasters, finishing COGs and
# vector files -- runs beside it (held, it capped a folder run at about 10 images/s however many cores),
# and model compute never takes it, so reading still overlaps the network.
GDAL_LOCK = threading.RLock()


def gdal_reason(err: BaseException, path: str | os.PathLike | None = None, limit: int = 160) -> str:
    """GDAL's reason for a failure, short enough to go in brackets after the toolkit's message.

    Drops what the toolkit's line already says -- the file's path or name, GDAL's advice to prefix the
    path with a driver name -- and follows rasterio's "See previous exception" to the real cause.
    """
    cause = err.__cause__ or err.__context__
    text = str(err).strip()
    if "See previous exception" in text and cause is not None:
        text = str(cause).strip()
    text = _GDAL_ADVICE.sub("", text)
    if path is not None:
        for name in (str(path), os.path.abspath(path), Path(path).name):
            text = text.replace(f"'{name}'", "").replace(f'"{name}"', "").replace(name, "")
    text = text.replace("being in a supported file format", "a supported file format")
    text = re.sub(r"\s+", " ", text).strip(" .;:,")
    return text[:limit] if text else type(err).__name__


def open_raster(path: str | os.PathLike) -> rasterio.io.DatasetReader:
    """Open a raster, turning missing or unreadable files into a one-line `UserError`.

    Plain images (PNG, JPEG) open without rasterio's NotGeoreferencedWarning: callers that need a
    CRS check `is_georeferenced` and say so in their own words.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: image file does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            ds = rasterio.open(path)
    except RasterioIOError as err:
        raise UserError(f"{path}: not a readable raster ({gdal_reason(err, path)})") from None
    return ds


def check_readable(ds, path=None) -> None:
    """Read the last block of the first band so truncated/corrupt files fail early, not mid-run."""
    try:
        h, w = ds.height, ds.width
        ds.read(1, window=Window(max(0, w - 1), max(0, h - 1), 1, 1))
        ds.read(1, window=Window(0, 0, 1, 1))
    except RasterioError as err:
        name = path or ds.name
        raise UserError(f"{name}: corrupt or truncated raster ({gdal_reason(err, name)})") from None


def is_georeferenced(ds) -> bool:
    """A CRS and a real transform: outputs keep them. Plain images (PNG, JPEG) give plain outputs."""
    return ds.crs is not None and not ds.transform.is_identity


def gdal_env(cache_mb: int = 32):
    """GDAL settings for streaming: a bounded block cache so memory does not follow the scene size.

    32 MB holds the source blocks of one 1024-row band of an 8192-px-wide RGBA scene, enough for
    neighbouring windows to share reads; GDAL's default (5 % of RAM) would fill with whole scenes.
    """
    return rasterio.Env(GDAL_CACHEMAX=cache_mb, GDAL_TIFF_INTERNAL_MASK=True)


def raster_gsd(ds) -> float | None:
    """Ground sample distance in metres per pixel, or None for plain (non-georeferenced) images."""
    if not is_georeferenced(ds):
        return None
    res_x = math.hypot(ds.transform.a, ds.transform.d)
    if ds.crs.is_geographic:
        # degrees -> metres at the scene centre latitude
        lat = (ds.transform * (ds.width / 2, ds.height / 2))[1]
        return res_x * 111_320.0 * math.cos(math.radians(lat))
    try:
        factor = ds.crs.linear_units_factor[1]
    except Exception:  # noqa: BLE001 - unusual CRS definitions: assume metres
        factor = 1.0
    gsd = res_x * factor
    if ds.crs.to_epsg() == 3857:
        # Web Mercator metres are stretched by 1/cos(latitude); report true ground metres.
        _, lat = rasterio.warp.transform(ds.crs, "EPSG:4326", [ds.bounds.left], [(ds.bounds.bottom + ds.bounds.top) / 2])
        gsd *= math.cos(math.radians(lat[0]))
    return gsd


def band_layout(ds, bands=None) -> tuple[list[int], int | None]:
    """The 1-based band indexes read as RGB and the alpha band index (or None).

    `bands` (1-based, in R, G, B order; one band is replicated) chooses the colour bands; by default
    they are the first three bands that are not alpha. Alpha is the band GDAL labels alpha or, in a
    4-band file, a 4th band without colour interpretation that holds only 0 and 255 (RGBA written
    without the TIFF ExtraSamples tag). Any other 4th band (near infrared, elevation) is ignored.
    """
    interp = list(ds.colorinterp)
    alpha = next((i + 1 for i, c in enumerate(interp) if c == ColorInterp.alpha), None)
    chosen = _chosen_bands(ds, bands)
    if (alpha is None and ds.count == 4 and 4 not in (chosen or ()) and interp[3] == ColorInterp.undefined
            and _holds_only_0_255(ds, 4)):
        alpha = 4
        if ds.name not in _NOTED_ALPHA:
            _NOTED_ALPHA.add(ds.name)
            print(f"note: {ds.name}: band 4 has no colour interpretation and holds only 0/255; "
                  "reading it as alpha (0 = nodata)", file=sys.stderr)
    if chosen is not None:
        return (chosen * 3 if len(chosen) == 1 else chosen), (alpha if alpha not in chosen else None)
    colour = [i + 1 for i in range(ds.count) if i + 1 != alpha]
    if not colour:
        raise UserError(f"{ds.name}: raster has no colour bands")
    rgb = colour[:3] if len(colour) >= 3 else [colour[0]] * 3
    return rgb, alpha


def check_bands(bands) -> list[int] | None:
    """The `bands` option as a list: null, or 1 or 3 positive band indexes (checked before any file)."""
    if bands is None:
        return None
    try:
        chosen = [int(b) for b in (bands if not isinstance(bands, (int, str)) else [bands])]
    except (TypeError, ValueError):
        chosen = []
    if len(chosen) not in (1, 3) or min(chosen) < 1:
        raise UserError(f"bands={bands}: give 3 band indexes (1-based) in R,G,B order, e.g. bands=[5,3,2], or one")
    return chosen


def _chosen_bands(ds, bands) -> list[int] | None:
    """`bands` checked against this file: 1 or 3 indexes in 1..count (one-line error otherwise)."""
    chosen = check_bands(bands)
    if chosen is None:
        return None
    if any(not 1 <= b <= ds.count for b in chosen):
        raise UserError(f"{ds.name}: bands={chosen} but the file has {ds.count} band(s) (indexes are 1-based)")
    return chosen


def _holds_only_0_255(ds, band: int) -> bool:
    """A decimated read (at most ~1024 px a side) of `band` has only 0 and 255, and some 255."""
    step = max(1, math.ceil(max(ds.width, ds.height) / 1024))
    shape = (max(1, ds.height // step), max(1, ds.width // step))
    values = np.unique(ds.read(band, out_shape=shape, resampling=rasterio.enums.Resampling.nearest))
    return bool(np.isin(values, (0, 255)).all() and (values == 255).any())


def stretch_range(ds, bands: list[int], method: str = STRETCH_PERCENTILE, low: float = 2, high: float = 98,
                  value_range: tuple[float, float] | None = None, layout=None) -> np.ndarray | None:
    """Per-band (lo, hi) mapping to 0..255, or None when the data are already uint8.

    Percentiles are computed once per scene on a decimated read (at most ~1024 px on a side) over
    valid pixels only, so the cost does not grow with the scene.
    """
    if method == STRETCH_NONE or (ds.dtypes[0] == "uint8" and method != STRETCH_RANGE):
        return None
    if method == STRETCH_RANGE:
        if value_range is None:
            raise UserError("stretch=range needs stretch_range=[lo,hi]")
        return np.array([list(value_range)] * len(bands), dtype=np.float64)
    step = max(1, math.ceil(max(ds.width, ds.height) / 1024))
    shape = (max(1, ds.height // step), max(1, ds.width // step))
    data = ds.read(bands, out_shape=(len(bands),) + shape, resampling=rasterio.enums.Resampling.nearest).astype(np.float64)
    _, alpha = layout or band_layout(ds)
    valid = _valid_mask(ds, data, bands, alpha, window=None, out_shape=shape)
    # Black fill (0 in every band) is never a radiometric sample of non-uint8 imagery (SpaceNet mosaic
    # edges cover up to 75 % of a tile); counting it would pull the low percentile down to 0.
    valid &= np.any(data != 0, axis=0)
    out = []
    for band in data:
        values = band[valid] if valid.any() else band.ravel()
        lo, hi = np.percentile(values, [low, high]) if values.size else (0.0, 1.0)
        out.append([lo, hi if hi > lo else lo + 1])
    return np.asarray(out)


def _valid_mask(ds, data, bands, alpha, window, out_shape=None) -> np.ndarray:
    """Pixels with imagery: alpha > 0, not nodata, inside the dataset's internal mask."""
    valid = np.ones(data.shape[1:], dtype=bool)
    if alpha is not None:
        a = ds.read(alpha, window=window, boundless=window is not None, fill_value=0, out_shape=out_shape)
        valid &= a > 0
    elif ds.nodata is not None:
        valid &= ~np.all(data == ds.nodata, axis=0)
    elif any(m.name == "per_dataset" for m in ds.mask_flag_enums[0]):
        m = ds.read_masks(1, window=window, boundless=window is not None, out_shape=out_shape)
        valid &= m > 0
    return valid


def read_window(ds, window: Window | None = None, stretch: np.ndarray | None = None,
                zero_is_nodata: bool = False, layout=None) -> tuple[np.ndarray, np.ndarray]:
    """Read `window` (may extend past the edges) as (RGB uint8 [H, W, 3], valid bool [H, W]).

    Pixels outside the raster, under alpha 0, or equal to nodata are invalid and set to 0.
    `zero_is_nodata` also treats pixels that are 0 in every band as invalid (SpaceNet mosaic edges).
    Colour and alpha bands come from one read of the part of the window inside the raster, pasted
    into the padded result: rasterio's `boundless` reads go through a warped VRT and decode every
    block again for each band set, which made chip extraction several times slower.
    `layout` is `band_layout(ds, bands)`, computed once per file by callers that read many windows.
    """
    bands, alpha = layout or band_layout(ds)
    if window is None:
        window = Window(0, 0, ds.width, ds.height)
    col, row = round(window.col_off), round(window.row_off)
    h, w = round(window.height), round(window.width)
    c0, r0 = max(col, 0), max(row, 0)
    c1, r1 = min(col + w, ds.width), min(row + h, ds.height)
    inside = h > 0 and w > 0 and (c0, r0, c1, r1) == (col, row, col + w, row + h)  # the read is the window
    data = None if inside else np.full((len(bands), h, w), ds.nodata or 0, dtype=ds.dtypes[bands[0] - 1])
    valid = None if inside else np.zeros((h, w), dtype=bool)
    if c1 > c0 and r1 > r0:
        inner = Window(c0, r0, c1 - c0, r1 - r0)
        wanted = sorted(set(bands) | ({alpha} if alpha is not None else set()))
        try:
            with GDAL_LOCK:
                arr = ds.read(wanted, window=inner)
            part = arr[[wanted.index(b) for b in bands]]
            ok = np.ones(part.shape[1:], dtype=bool)
            if alpha is not None:
                ok &= arr[wanted.index(alpha)] > 0
            elif ds.nodata is not None:
                ok &= ~np.all(part == ds.nodata, axis=0)
            elif any(m.name == "per_dataset" for m in ds.mask_flag_enums[0]):
                ok &= ds.read_masks(1, window=inner) > 0
        except RasterioError as err:
            raise UserError(f"{ds.name}: corrupt or truncated raster ({gdal_reason(err, ds.name)})") from None
        if inside:
            data, valid = part, ok
        else:
            rows, cols = slice(r0 - row, r1 - row), slice(c0 - col, c1 - col)
            data[:, rows, cols] = part
            valid[rows, cols] = ok
    if zero_is_nodata:
        valid &= np.any(data != 0, axis=0)
    if stretch is not None:
        lo = stretch[:, 0][:, None, None]
        hi = stretch[:, 1][:, None, None]
        data = np.clip((data.astype(np.float32) - lo) / (hi - lo) * 255.0, 0, 255).round()
    rgb = np.ascontiguousarray(np.moveaxis(data.astype(np.uint8, copy=False), 0, -1))
    if not valid.all():
        rgb[~valid] = 0
    return rgb, valid


# footprint files looked for in folders (evaluate.py, overlay.py), GeoJSON first
VECTOR_SUFFIXES = (".geojson", ".json", ".gpkg", ".shp")


def load_footprints(path: str | os.PathLike, crs=None):
    """Read building polygons, reproject them to `crs`, repair invalid ones, drop empty/zero-area.

    Returns a GeoDataFrame of Polygons/MultiPolygons (possibly empty) that keeps its CRS.
    """
    return load_footprints_report(path, crs)[0]


def read_vector(path: str | os.PathLike, what: str = "vector file"):
    """Any vector file as a GeoDataFrame; a missing or unreadable one is a one-line `UserError`."""
    import geopandas as gpd

    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: {what} does not exist")
    try:
        return gpd.read_file(path)
    except Exception as err:  # noqa: BLE001 - pyogrio raises several types for unreadable files
        raise UserError(f"{path}: not a readable vector file ({gdal_reason(err, path)})") from None


def load_footprints_report(path: str | os.PathLike, crs=None):
    """`load_footprints` plus what was done to the input: (gdf, {"read", "repaired", "dropped"}).

    Callers use the counts to warn about invalid or zero-area geometries instead of hiding them.
    """
    import geopandas as gpd
    import shapely

    path = Path(path)
    gdf = read_vector(path, "label file")
    report = {"read": len(gdf), "repaired": 0, "dropped": 0}
    if len(gdf) == 0:
        gdf = gdf.set_crs(crs or "EPSG:4326", allow_override=True) if gdf.crs is None else gdf
        return gdf, report
    if gdf.crs is None:
        raise UserError(f"{path}: labels have no CRS; add one (e.g. re-save as GeoJSON in EPSG:4326)")
    raw = gdf.geometry.values
    report["repaired"] = int((~shapely.is_missing(raw) & ~shapely.is_valid(raw)).sum())
    geoms = [_polygonal(g) for g in shapely.make_valid(raw)]
    gdf = gpd.GeoDataFrame(gdf.drop(columns="geometry"), geometry=geoms, crs=gdf.crs)
    gdf = gdf[~gdf.geometry.is_empty & gdf.geometry.notna()]
    if crs is not None:
        gdf = gdf.to_crs(crs)
    gdf = gdf[shapely.area(gdf.geometry.values) > 0]  # sign test only: units do not matter
    report["dropped"] = report["read"] - len(gdf)
    return gdf.reset_index(drop=True), report


def _polygonal(geom):
    """Keep the polygonal part of a repaired geometry (make_valid may return collections)."""
    import shapely
    from shapely.geometry import GeometryCollection, MultiPolygon, Polygon

    if geom is None or geom.is_empty:
        return Polygon()
    if isinstance(geom, (Polygon, MultiPolygon)):
        return geom
    if isinstance(geom, GeometryCollection) or hasattr(geom, "geoms"):
        parts = [g for g in shapely.get_parts(geom) if isinstance(g, Polygon) and not g.is_empty]
        return MultiPolygon(parts) if parts else Polygon()
    return Polygon()


def rasterize_footprints(geoms, shape: tuple[int, int], transform, all_touched: bool = False) -> np.ndarray:
    """Burn polygons into a uint8 0/1 mask on the given grid (rasterio's pixel-centre rule by default)."""
    from rasterio.features import rasterize

    geoms = [g for g in geoms if g is not None and not g.is_empty]
    if not geoms:
        return np.zeros(shape, dtype=np.uint8)
    return rasterize(((g, 1) for g in geoms), out_shape=shape, transform=transform, fill=0,
                     all_touched=all_touched, dtype="uint8")


def output_profile(ds, count: int = 1, dtype: str = "uint8", **overrides) -> dict:
    """Profile for a raster aligned with `ds`: same size, CRS and transform; tiled and compressed."""
    profile = {
        "driver": "GTiff", "width": ds.width, "height": ds.height, "count": count, "dtype": dtype,
        "crs": ds.crs, "transform": ds.transform, "compress": "deflate", "nodata": None,
    }
    if ds.width >= 256 and ds.height >= 256:
        profile.update(tiled=True, blockxsize=256, blockysize=256)
    profile.update(overrides)
    return profile


def write_raster(path: str | os.PathLike, array: np.ndarray, profile: dict, tags: dict | None = None) -> None:
    """Write a whole array ([H, W] or [C, H, W]) atomically with `profile`."""
    arr = array[None] if array.ndim == 2 else array
    profile = dict(profile, count=arr.shape[0], height=arr.shape[1], width=arr.shape[2], dtype=str(arr.dtype))
    with atomic_path(path) as tmp, rasterio.open(tmp, "w", **profile) as dst:
        dst.write(arr)
        if tags:
            dst.update_tags(**{k: str(v) for k, v in tags.items()})


def resolve_zero_is_nodata(value, ds, layout=None) -> bool:
    """`auto`: zero-valued pixels are nodata only when the file itself says nothing about validity.

    A raster with an alpha band, a nodata value or an internal mask marks its own edges; trusting it
    keeps genuinely black pixels. Without any of these (SpaceNet tiles, many mosaics) the black fill
    outside the imagery is the only signal, and treating it as ground would teach "black = no building".
    """
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "yes"):
        return True
    if str(value).lower() in ("false", "0", "no"):
        return False
    _, alpha = layout or band_layout(ds)
    has_mask = any(m.name == "per_dataset" for m in ds.mask_flag_enums[0])
    return alpha is None and ds.nodata is None and not has_mask

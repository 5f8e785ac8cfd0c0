"""Point labels of the point task, from xView3 CSVs or vector files, as one table: `PointLabels`.

Every reader returns a pandas DataFrame with the columns `POINT_COLUMNS`:

    scene_id                str
    row, col                float, input pixels of the scene, pixel centres at integers (xView3's
                            detect_scene_row / detect_scene_column convention)
    is_vessel, is_fishing   float: 1 / 0, NaN = unknown
    length_m                float metres, NaN = unknown
    confidence              str: HIGH / MEDIUM / LOW, "" = not given
    distance_from_shore_km  float, NaN = unknown

Sources: the xView3 label CSV (`read_xview3_csv`, validated by lib.xview3_metric's reader), and points
in any vector format over a georeferenced image (`read_vector_points`: reprojected to the image CRS,
attributes optional; polygons such as building footprints become their centroids with
`from_polygons=True`, their length the long side of their minimum rotated rectangle).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from lib.errors import UserError
from lib.xview3_metric import CONFIDENCE_LEVELS, GT_COLUMNS, _read_csv, _tristate, prepare_labels

POINT_COLUMNS = ("scene_id", "row", "col", "is_vessel", "is_fishing", "length_m", "confidence",
                 "distance_from_shore_km")
PointLabels = pd.DataFrame  # a DataFrame with POINT_COLUMNS (the agreed interface, not a subclass)

# Vector attribute names read when present (xView3 names first); anything else is ignored.
_ATTRIBUTES = {"is_vessel": ("is_vessel",), "is_fishing": ("is_fishing",),
               "length_m": ("vessel_length_m", "length_m", "length"), "confidence": ("confidence",),
               "distance_from_shore_km": ("distance_from_shore_km",)}


def empty_labels() -> pd.DataFrame:
    return point_table([], [], [])


def point_table(scene_id, row, col, is_vessel=None, is_fishing=None, length_m=None, confidence=None,
                distance_from_shore_km=None) -> pd.DataFrame:
    """A PointLabels table; omitted attributes are unknown (NaN, confidence "")."""
    n = len(row)

    def floats(values):
        return np.full(n, np.nan) if values is None else np.asarray(values, dtype=float)

    scene = [scene_id] * n if isinstance(scene_id, str) else list(scene_id)
    return pd.DataFrame({
        "scene_id": pd.Series(scene, dtype=object), "row": floats(row), "col": floats(col),
        "is_vessel": floats(is_vessel), "is_fishing": floats(is_fishing), "length_m": floats(length_m),
        "confidence": pd.Series([""] * n if confidence is None else list(confidence), dtype=object),
        "distance_from_shore_km": floats(distance_from_shore_km)}, columns=list(POINT_COLUMNS))


def read_xview3_csv(path: str | os.PathLike, scenes: Iterable[str] | None = None) -> pd.DataFrame:
    """The xView3 label CSV as PointLabels; with `scenes`, a label of any other scene is an error.

    Every xView3 column is required (a missing one is named); empty cells are unknown values, and an
    empty confidence is kept as "" (the metric's reader requires one, training does not).
    """
    path = Path(path)
    raw = _read_csv(path, "label")
    missing = [c for c in GT_COLUMNS if c not in raw.columns]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)} (xView3 labels need "
                        f"{', '.join(GT_COLUMNS)})")
    conf = raw["confidence"].astype("string").fillna("").str.strip().str.upper()
    no_conf = (conf == "").to_numpy(dtype=bool)
    raw = raw.assign(confidence=conf.mask(no_conf, "HIGH"))  # placeholder: prepare_labels wants a level
    labels = prepare_labels(raw, str(path))
    labels.loc[no_conf, "confidence"] = ""
    if scenes is not None:
        unknown = sorted(set(labels["scene_id"]) - set(scenes))
        if unknown:
            more = f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else ""
            raise UserError(f"{path}: label(s) for scene id(s) not found among the scenes: "
                            f"{', '.join(unknown[:5])}{more}")
    return point_table(labels["scene_id"], labels["detect_scene_row"], labels["detect_scene_column"],
                       labels["is_vessel"], labels["is_fishing"], labels["vessel_length_m"],
                       labels["confidence"], labels["distance_from_shore_km"])


def read_vector_points(path: str | os.PathLike, image: str | os.PathLike, scene_id: str | None = None,
                       from_polygons: bool = False) -> pd.DataFrame:
    """Points (or polygon centroids) of a vector file as PointLabels in the pixels of the GeoTIFF `image`.

    The geometries are reprojected to the image CRS and placed with the inverse of its transform;
    points outside the image are left out with a warning. `scene_id` defaults to the image's stem.
    """
    from lib.geo_io import open_raster, raster_gsd, read_vector

    path = Path(path)
    with open_raster(image) as ds:
        if ds.crs is None or ds.transform.is_identity:
            raise UserError(f"{image}: image has no CRS/georeferencing, so points cannot be placed on it")
        crs, transform, shape, gsd = ds.crs, ds.transform, (ds.height, ds.width), raster_gsd(ds)
    gdf = read_vector(path, "points file")
    gdf = gdf[~(gdf.geometry.isna() | gdf.geometry.is_empty)]
    if len(gdf) and gdf.crs is None:
        raise UserError(f"{path}: points have no CRS; add one (e.g. re-save as GeoJSON in EPSG:4326)")
    gdf = gdf.to_crs(crs) if len(gdf) else gdf
    x, y, length_m = _positions(gdf, path, from_polygons, abs(transform.a), gsd)
    inv = ~transform
    with np.errstate(invalid="ignore"):  # coordinates a CRS cannot hold reproject to inf: outside below
        col = inv.a * x + inv.b * y + inv.c - 0.5  # pixel corner coordinates -> centres at integers
        row = inv.d * x + inv.e * y + inv.f - 0.5
    inside = (row >= -0.5) & (row < shape[0] - 0.5) & (col >= -0.5) & (col < shape[1] - 0.5)
    if (~inside).any():
        warnings.warn(f"{path}: {int((~inside).sum())} of {len(inside)} point(s) lie outside {Path(image).name} "
                      "and are left out", stacklevel=2)
    attrs = _attributes(gdf, path)
    if length_m is not None:
        attrs["length_m"] = np.where(np.isnan(attrs["length_m"]), length_m, attrs["length_m"])
    return point_table(scene_id or Path(image).stem, row[inside], col[inside],
                       **{k: (v[inside] if v is not None else None) for k, v in attrs.items()})


def _positions(gdf, path: Path, from_polygons: bool, pixel_size: float, gsd: float | None):
    """(x, y) in the image CRS, and lengths in metres for polygons (None for points)."""
    import shapely

    kinds = set(gdf.geom_type)
    polygonal = {"Polygon", "MultiPolygon"}
    if kinds - {"Point"} - (polygonal if from_polygons else set()):
        if from_polygons:
            raise UserError(f"{path}: expected Points or Polygons, found {', '.join(sorted(kinds - {'Point'} - polygonal))}")
        hint = "; set from_polygons=true to use polygon centroids" if kinds & polygonal else ""
        raise UserError(f"{path}: expected Point geometries, found {', '.join(sorted(kinds - {'Point'}))}{hint}")
    geoms = gdf.geometry.values
    if not (kinds & polygonal):
        return shapely.get_x(geoms), shapely.get_y(geoms), None
    centroids = shapely.centroid(geoms)
    cx, cy = shapely.get_x(centroids), shapely.get_y(centroids)
    length = np.full(len(geoms), np.nan)
    for i, geom in enumerate(geoms):
        # about the centroid: GEOS' rectangle loses millimetres at UTM-sized coordinates
        rect = shapely.oriented_envelope(shapely.transform(geom, lambda xy, i=i: xy - (cx[i], cy[i])))
        if rect.geom_type == "Polygon":  # degenerate polygons have no rectangle
            ring = np.asarray(rect.exterior.coords)
            length[i] = np.hypot(*np.diff(ring[:3], axis=0).T).max() / pixel_size * (gsd or pixel_size)
    return cx, cy, length


def _attributes(gdf, path: Path) -> dict:
    """The optional label attributes of a vector file (None where the file has no such column)."""
    out = {}
    for key, names in _ATTRIBUTES.items():
        name = next((n for n in names if n in gdf.columns), None)
        if name is None:
            out[key] = None if key != "length_m" else np.full(len(gdf), np.nan)
        elif key in ("is_vessel", "is_fishing"):
            out[key] = _tristate(gdf[name], name, str(path))
        elif key == "confidence":
            conf = gdf[name].astype("string").fillna("").str.strip().str.upper().to_numpy(dtype=object)
            bad = sorted({str(c) for c in conf} - {"", *CONFIDENCE_LEVELS})
            if bad:
                raise UserError(f"{path}: {name} must be HIGH, MEDIUM, LOW or empty, found {', '.join(bad[:5])}")
            out[key] = conf
        else:
            out[key] = pd.to_numeric(gdf[name], errors="coerce").to_numpy(dtype=float)
    return out

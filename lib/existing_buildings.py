"""Predicted footprints against buildings already mapped (e.g. an OpenStreetMap extract).

A prediction is `mapped` when it is the same building as an existing one -- IoU >= 0.3, or the
overlap covers >= 50 % of the existing building or >= 50 % of the prediction (one large mapped
outline around several predicted houses, or one prediction spanning several small mapped huts,
both count) -- and `new` otherwise. The new ones are what a mapper imports. Overlaps are measured
in a local metric CRS, so the rule means the same in degrees and metres.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import shapely

from lib.errors import UserError, one_line

MAPPED_IOU = 0.3      # IoU with an existing building at or above which a prediction is already mapped
MAPPED_COVER = 0.5    # ... or share of either outline covered by the other
NEW, MAPPED = "new", "mapped"


def load(path: str | os.PathLike | None):
    """The existing buildings (polygons, repaired), or None; bad files are a one-line UserError.

    Cached by path, so checking the file at start-up and using it for every image reads it once.
    """
    if path is None:
        return None
    return _load(str(Path(path).resolve()))


@functools.lru_cache(maxsize=1)
def _load(path: str):
    import geopandas as gpd

    if not Path(path).is_file():
        raise UserError(f"{path}: existing buildings file does not exist")
    try:
        gdf = gpd.read_file(path, engine="pyogrio")
    except Exception as err:  # noqa: BLE001 - pyogrio raises several types for unreadable files
        raise UserError(f"{path}: existing buildings are not a readable vector file ({one_line(err)})") from None
    if gdf.crs is None:
        raise UserError(f"{path}: existing buildings have no CRS; re-save them with one (e.g. GeoJSON, EPSG:4326)")
    geoms = shapely.make_valid(gdf.geometry.values)
    parts = shapely.get_parts(geoms)
    parts = parts[(shapely.get_type_id(parts) == 3) & (shapely.area(parts) > 0)]  # polygons only
    return gpd.GeoDataFrame(geometry=parts, crs=gdf.crs)


def status(gdf, existing) -> np.ndarray:
    """`new` / `mapped` for each footprint of `gdf` (georeferenced) against `existing`."""
    out = np.full(len(gdf), NEW, dtype=object)
    if len(gdf) == 0 or existing is None or len(existing) == 0:
        return out
    metric = gdf.estimate_utm_crs() if gdf.crs.is_geographic else gdf.crs
    pred = gdf.geometry.to_crs(metric).values
    bounds = shapely.box(*shapely.total_bounds(pred))
    ex = existing.to_crs(metric).geometry.values
    ex = ex[shapely.intersects(ex, bounds)]
    if len(ex) == 0:
        return out
    i, j = shapely.STRtree(ex).query(pred, predicate="intersects")
    inter = shapely.area(shapely.intersection(pred[i], ex[j]))
    a_pred, a_ex = shapely.area(pred[i]), shapely.area(ex[j])
    iou = inter / np.maximum(a_pred + a_ex - inter, 1e-12)
    same = (iou >= MAPPED_IOU) | (inter >= MAPPED_COVER * a_ex) | (inter >= MAPPED_COVER * a_pred)
    out[np.unique(i[same])] = MAPPED
    return out


def new_buildings(gdf):
    """The `new` footprints as an OSM-import-ready layer: EPSG:4326, one tag `building=yes`."""
    import geopandas as gpd

    new = gdf[gdf["status"] == NEW]
    return gpd.GeoDataFrame({"building": ["yes"] * len(new)}, geometry=new.geometry.values,
                            crs=gdf.crs).to_crs("EPSG:4326")

"""Point detections -> the xView3 submission CSV and georeferenced GeoJSON points.

The CSV holds the challenge's columns (`detect_scene_row, detect_scene_column, scene_id, is_vessel,
is_fishing, vessel_length_m`) so lib.xview3_metric and the reference scorer read it as it is, plus
`lat, lon, score` for people and GIS tools. Rows and columns are rounded to whole pixels, as the
challenge's labels and submissions were; lat/lon come from the unrounded position. Each scene is
written on its own (one CSV + one GeoJSON), and `merge_detections` joins the scenes' CSVs into the
run's `detections.csv`, so an interrupted run keeps every finished scene.

Classes from probabilities: `is_vessel` = vessel probability >= vessel_threshold; `is_fishing` =
is_vessel and fishing probability >= fishing_threshold (only vessels fish; the metric scores fishing
on vessels only). Lengths: length in pixels times the scene's GSD (m/px).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

import numpy as np
import pandas as pd
from pyproj import CRS, Transformer

from lib.files import atomic_path

SUBMISSION_COLUMNS = ("detect_scene_row", "detect_scene_column", "scene_id", "is_vessel", "is_fishing",
                      "vessel_length_m")
EXTRA_COLUMNS = ("lat", "lon", "score")
CSV_COLUMNS = SUBMISSION_COLUMNS + EXTRA_COLUMNS
WGS84 = "EPSG:4326"


def pixel_to_lonlat(rows, cols, transform, crs) -> tuple[np.ndarray, np.ndarray]:
    """Longitude, latitude (EPSG:4326) of positions in pixels with pixel centres at integers.

    The affine transform maps pixel *corners*, so a centre convention position (r, c) sits at
    corner coordinates (c + 0.5, r + 0.5). Without a CRS the result is NaN.
    """
    rows, cols = np.asarray(rows, float), np.asarray(cols, float)
    if crs is None or transform is None:
        return np.full(rows.shape, np.nan), np.full(rows.shape, np.nan)
    a, b, c, d, e, f = tuple(transform)[:6]
    x = a * (cols + 0.5) + b * (rows + 0.5) + c
    y = d * (cols + 0.5) + e * (rows + 0.5) + f
    to_wgs84 = Transformer.from_crs(CRS.from_user_input(crs), WGS84, always_xy=True)
    lon, lat = to_wgs84.transform(x, y)
    return np.asarray(lon, float), np.asarray(lat, float)


def submission_table(dets: pd.DataFrame, scene_id: str, transform, crs, vessel_threshold: float,
                     fishing_threshold: float, gsd: float | None) -> pd.DataFrame:
    """One scene's detections (lib.point_decoding columns) as CSV_COLUMNS rows; gsd None: no lengths."""
    lon, lat = pixel_to_lonlat(dets["row"], dets["col"], transform, crs)
    vessel = dets["vessel"].to_numpy(float) >= vessel_threshold
    fishing = vessel & (dets["fishing"].to_numpy(float) >= fishing_threshold)
    length = dets["length_px"].to_numpy(float) * (float(gsd) if gsd else np.nan)
    return pd.DataFrame({
        "detect_scene_row": np.rint(dets["row"].to_numpy(float)).astype(np.int64),
        "detect_scene_column": np.rint(dets["col"].to_numpy(float)).astype(np.int64),
        "scene_id": str(scene_id), "is_vessel": vessel, "is_fishing": fishing,
        "vessel_length_m": length, "lat": lat, "lon": lon,
        "score": dets["objectness"].to_numpy(float)}, columns=list(CSV_COLUMNS))


def _json_number(value):
    value = float(value)
    return value if np.isfinite(value) else None  # JSON has no NaN


def geojson_points(table: pd.DataFrame, dets: pd.DataFrame) -> dict:
    """A GeoJSON FeatureCollection (RFC 7946: lon/lat in EPSG:4326) of one scene's detections.

    Properties: the CSV's columns, the unrounded pixel position and both class probabilities.
    Without georeferencing the geometries are null; the properties still locate each point in pixels.
    """
    features = []
    for t, d in zip(table.itertuples(index=False), dets.itertuples(index=False)):
        lon, lat = _json_number(t.lon), _json_number(t.lat)
        geometry = {"type": "Point", "coordinates": [lon, lat]} if lon is not None and lat is not None else None
        features.append({"type": "Feature", "geometry": geometry, "properties": {
            "scene_id": t.scene_id, "detect_scene_row": int(t.detect_scene_row),
            "detect_scene_column": int(t.detect_scene_column), "row": _json_number(d.row),
            "col": _json_number(d.col), "is_vessel": bool(t.is_vessel), "is_fishing": bool(t.is_fishing),
            "vessel_length_m": _json_number(t.vessel_length_m), "score": _json_number(t.score),
            "vessel_probability": _json_number(d.vessel), "fishing_probability": _json_number(d.fishing)}})
    return {"type": "FeatureCollection", "features": features}


def write_detections(dets: pd.DataFrame, scene_id: str, transform, crs, csv_path, geojson_path,
                     vessel_threshold: float, fishing_threshold: float, gsd: float | None) -> pd.DataFrame:
    """Write one scene's submission CSV and GeoJSON points, both or neither; return the CSV's table."""
    dets = dets.reset_index(drop=True)
    table = submission_table(dets, scene_id, transform, crs, vessel_threshold, fishing_threshold, gsd)
    with atomic_path(csv_path) as tmp_csv, atomic_path(geojson_path) as tmp_json:
        tmp_json.write_text(json.dumps(geojson_points(table, dets)) + "\n")
        table.to_csv(tmp_csv, index=False)
    return table


def merge_detections(csv_paths: Iterable[str | os.PathLike], out_path: str | os.PathLike) -> int:
    """Join per-scene CSVs (write_detections) into one submission CSV, atomically; its row count."""
    parts = [pd.read_csv(p, index_col=False, dtype={"scene_id": str}) for p in csv_paths]
    parts = [p for p in parts if len(p)]
    merged = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=list(CSV_COLUMNS))
    with atomic_path(out_path) as tmp:
        merged[list(CSV_COLUMNS)].to_csv(tmp, index=False)
    return len(merged)

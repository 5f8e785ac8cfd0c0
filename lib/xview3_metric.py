"""The xView3 aggregate metric as the challenge scored it, and point F1 within a distance.

Definitions follow the public xView3 reference scorer (DIUx-xView/xview3-reference, `metric.py`, and
the copy the winner kept in `xview3/metric.py`), run with the leaderboard flags `--distance_tolerance
200 --shore_tolerance 2 --costly_dist --drop_low_detect` and without `--score_all`. The names in
brackets below are the reference's.

* Matching [compute_loc_performance]: per scene, Euclidean distance between (row, column) pixel
  positions times 10 m/px [PIX_TO_M]; with `costly_dist`, pairs farther than the tolerance cost
  9999999 * 10 so the Hungarian assignment [linear_sum_assignment] never trades a near pair for a far
  one; an assigned pair is a true positive when its distance is *strictly* below 200 m. Unassigned
  predictions of a scored scene are false positives, unassigned labels false negatives.
* Scenes [main]: labels of scenes without any prediction are left out (the reference keeps only the
  scenes present in the submission), and scenes are those of the scored labels, so predictions in a
  scene whose labels are all LOW count nowhere. `score_unpredicted_scenes=True` scores every label.
* LOW labels [drop_low_confidence_preds, main]: predictions are first matched against all labels of
  their scene; those matched to a LOW label are removed; then only HIGH and MEDIUM labels are scored.
* Near shore [score, get_shore_preds]: labels with `distance_from_shore_km <= 2`; predictions within
  2 + 0.2 km (shore tolerance plus match tolerance) of any shoreline contour point, measured in pixels
  (2.2 km = 220 px). Matching is redone on these subsets, and only in scenes that have both near-shore
  labels and near-shore predictions. `loc_fscore_shore` is 0 when no scored scene has a near-shore
  label. (The reference also skips a prediction lying exactly on a contour point with no other point
  in range, an artefact of its sparse matrix; here distance 0 counts as near.)
* Vessel [compute_vessel_class_performance]: over matched pairs whose label has a known `is_vessel`;
  predicted and true both True = TP, predicted True / true False = FP, predicted False / true True = FN.
* Fishing [compute_fishing_class_performance]: the same over matched pairs whose label is a vessel
  (`is_vessel` True) with a known `is_fishing`.
* Precision, recall, F1 [calculate_p_r_f]: 0 wherever a denominator is 0.
* Length [compute_length_performance]: over matched pairs with a known label length, both lengths
  capped at 500 m [MAX_OBJECT_LENGTH_M]; `length_acc = 1 - min(mean(|pred - true| / true), 1)`, and 0
  when no pair has a length. (Labels with length <= 0 count as unknown: the reference would divide by 0.)
* Aggregate [aggregate_f]: `loc_fscore * (1 + length_acc + vessel_fscore + fishing_fscore +
  loc_fscore_shore) / 5`.

Missing shoreline data, where the reference would crash: a scene without `<scene_id>_shoreline.npy`
is left out of the near-shore component (its near-shore labels and predictions count nowhere) with a
warning; with no shoreline for any scored scene `loc_fscore_shore` is 0, the reference's value when it
runs without shore data.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment
from scipy.spatial import cKDTree

from lib.errors import UserError, one_line
from lib.geo_io import read_vector
from lib.metrics import prf

PIX_TO_M = 10.0
MAX_OBJECT_LENGTH_M = 500.0
DISTANCE_TOLERANCE_M = 200.0
SHORE_TOLERANCE_KM = 2.0
SCORED_CONFIDENCE = ("HIGH", "MEDIUM")
CONFIDENCE_LEVELS = ("HIGH", "MEDIUM", "LOW")
# The reference's cost for a pair beyond tolerance: larger than any sum of in-tolerance costs.
UNMATCHABLE_COST = 9999999 * PIX_TO_M

GT_COLUMNS = ("scene_id", "detect_scene_row", "detect_scene_column", "is_vessel", "is_fishing",
              "vessel_length_m", "distance_from_shore_km", "confidence")
PRED_COLUMNS = ("scene_id", "detect_scene_row", "detect_scene_column", "is_vessel", "is_fishing",
                "vessel_length_m")
_TRUE = {"true", "1", "1.0", "t", "yes"}
_FALSE = {"false", "0", "0.0", "f", "no"}


# ---------------------------------------------------------------------------------------------
# Matching: one code path for xView3 detections and building points.

def match_points(pred_xy, gt_xy, tolerance: float, scale: float = 1.0,
                 costly: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one Hungarian matching; the (pred, gt) index pairs closer than `tolerance`.

    Distances are `scale` times the Euclidean distance of the coordinates (10 for xView3 pixels to
    metres). With `costly`, pairs beyond the tolerance are unmatchable (a huge cost), so the
    assignment maximises the number of true positives first and minimises their distance second;
    without it, plain Hungarian on distances may give up a near pair to avoid a far one.
    """
    pred_xy = np.asarray(pred_xy, dtype=float).reshape(-1, 2)
    gt_xy = np.asarray(gt_xy, dtype=float).reshape(-1, 2)
    if len(pred_xy) == 0 or len(gt_xy) == 0:
        empty = np.zeros(0, dtype=int)
        return empty, empty
    dist = _distances(pred_xy, gt_xy) * scale
    cost = np.where(dist > tolerance, UNMATCHABLE_COST, dist) if costly else dist
    rows, cols = linear_sum_assignment(cost)
    keep = dist[rows, cols] < tolerance
    return rows[keep], cols[keep]


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distance matrix, the same float operations as scipy's `distance_matrix` (square, add,
    square root) without its row-by-row loop on large inputs."""
    d0 = a[:, None, 0] - b[None, :, 0]
    d1 = a[:, None, 1] - b[None, :, 1]
    return np.sqrt(d0 * d0 + d1 * d1)


def point_scores(gt_xy, pred_xy, tolerance: float) -> dict:
    """Precision, recall and F1 of points matched one-to-one within `tolerance` (same units as xy).

    Precision / recall are None where undefined (no predictions / no ground truth), as in the
    polygon scores of `lib.metrics`.
    """
    n_gt = len(np.asarray(gt_xy, dtype=float).reshape(-1, 2))
    n_pred = len(np.asarray(pred_xy, dtype=float).reshape(-1, 2))
    tp = len(match_points(pred_xy, gt_xy, tolerance)[0])
    return {**prf(tp, n_pred - tp, n_gt - tp), "tolerance": float(tolerance)}


def read_points(path: str | os.PathLike):
    """A vector file of Point geometries as a GeoDataFrame; anything else is a `UserError`."""

    gdf = read_vector(path, "points file")
    gdf = gdf[~(gdf.geometry.isna() | gdf.geometry.is_empty)]
    kinds = set(gdf.geom_type)
    if kinds - {"Point"}:
        raise UserError(f"{path}: expected Point geometries, found {', '.join(sorted(kinds - {'Point'}))}")
    return gdf


def points_xy(gt, pred) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates of two point GeoDataFrames in metres, in one projected CRS.

    Geographic (or non-metre) CRSs go to the local UTM zone of the ground truth, so a tolerance in
    metres means metres everywhere. Without a CRS on both, coordinates are taken as they are.
    """
    if gt.crs is None and pred.crs is None:
        return _xy(gt), _xy(pred)
    if gt.crs is None or pred.crs is None:
        raise UserError("points: one of the ground-truth / prediction files has no CRS; give both one")
    target = gt.crs if _metric(gt.crs) else (gt if len(gt) else pred).estimate_utm_crs()
    return _xy(gt.to_crs(target)), _xy(pred.to_crs(target))


def score_point_files(gt_path, pred_path, tolerance_m: float) -> dict:
    """`point_scores` for two point files (GeoJSON, GeoPackage, ...), tolerance in metres."""
    gt_xy, pred_xy = points_xy(read_points(gt_path), read_points(pred_path))
    return point_scores(gt_xy, pred_xy, tolerance_m)


def _metric(crs) -> bool:
    return bool(crs.is_projected) and crs.axis_info[0].unit_name in ("metre", "meter")


def _xy(gdf) -> np.ndarray:
    return np.column_stack([gdf.geometry.x.to_numpy(), gdf.geometry.y.to_numpy()]).reshape(-1, 2)


# ---------------------------------------------------------------------------------------------
# Reading and validating the xView3 CSVs.

def read_labels(path: str | os.PathLike) -> pd.DataFrame:
    """The xView3 label CSV, validated and normalised (see `prepare_labels`)."""
    return prepare_labels(_read_csv(path, "label"), str(path))


def read_predictions(path: str | os.PathLike) -> pd.DataFrame:
    """A detections CSV, validated and normalised (see `prepare_predictions`)."""
    return prepare_predictions(_read_csv(path, "predictions"), str(path))


def prepare_labels(df: pd.DataFrame, source: str = "labels") -> pd.DataFrame:
    """Labels with float row/column, tri-state is_vessel / is_fishing (1, 0, NaN = unknown),
    float lengths and shore distances (NaN = unknown) and upper-case confidence."""
    _require(df, GT_COLUMNS, source)
    out = _positions(df, source)
    for col in ("is_vessel", "is_fishing"):
        out[col] = _tristate(df[col], col, source)
    for col in ("vessel_length_m", "distance_from_shore_km"):
        out[col] = _numbers(df[col], col, source, allow_missing=True)
    conf = df["confidence"].astype("string").str.strip().str.upper().to_numpy(dtype=object)
    bad = sorted({str(c) for c in conf if c not in CONFIDENCE_LEVELS})
    if bad:
        raise UserError(f"{source}: confidence must be HIGH, MEDIUM or LOW, found {', '.join(bad[:5])}")
    out["confidence"] = conf
    return out


def prepare_predictions(df: pd.DataFrame, source: str = "predictions") -> pd.DataFrame:
    """Predictions with float positions and lengths and boolean is_vessel / is_fishing (all required)."""
    _require(df, PRED_COLUMNS, source)
    out = _positions(df, source)
    for col in ("is_vessel", "is_fishing"):
        values = _tristate(df[col], col, source)
        if np.isnan(values).any():
            raise UserError(f"{source}: column {col} has empty values; every prediction needs True/False")
        out[col] = values.astype(bool)
    out["vessel_length_m"] = _numbers(df["vessel_length_m"], "vessel_length_m", source, allow_missing=False)
    return out


def _read_csv(path, what: str) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {what} CSV does not exist")
    try:
        return pd.read_csv(path, index_col=False, dtype={"scene_id": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not a readable {what} CSV ({one_line(err)})") from None


def _require(df: pd.DataFrame, columns, source: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise UserError(f"{source}: missing column(s) {', '.join(missing)}")


def _positions(df: pd.DataFrame, source: str) -> pd.DataFrame:
    scene = df["scene_id"].astype("string")
    if scene.isna().any():
        raise UserError(f"{source}: column scene_id has empty values")
    out = pd.DataFrame({"scene_id": scene.str.strip().to_numpy(dtype=object)})
    for col in ("detect_scene_row", "detect_scene_column"):
        out[col] = _numbers(df[col], col, source, allow_missing=False)
    return out


def _numbers(series: pd.Series, col: str, source: str, allow_missing: bool) -> np.ndarray:
    values = pd.to_numeric(series, errors="coerce").to_numpy(dtype=float)
    text = series.astype("string").fillna("").str.strip().str.lower()
    bad = np.isnan(values) & ~text.isin(["", "nan"]).to_numpy(dtype=bool)
    if bad.any():
        raise UserError(f"{source}: column {col} has non-numeric values, e.g. {series[bad].iloc[0]!r}")
    if not allow_missing and np.isnan(values).any():
        raise UserError(f"{source}: column {col} has empty values")
    return values


def _tristate(series: pd.Series, col: str, source: str) -> np.ndarray:
    """1.0 / 0.0 / NaN (unknown) from booleans, 0/1 or true/false text."""
    out = np.full(len(series), np.nan)
    for i, value in enumerate(series.to_numpy(dtype=object)):
        if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
            continue
        text = str(value).strip().lower()
        if text in _TRUE:
            out[i] = 1.0
        elif text in _FALSE:
            out[i] = 0.0
        elif text not in ("", "nan"):
            raise UserError(f"{source}: column {col} must be True/False or empty, found {value!r}")
    return out


def check_scenes(gt: pd.DataFrame, pred: pd.DataFrame, source: str = "predictions") -> None:
    """Predictions must name scenes of the label file: another scene id is a mismatched file."""
    unknown = sorted(set(pred["scene_id"]) - set(gt["scene_id"]))
    if unknown:
        more = f" (+{len(unknown) - 3} more)" if len(unknown) > 3 else ""
        raise UserError(f"{source}: scene id(s) not in the label file: {', '.join(unknown[:3])}{more}")


# ---------------------------------------------------------------------------------------------
# Scoring.

def score_files(gt_path, pred_path, shore_root=None, **options) -> dict:
    """`score` for a label CSV and a predictions CSV; bad input is a `UserError` naming the file."""
    gt = read_labels(gt_path)
    pred = read_predictions(pred_path)
    check_scenes(gt, pred, str(pred_path))
    return score(gt, pred, shore_root, **options)


def score(gt: pd.DataFrame, pred: pd.DataFrame, shore_root=None, *,
          distance_tolerance_m: float = DISTANCE_TOLERANCE_M, shore_tolerance_km: float = SHORE_TOLERANCE_KM,
          pix_to_m: float = PIX_TO_M, score_all: bool = False, drop_low: bool = True,
          costly_dist: bool = True, score_unpredicted_scenes: bool = False) -> dict:
    """The xView3 scores (module docstring) for prepared labels and predictions.

    Defaults are the leaderboard's; `score_all` scores LOW labels too (and drops nothing), `drop_low`
    and `costly_dist` mirror the reference flags. Returns the six headline numbers plus counts.
    """
    gt, pred = prepare_labels(gt), prepare_predictions(pred)  # idempotent: files arrive prepared
    if not score_unpredicted_scenes:
        gt = gt[gt["scene_id"].isin(set(pred["scene_id"]))].reset_index(drop=True)
    match = {"tolerance": distance_tolerance_m, "scale": pix_to_m, "costly": costly_dist}
    n_pred = len(pred)
    if not score_all:
        if drop_low:
            pred = pred.drop(index=_low_matched(gt, pred, match)).reset_index(drop=True)
        gt = gt[gt["confidence"].isin(SCORED_CONFIDENCE)].reset_index(drop=True)

    pairs, fp, fn = _match_scenes(gt, pred, match)
    loc = _p_r_f(len(pairs), fp, fn)
    shore, missing = _shore_scores(gt, pred, shore_root, shore_tolerance_km, match)
    gt_idx, pred_idx = pairs[:, 1], pairs[:, 0]
    vessel = _class_scores(pred["is_vessel"].to_numpy()[pred_idx], gt["is_vessel"].to_numpy()[gt_idx])
    is_vessel = gt["is_vessel"].to_numpy()[gt_idx] == 1.0
    fishing = _class_scores(pred["is_fishing"].to_numpy()[pred_idx][is_vessel],
                            gt["is_fishing"].to_numpy()[gt_idx][is_vessel])
    length = _length_scores(pred["vessel_length_m"].to_numpy()[pred_idx],
                            gt["vessel_length_m"].to_numpy()[gt_idx])
    headline = {"loc_fscore": loc["fscore"], "loc_fscore_shore": shore["fscore"],
                "vessel_fscore": vessel["fscore"], "fishing_fscore": fishing["fscore"],
                "length_acc": length["length_acc"]}
    aggregate = headline["loc_fscore"] * (1 + headline["length_acc"] + headline["vessel_fscore"]
                                          + headline["fishing_fscore"] + headline["loc_fscore_shore"]) / 5
    return {**headline, "aggregate": float(aggregate),
            "loc": loc, "shore": shore, "vessel": vessel, "fishing": fishing, "length": length,
            "dropped_low_predictions": n_pred - len(pred), "shore_missing_scenes": missing,
            "settings": {"distance_tolerance_m": distance_tolerance_m, "shore_tolerance_km": shore_tolerance_km,
                         "pix_to_m": pix_to_m, "score_all": score_all, "drop_low": drop_low,
                         "costly_dist": costly_dist, "score_unpredicted_scenes": score_unpredicted_scenes}}


def _scene_rows(df: pd.DataFrame) -> dict:
    """Scene id -> positional row indices, in order of first appearance."""
    return {sid: idx.to_numpy() for sid, idx in df.groupby("scene_id", sort=False).groups.items()}


def _rc(df: pd.DataFrame) -> np.ndarray:
    return df[["detect_scene_row", "detect_scene_column"]].to_numpy(dtype=float).reshape(-1, 2)


def _match_scenes(gt: pd.DataFrame, pred: pd.DataFrame, match: dict) -> tuple[np.ndarray, int, int]:
    """Per-scene matching over the scenes of `gt`: (pred, gt) global index pairs, FP and FN counts."""
    pred_rows, pred_rc, gt_rc = _scene_rows(pred), _rc(pred), _rc(gt)
    pairs, fp, fn = [], 0, 0
    for sid, g_rows in _scene_rows(gt).items():
        p_rows = pred_rows.get(sid, np.zeros(0, dtype=int))
        p, g = match_points(pred_rc[p_rows], gt_rc[g_rows], **match)
        pairs.append(np.column_stack([p_rows[p], g_rows[g]]))
        fp += len(p_rows) - len(p)
        fn += len(g_rows) - len(g)
    pairs = np.vstack(pairs).astype(int) if pairs else np.zeros((0, 2), dtype=int)
    return pairs, fp, fn


def _low_matched(gt: pd.DataFrame, pred: pd.DataFrame, match: dict) -> np.ndarray:
    """Indices of predictions matched to a LOW label when matched against every label."""
    pairs, _, _ = _match_scenes(gt, pred, match)
    low = gt["confidence"].to_numpy()[pairs[:, 1]] == "LOW"
    return pairs[low, 0]


def _shore_scores(gt, pred, shore_root, shore_tolerance_km, match) -> tuple[dict, list]:
    """Near-shore detection scores and the scored scenes that had no shoreline file."""
    if not shore_root or not shore_tolerance_km:
        scenes = list(_scene_rows(gt))
        if scenes:
            warnings.warn("no shore_root given: loc_fscore_shore is 0, as the xView3 reference "
                          "outputs without shore data", stacklevel=3)
        return _p_r_f(0, 0, 0), scenes
    root = Path(shore_root)
    if not root.is_dir():
        raise UserError(f"{root}: shoreline directory does not exist")
    near_gt = gt["distance_from_shore_km"].to_numpy() <= shore_tolerance_km  # NaN: not near
    near_px = (shore_tolerance_km + match["tolerance"] / 1000) * 1000 / match["scale"]
    pred_rows, pred_rc, gt_rc = _scene_rows(pred), _rc(pred), _rc(gt)
    tp = fp = fn = 0
    missing = []
    for sid, g_rows in _scene_rows(gt).items():
        contour = _shoreline(root, sid)
        if contour is None:
            missing.append(sid)
            continue
        g_rows = g_rows[near_gt[g_rows]]
        p_rows = pred_rows.get(sid, np.zeros(0, dtype=int))
        p_rows = p_rows[_near(contour, pred_rc[p_rows], near_px)]
        if len(g_rows) and len(p_rows):  # as the reference: a scene counts only with both
            p, _ = match_points(pred_rc[p_rows], gt_rc[g_rows], **match)
            tp, fp, fn = tp + len(p), fp + len(p_rows) - len(p), fn + len(g_rows) - len(p)
    if missing:
        shown = ", ".join(missing[:3]) + (f" (+{len(missing) - 3} more)" if len(missing) > 3 else "")
        warnings.warn(f"{root}: no shoreline file for scene(s) {shown}; they are left out of "
                      "loc_fscore_shore", stacklevel=3)
    # No scene with near-shore labels and predictions leaves all counts 0, so F1 is the reference's 0.
    return _p_r_f(tp, fp, fn), missing


def _shoreline(root: Path, scene_id: str) -> np.ndarray | None:
    """All (row, col) contour points of a scene's shoreline file (an object array of contours)."""
    path = root / f"{scene_id}_shoreline.npy"
    if not path.is_file():
        return None
    try:
        contours = np.load(path, allow_pickle=True)  # the xView3 format is a pickled object array
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: not a readable shoreline .npy ({one_line(err)})") from None
    parts = [np.asarray(c, dtype=float).reshape(-1, 2) for c in contours]
    return np.vstack(parts) if parts else np.zeros((0, 2))


def _near(contour: np.ndarray, rc: np.ndarray, max_px: float) -> np.ndarray:
    """Which positions lie within `max_px` pixels of a contour point."""
    if len(contour) == 0 or len(rc) == 0:
        return np.zeros(len(rc), dtype=bool)
    dist, _ = cKDTree(contour).query(rc, k=1)
    return dist <= max_px


def _p_r_f(tp: int, fp: int, fn: int) -> dict:
    """The reference's precision / recall / F1: 0 wherever a denominator is 0."""
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    fscore = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": float(precision), "recall": float(recall), "fscore": float(fscore),
            "tp": int(tp), "fp": int(fp), "fn": int(fn)}


def _class_scores(pred: np.ndarray, truth: np.ndarray) -> dict:
    """Binary classification scores of matched pairs with a known true label (NaN = unknown)."""
    known = ~np.isnan(truth)
    pred, truth = pred[known].astype(bool), truth[known] == 1.0
    tp, fp = int(np.sum(pred & truth)), int(np.sum(pred & ~truth))
    fn, tn = int(np.sum(~pred & truth)), int(np.sum(~pred & ~truth))
    return {**_p_r_f(tp, fp, fn), "tn": tn}


def _length_scores(pred: np.ndarray, truth: np.ndarray) -> dict:
    """Length accuracy: 1 - mean relative error of capped lengths, clipped to [0, 1]."""
    known = np.isfinite(truth) & (truth > 0)
    truth = np.minimum(truth[known], MAX_OBJECT_LENGTH_M)
    pred = np.minimum(pred[known], MAX_OBJECT_LENGTH_M)
    if len(truth) == 0:
        return {"length_acc": 0.0, "mean_pct_error": None, "n": 0}
    error = float(np.mean(np.abs(pred - truth) / truth))
    return {"length_acc": 1.0 - min(error, 1.0), "mean_pct_error": error, "n": len(truth)}

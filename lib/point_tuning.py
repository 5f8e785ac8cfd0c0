"""Choosing the point task's objectness, vessel and fishing thresholds on labelled scenes, from one model run.

`find_hyperparameters.py task=points` runs the models once over the holdout scenes at the lowest
objectness threshold of the grid and hands the peaks ("candidates", `candidate_table`) to `search`.

Why one model run serves every trial: a pixel is a peak when it is at or above the threshold and no
neighbour in the NMS window beats it (lib.point_decoding); only larger neighbours, which are above
any threshold the pixel passes, can suppress it. So the peaks at threshold t are exactly the
candidates with objectness >= t, with the same values, and the vessel and fishing thresholds only
relabel them (lib.point_outputs.submission_table). The objectness comparison is done in float32, as
the engine's sink does it, so a filtered candidate set equals a run at that threshold.

Why the whole grid is cheap: in the xView3 metric the matching -- hence loc_fscore,
loc_fscore_shore and length_acc -- depends on positions only, i.e. on the objectness threshold alone,
while vessel_fscore and fishing_fscore are counts over the matched pairs. So for each objectness
threshold the metric (lib.xview3_metric.score) runs once, the matched pairs are found once, and the
vessel x fishing plane of the grid is scored with array operations. An exhaustive grid rather than
optuna (which find_hyperparameters.py uses for the learning-rate search, where every trial trains):
here a trial costs microseconds, the space is three bounded numbers, and the full grid is both
cheaper than a sampler's bookkeeping and deterministic. Ties (F1 plateaus are common on small
holdouts) go to the thresholds closest to the defaults: the choice moves away from them only when
it pays. The chosen and the default thresholds are then scored again by `score` itself, and those
are the numbers reported.

Scoring: every label of the holdout scenes counts (`score_unpredicted_scenes=True`). The challenge
left out scenes without any prediction, which on a holdout would let a high threshold "win" by
silencing a hard scene. Otherwise the leaderboard settings apply (lib.xview3_metric). `metric`
`loc_fscore` (building points: no vessel classes) maximises localisation F1 over objectness alone;
the vessel and fishing thresholds stay at their fixed values.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from lib.errors import UserError
from lib.point_inference import DEFAULT_THRESHOLDS
from lib.point_outputs import submission_table
from lib.xview3_metric import (
    DISTANCE_TOLERANCE_M,
    PIX_TO_M,
    PRED_COLUMNS,
    SCORED_CONFIDENCE,
    _low_matched,
    _match_scenes,
    prepare_labels,
    prepare_predictions,
    score,
)

AXES = ("objectness_threshold", "vessel_threshold", "fishing_threshold")
METRICS = ("aggregate", "loc_fscore")
HEADLINE = ("aggregate", "loc_fscore", "loc_fscore_shore", "vessel_fscore", "fishing_fscore", "length_acc")
_MATCH = {"tolerance": DISTANCE_TOLERANCE_M, "scale": PIX_TO_M, "costly": True}  # score()'s defaults


def threshold_grid(first: float, last: float, step: float) -> np.ndarray:
    """first, first + step, ..., last (inclusive), rounded so that stored values read as typed (0.15)."""
    first, last, step = float(first), float(last), float(step)
    if not (0 < first <= last <= 1 and step > 0):
        raise UserError(f"threshold_grid=[{first}, {last}, {step}]: give [first, last, step] with "
                        "0 < first <= last <= 1 and step > 0")
    n = int(np.floor((last - first) / step + 1e-9)) + 1
    return np.round(first + step * np.arange(n), 6)


def candidate_table(dets: pd.DataFrame, scene_id: str, transform, crs, gsd) -> pd.DataFrame:
    """One scene's peaks (lib.point_decoding columns) as submission rows plus their probabilities."""
    dets = dets.reset_index(drop=True)
    table = submission_table(dets, scene_id, transform, crs, 1.0, 1.0, gsd)  # classes are set per trial
    return table.assign(objectness=dets["objectness"].to_numpy(np.float32),
                        vessel=dets["vessel"].to_numpy(float), fishing=dets["fishing"].to_numpy(float))


def select(cand: pd.DataFrame, thresholds: dict) -> pd.DataFrame:
    """The submission rows inference would write at `thresholds` (AXES keys), from the candidates."""
    keep = cand["objectness"].to_numpy(np.float32) >= np.float32(thresholds["objectness_threshold"])
    rows = cand[keep].reset_index(drop=True)
    vessel = rows["vessel"].to_numpy(float) >= float(thresholds["vessel_threshold"])
    fishing = vessel & (rows["fishing"].to_numpy(float) >= float(thresholds["fishing_threshold"]))
    return rows.assign(is_vessel=vessel, is_fishing=fishing)


def evaluate(labels: pd.DataFrame, cand: pd.DataFrame, thresholds: dict, shore_root=None) -> dict:
    """The xView3 scores (HEADLINE plus localisation P/R and counts) at `thresholds`."""
    preds = select(cand, thresholds)
    result = score(labels, preds[list(PRED_COLUMNS)], shore_root, score_unpredicted_scenes=True)
    out = {k: float(result[k]) for k in HEADLINE}
    out.update(loc_precision=result["loc"]["precision"], loc_recall=result["loc"]["recall"], detections=len(preds))
    return out


def search(labels: pd.DataFrame, cand: pd.DataFrame, grids: dict, metric: str = "aggregate",
           shore_root=None) -> dict:
    """The best thresholds on `grids` ({AXES key: values}) for `metric`, and the objectness curve.

    Returns {"thresholds", "value" (the grid's objective there), "curve": one row per objectness
    threshold (its localisation scores and the best vessel/fishing thresholds there), "grid": the
    values tried (`search_grids`)}.
    """
    labels = prepare_labels(labels)
    grids = search_grids(grids, metric)
    obj, ves, fis = (grids[k] for k in AXES)
    values = np.zeros((len(obj), len(ves), len(fis)))
    curve = []
    for i, t in enumerate(obj):
        preds = select(cand, {"objectness_threshold": t, "vessel_threshold": 1.0, "fishing_threshold": 1.0})
        with warnings.catch_warnings():  # missing shore data: `evaluate` says it once, not once per threshold
            warnings.simplefilter("ignore")
            result = score(labels, preds[list(PRED_COLUMNS)], shore_root, score_unpredicted_scenes=True)
        loc, shore, length = result["loc_fscore"], result["loc_fscore_shore"], result["length_acc"]
        if metric == "aggregate":
            vessel, fishing = class_fscores(labels, preds, ves, fis)
            values[i] = loc * (1 + length + vessel[:, None] + fishing + shore) / 5  # score()'s expression
        else:
            values[i] = loc
        j, k = np.unravel_index(_best(values[i], [ves, fis]), values[i].shape)
        curve.append({"objectness_threshold": float(t), "detections": len(preds), "loc_fscore": float(loc),
                      "loc_precision": result["loc"]["precision"], "loc_recall": result["loc"]["recall"],
                      "loc_fscore_shore": float(shore), "length_acc": float(length),
                      "best_vessel_threshold": float(ves[j]), "best_fishing_threshold": float(fis[k]),
                      f"best_{metric}": float(values[i, j, k])})
    best = np.unravel_index(_best(values, [obj, ves, fis]), values.shape)
    chosen = {key: float(grids[key][b]) for key, b in zip(AXES, best)}
    return {"thresholds": chosen, "value": float(values[best]), "curve": curve,
            "grid": {k: [float(v) for v in g] for k, g in grids.items()}}


def search_grids(grids: dict, metric: str) -> dict:
    """The values `search` tries per threshold: `grids`, except that `loc_fscore` does not look at the
    classes, so their thresholds stay at a fixed value given, else at the default."""
    if metric not in METRICS:
        raise UserError(f"metric={metric}: use {' or '.join(METRICS)}")
    out = {k: np.asarray(grids[k], float) for k in AXES}
    if metric == "loc_fscore":
        for key in AXES[1:]:
            out[key] = out[key] if len(out[key]) == 1 else np.array([DEFAULT_THRESHOLDS[key]])
    return out


def _best(values: np.ndarray, axes: list) -> int:
    """Flat index of the maximum; ties go to the point nearest the defaults (then the first one)."""
    defaults = [DEFAULT_THRESHOLDS[k] for k in AXES[-len(axes):]]
    distance = sum(np.abs(np.asarray(a) - d).reshape([-1 if i == n else 1 for i in range(len(axes))])
                   for n, (a, d) in enumerate(zip(axes, defaults)))
    top = values == values.max()
    return int(np.flatnonzero(top)[np.argmin(np.broadcast_to(distance, values.shape)[top])])


def matched_pairs(labels: pd.DataFrame, preds: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(prediction, label) row indices of the pairs `score(..., score_unpredicted_scenes=True)` scores.

    The same steps as the metric: predictions matched to a LOW label (against every label) are
    dropped, then the rest are matched to the HIGH/MEDIUM labels, scene by scene.
    """
    labels = prepare_labels(labels)
    preds = prepare_predictions(preds[list(PRED_COLUMNS)])  # row for row: indices stay valid
    keep = np.ones(len(preds), bool)
    keep[_low_matched(labels, preds, _MATCH)] = False
    kept = preds[keep].reset_index(drop=True)
    scored = np.flatnonzero(labels["confidence"].isin(SCORED_CONFIDENCE).to_numpy())
    pairs, _, _ = _match_scenes(labels.iloc[scored].reset_index(drop=True), kept, _MATCH)
    return np.flatnonzero(keep)[pairs[:, 0]], scored[pairs[:, 1]]


def class_fscores(labels: pd.DataFrame, preds: pd.DataFrame, vessel_grid, fishing_grid) -> tuple:
    """vessel_fscore per vessel threshold [V] and fishing_fscore per (vessel, fishing) threshold [V, F].

    Over the matched pairs, as the metric counts them: vessel over labels with a known is_vessel;
    fishing over vessel labels with a known is_fishing, a prediction fishing only when it is a vessel.
    """
    p, g = matched_pairs(labels, preds)
    pv, pf = preds["vessel"].to_numpy(float)[p], preds["fishing"].to_numpy(float)[p]
    tv, tf = labels["is_vessel"].to_numpy(float)[g], labels["is_fishing"].to_numpy(float)[g]
    vessel_grid, fishing_grid = np.asarray(vessel_grid, float), np.asarray(fishing_grid, float)
    known = ~np.isnan(tv)
    said = (pv[known][None, :] >= vessel_grid[:, None]).astype(np.int64)
    truth = (tv[known] == 1.0).astype(np.int64)
    vessel = _fscore(said @ truth, said @ (1 - truth), (1 - said) @ truth)
    sel = (tv == 1.0) & ~np.isnan(tf)
    is_vessel = (pv[sel][None, :] >= vessel_grid[:, None]).astype(np.int64)
    fishes = (pf[sel][None, :] >= fishing_grid[:, None]).astype(np.int64)
    truth = (tf[sel] == 1.0).astype(np.int64)
    tp = (is_vessel * truth) @ fishes.T
    fp = (is_vessel * (1 - truth)) @ fishes.T
    return vessel, _fscore(tp, fp, truth.sum() - tp)


def _fscore(tp, fp, fn) -> np.ndarray:
    """The metric's F1 (lib.xview3_metric._p_r_f) element-wise: 0 wherever a denominator is 0."""
    tp, fp, fn = (np.asarray(a, np.int64) for a in (tp, fp, fn))
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        recall = np.where(tp + fn > 0, tp / (tp + fn), 0.0)
        return np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)

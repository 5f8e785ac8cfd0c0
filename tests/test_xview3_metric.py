"""The xView3 aggregate metric and point F1, against values computed by hand in the comments."""

import math
import warnings

import numpy as np
import pandas as pd
import pytest

from lib.errors import UserError
from lib.xview3_metric import (
    GT_COLUMNS,
    match_points,
    point_scores,
    points_xy,
    read_labels,
    score,
    score_files,
    score_point_files,
)

TOL = 1e-9


def labels(rows):
    """Label frame from (scene, row, col, is_vessel, is_fishing, length, shore_km, confidence) tuples."""
    return pd.DataFrame(rows, columns=list(GT_COLUMNS))


def preds(rows):
    """Prediction frame from (scene, row, col, is_vessel, is_fishing, length) tuples."""
    return pd.DataFrame(rows, columns=["scene_id", "detect_scene_row", "detect_scene_column",
                                       "is_vessel", "is_fishing", "vessel_length_m"])


def shoreline(root, scene_id, *contours):
    """Write `<root>/<scene>_shoreline.npy` as the xView3 object array of (row, col) contours."""
    arr = np.empty(len(contours), dtype=object)
    for i, c in enumerate(contours):
        arr[i] = np.asarray(c, dtype=float)
    np.save(root / f"{scene_id}_shoreline.npy", arr, allow_pickle=True)
    return root


# Scene "s": a near-shore fishing vessel, an offshore non-fishing vessel, an offshore non-vessel
# with unknown fishing. The shoreline runs along row 100, columns 150..160: (100, 100) is 50 px away
# (near), the others are > 220 px away.
GT = labels([
    ("s", 100, 100, True, True, 50.0, 1.0, "HIGH"),
    ("s", 500, 500, True, False, 100.0, 10.0, "MEDIUM"),
    ("s", 900, 900, False, None, 20.0, 10.0, "HIGH"),
])
PERFECT = preds([
    ("s", 100, 100, True, True, 50.0),
    ("s", 500, 500, True, False, 100.0),
    ("s", 900, 900, False, False, 20.0),
])


@pytest.fixture
def shore(tmp_path):
    return shoreline(tmp_path, "s", [[100, 150], [100, 155], [100, 160]], [[99, 160]])


def test_perfect_predictions_score_one_everywhere(shore):
    out = score(GT, PERFECT, shore)
    for key in ("loc_fscore", "loc_fscore_shore", "vessel_fscore", "fishing_fscore", "length_acc", "aggregate"):
        assert out[key] == pytest.approx(1.0, abs=TOL), key
    assert (out["loc"]["tp"], out["shore"]["tp"], out["vessel"]["tn"], out["fishing"]["tn"]) == (3, 1, 1, 1)


def test_one_miss_one_false_positive_and_errors_give_hand_computed_scores(shore):
    # Miss (500, 500); false positive far offshore at (2000, 2000); the non-vessel predicted as a
    # vessel; the near-shore vessel 60 m long instead of 50.
    # loc: TP 2, FP 1, FN 1 -> P = R = F = 2/3.
    # vessel over matched pairs: (100) TP, (900) predicted True / true False = FP -> P 1/2, R 1, F 2/3.
    # fishing: only (100) is a matched vessel with a known label: TP -> F 1.
    # length: |60-50|/50 = 0.2 and 0 -> mean 0.1 -> 0.9.  shore: (100) matched -> F 1.
    # aggregate = 2/3 * (1 + 0.9 + 2/3 + 1 + 1) / 5.
    pred = preds([
        ("s", 100, 100, True, True, 60.0),
        ("s", 900, 900, True, False, 20.0),
        ("s", 2000, 2000, True, False, 30.0),
    ])
    out = score(GT, pred, shore)
    assert (out["loc"]["tp"], out["loc"]["fp"], out["loc"]["fn"]) == (2, 1, 1)
    assert out["loc_fscore"] == pytest.approx(2 / 3, abs=TOL)
    assert (out["vessel"]["tp"], out["vessel"]["fp"], out["vessel"]["fn"]) == (1, 1, 0)
    assert out["vessel_fscore"] == pytest.approx(2 / 3, abs=TOL)
    assert out["fishing_fscore"] == pytest.approx(1.0, abs=TOL)
    assert out["length_acc"] == pytest.approx(0.9, abs=TOL)
    assert out["loc_fscore_shore"] == pytest.approx(1.0, abs=TOL)
    assert out["aggregate"] == pytest.approx(2 / 3 * (1 + 0.9 + 2 / 3 + 1 + 1) / 5, abs=TOL)


def test_unknown_vessel_and_fishing_labels_are_left_out_of_classification(shore):
    # (100): is_vessel unknown -> out of vessel scoring, and not a vessel for fishing scoring.
    # (500): vessel with unknown fishing -> in vessel scoring only. Predictions are all wrong on
    # the unknown fields, which must not matter: vessel TP 1 (500), TN 1 (900); fishing has no pair.
    gt = labels([
        ("s", 100, 100, None, True, 50.0, 1.0, "HIGH"),
        ("s", 500, 500, True, None, 100.0, 10.0, "HIGH"),
        ("s", 900, 900, False, None, 20.0, 10.0, "HIGH"),
    ])
    pred = preds([("s", 100, 100, False, False, 50.0), ("s", 500, 500, True, True, 100.0),
                  ("s", 900, 900, False, True, 20.0)])
    out = score(gt, pred, shore)
    v = out["vessel"]
    assert (v["tp"], v["fp"], v["fn"], v["tn"]) == (1, 0, 0, 1)
    assert out["vessel_fscore"] == pytest.approx(1.0, abs=TOL)
    f = out["fishing"]
    assert (f["tp"], f["fp"], f["fn"], f["tn"]) == (0, 0, 0, 0)
    assert out["fishing_fscore"] == 0.0  # the reference's value with nothing to score
    # aggregate = 1 * (1 + 1 + 1 + 0 + 1) / 5
    assert out["aggregate"] == pytest.approx(0.8, abs=TOL)


def test_predictions_matched_to_low_labels_are_dropped_not_false_positives(shore):
    # A LOW label at (300, 300) with a prediction 2 px away, and an unpredicted LOW label: the
    # prediction is removed, neither LOW label is a false negative -> the perfect score stays 1.
    gt = pd.concat([GT, labels([("s", 300, 300, True, False, 40.0, 10.0, "LOW"),
                                ("s", 1500, 1500, True, False, 40.0, 10.0, "LOW")])], ignore_index=True)
    pred = pd.concat([PERFECT, preds([("s", 302, 300, True, False, 40.0)])], ignore_index=True)
    out = score(gt, pred, shore)
    assert out["dropped_low_predictions"] == 1
    assert (out["loc"]["tp"], out["loc"]["fp"], out["loc"]["fn"]) == (3, 0, 0)
    assert out["aggregate"] == pytest.approx(1.0, abs=TOL)
    # score_all keeps LOW labels: TP 4 (incl. the LOW match), FN 1 -> R 4/5, P 1, F 8/9.
    all_out = score(gt, pred, shore, score_all=True)
    assert (all_out["loc"]["tp"], all_out["loc"]["fn"], all_out["dropped_low_predictions"]) == (4, 1, 0)
    assert all_out["loc_fscore"] == pytest.approx(8 / 9, abs=TOL)


@pytest.mark.parametrize("offset_px, matched", [(19.99, True), (20.0, False), (20.01, False)])
def test_match_needs_strictly_less_than_200_m(offset_px, matched):
    # 10 m/px: 19.99 px = 199.9 m matches; exactly 200 m does not (the reference's strict <).
    gt = labels([("s", 100, 100, True, False, 50.0, 10.0, "HIGH")])
    pred = preds([("s", 100, 100 + offset_px, True, False, 50.0)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no shore_root
        out = score(gt, pred, None)
    assert out["loc"]["tp"] == int(matched)
    assert out["loc_fscore"] == pytest.approx(1.0 if matched else 0.0, abs=TOL)


def test_hungarian_matching_beats_greedy_nearest_pairs():
    # Along one row: labels at columns 100 and 118, predictions at 110 and 130 (px).
    # Greedy takes the nearest pair first, 110-118 (8 px), leaving 130-100 = 30 px > 20: 1 TP.
    # The assignment takes 110-100 (10) + 130-118 (12): 2 TP.
    gt_xy = [[0, 100], [0, 118]]
    pred_xy = [[0, 110], [0, 130]]
    p, g = match_points(pred_xy, gt_xy, 200, scale=10)
    assert sorted(zip(p.tolist(), g.tolist())) == [(0, 0), (1, 1)]
    gt = labels([("s", 0, 100, True, False, 50.0, 10.0, "HIGH"), ("s", 0, 118, True, False, 50.0, 10.0, "HIGH")])
    pred = preds([("s", 0, 110, True, False, 50.0), ("s", 0, 130, True, False, 50.0)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert score(gt, pred, None)["loc"]["tp"] == 2


def test_pairs_beyond_tolerance_are_unmatchable_not_just_expensive():
    # Labels G1 = (0, 0), G2 = (0, 20); P1 = (0, 19): 19 px to G1, 1 px to G2; P2 at 30 px from G1
    # and 19 px from G2. Plain Hungarian on metres: 190 + 190 = 380 > 10 + 300 = 310, so it picks
    # P1-G2 and the useless P2-G1 (1 TP). With far pairs unmatchable it picks P1-G1 + P2-G2 (2 TP).
    y = (900 - 361 + 400) / 40  # solves x^2 + y^2 = 30^2 and x^2 + (y - 20)^2 = 19^2
    p2 = [math.sqrt(900 - y * y), y]
    gt_xy, pred_xy = [[0, 0], [0, 20]], [[0, 19], p2]
    assert len(match_points(pred_xy, gt_xy, 200, scale=10, costly=False)[0]) == 1
    assert len(match_points(pred_xy, gt_xy, 200, scale=10, costly=True)[0]) == 2


def test_length_is_capped_at_500_m_and_the_mean_error_clipped_at_one(shore):
    # (100): true 600, predicted 500 -> both 500 -> error 0. (500): true 100, predicted 1000 -> 500,
    # error 4. (900): exact. Mean (0 + 4 + 0) / 3 = 4/3 -> clipped to 1 -> length_acc 0.
    pred = PERFECT.assign(vessel_length_m=[500.0, 1000.0, 20.0])
    gt = GT.assign(vessel_length_m=[600.0, 100.0, 20.0])
    out = score(gt, pred, shore)
    assert out["length"]["mean_pct_error"] == pytest.approx(4 / 3, abs=TOL)
    assert out["length_acc"] == 0.0
    # Unknown lengths are skipped: with (500) unknown the mean is 0 -> 1.
    out = score(gt.assign(vessel_length_m=[600.0, None, 20.0]), pred, shore)
    assert (out["length"]["n"], out["length_acc"]) == (2, 1.0)


def test_nothing_near_shore_gives_zero_shore_score(shore):
    # All labels 10 km offshore: loc_fscore_shore is 0, aggregate = 1 * (1 + 1 + 1 + 1 + 0) / 5.
    out = score(GT.assign(distance_from_shore_km=10.0), PERFECT, shore)
    assert out["loc_fscore_shore"] == 0.0
    assert out["aggregate"] == pytest.approx(0.8, abs=TOL)


def test_near_shore_predictions_are_those_within_2_2_km_of_the_contour(tmp_path):
    # Contour point (0, 0). The label at (0, 100) is 1 km from shore by its table value. Predictions:
    # (0, 101) matches it and is 101 px = 1.01 km from the contour; (0, 219) is 2.19 km (near, FP);
    # (0, 221) is 2.21 km (not near, ignored). Shore: TP 1, FP 1 -> P 1/2, R 1, F 2/3.
    root = shoreline(tmp_path, "s", [[0, 0]])
    gt = labels([("s", 0, 100, True, False, 50.0, 1.0, "HIGH")])
    pred = preds([("s", 0, 101, True, False, 50.0), ("s", 0, 219, True, False, 50.0),
                  ("s", 0, 221, True, False, 50.0)])
    out = score(gt, pred, root)
    assert (out["shore"]["tp"], out["shore"]["fp"], out["shore"]["fn"]) == (1, 1, 0)
    assert out["loc_fscore_shore"] == pytest.approx(2 / 3, abs=TOL)


def test_no_predictions_score_zero(shore):
    # No prediction: every component 0 (the reference also leaves out labels of unpredicted scenes).
    out = score(GT, PERFECT.iloc[:0], shore)
    for key in ("loc_fscore", "loc_fscore_shore", "vessel_fscore", "fishing_fscore", "length_acc", "aggregate"):
        assert out[key] == 0.0, key
    assert out["loc"]["fn"] == 0
    assert score(GT, PERFECT.iloc[:0], shore, score_unpredicted_scenes=True)["loc"]["fn"] == 3


def test_missing_shoreline_file_leaves_the_scene_out_of_the_shore_score_with_a_warning(tmp_path):
    # Scene "t" (same objects) has no shoreline file: it is scored everywhere except near shore.
    root = shoreline(tmp_path, "s", [[100, 150]])
    gt = pd.concat([GT, GT.assign(scene_id="t")], ignore_index=True)
    pred = pd.concat([PERFECT, PERFECT.assign(scene_id="t")], ignore_index=True)
    with pytest.warns(UserWarning, match="no shoreline file for scene.*t"):
        out = score(gt, pred, root)
    assert out["shore_missing_scenes"] == ["t"]
    assert (out["loc"]["tp"], out["shore"]["tp"]) == (6, 1)
    assert out["aggregate"] == pytest.approx(1.0, abs=TOL)
    # Only a scene without shoreline: shore score 0, as the reference without shore data.
    with pytest.warns(UserWarning, match="no shoreline file"):
        out = score(GT.assign(scene_id="t"), PERFECT.assign(scene_id="t"), root)
    assert out["loc_fscore_shore"] == 0.0
    assert out["aggregate"] == pytest.approx(0.8, abs=TOL)


def test_files_round_trip_through_csv(tmp_path, shore):
    gt_csv, pred_csv = tmp_path / "gt.csv", tmp_path / "pred.csv"
    GT.to_csv(gt_csv, index=False)
    PERFECT.assign(score=0.9).to_csv(pred_csv, index=False)
    assert np.isnan(read_labels(gt_csv)["is_fishing"][2])  # empty cell = unknown
    assert score_files(gt_csv, pred_csv, shore)["aggregate"] == pytest.approx(1.0, abs=TOL)


def test_csv_without_a_column_is_a_user_error_naming_the_file(tmp_path, shore):
    gt_csv, pred_csv = tmp_path / "gt.csv", tmp_path / "pred.csv"
    GT.drop(columns="confidence").to_csv(gt_csv, index=False)
    PERFECT.to_csv(pred_csv, index=False)
    with pytest.raises(UserError, match=r"gt\.csv: missing column\(s\) confidence"):
        score_files(gt_csv, pred_csv, shore)


def test_predictions_for_unknown_scenes_are_a_user_error(tmp_path, shore):
    gt_csv, pred_csv = tmp_path / "gt.csv", tmp_path / "pred.csv"
    GT.to_csv(gt_csv, index=False)
    PERFECT.assign(scene_id="other").to_csv(pred_csv, index=False)
    with pytest.raises(UserError, match=r"pred\.csv: scene id\(s\) not in the label file: other"):
        score_files(gt_csv, pred_csv, shore)


def test_bad_values_are_user_errors():
    with pytest.raises(UserError, match="is_vessel must be True/False"):
        score(GT.assign(is_vessel=["yes?", True, False]), PERFECT, None)
    with pytest.raises(UserError, match="detect_scene_row has non-numeric"):
        score(GT, PERFECT.assign(detect_scene_row=["a", 1, 2]), None)
    with pytest.raises(UserError, match="is_fishing has empty values"):
        score(GT, PERFECT.assign(is_fishing=[True, None, False]), None)


def test_point_scores_count_one_to_one_matches_within_tolerance():
    # Ground truth (0, 0), (10, 0); predictions (1, 0) (match), (1.5, 0) (duplicate: FP),
    # (30, 0) (too far: FP). TP 1, FP 2, FN 1 -> P 1/3, R 1/2, F 0.4.
    out = point_scores([[0, 0], [10, 0]], [[1, 0], [1.5, 0], [30, 0]], tolerance=2.0)
    assert (out["tp"], out["fp"], out["fn"]) == (1, 2, 1)
    assert out["f1"] == pytest.approx(0.4, abs=TOL)
    assert point_scores([], [], 2.0)["f1"] is None


def test_geographic_points_are_scored_in_metres(tmp_path):
    # Two points ~5 m apart (0.000045 deg of latitude): matched within 10 m, not within 3 m.
    import geopandas as gpd
    from shapely.geometry import Point

    gt = gpd.GeoDataFrame(geometry=[Point(32.58, 0.31)], crs="EPSG:4326")
    pred = gpd.GeoDataFrame(geometry=[Point(32.58, 0.310045)], crs="EPSG:4326")
    gt_xy, pred_xy = points_xy(gt, pred)
    assert np.hypot(*(gt_xy[0] - pred_xy[0])) == pytest.approx(4.98, abs=0.02)
    gt.to_file(tmp_path / "gt.geojson")
    pred.to_file(tmp_path / "pred.geojson")
    assert score_point_files(tmp_path / "gt.geojson", tmp_path / "pred.geojson", 10.0)["f1"] == 1.0
    assert score_point_files(tmp_path / "gt.geojson", tmp_path / "pred.geojson", 3.0)["f1"] == 0.0

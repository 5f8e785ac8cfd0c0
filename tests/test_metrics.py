"""lib/metrics.py: pixel Jaccard sums and SpaceNet polygon matching."""

import numpy as np
import pytest
from shapely.geometry import box

from lib import metrics


def test_pixel_counts_ignore_region_and_empty_masks():
    pred = np.array([[1, 1], [0, 0]], bool)
    gt = np.array([[1, 0], [1, 0]], bool)
    assert metrics.pixel_counts(pred, gt) == (1, 3)
    assert metrics.pixel_counts(pred, gt, ignore=np.array([[0, 0], [1, 0]], bool)) == (1, 2)
    assert metrics.jaccard(0, 0) == 1.0


def test_matched_ground_truth_is_removed_and_confidence_decides_who_matches():
    gt = [box(0, 0, 10, 10)]
    # a loose proposal (IoU 0.64) with high confidence is matched first; the exact one becomes a FP
    pred = [box(0, 0, 10, 10), box(0, 0, 10, 6.4)]
    r = metrics.score_polygons(gt, pred, [0.5, 0.9], min_area=0)
    assert (r["tp"], r["fp"], r["fn"]) == (1, 1, 0) and r["matches"][0][0] == 1
    r = metrics.score_polygons(gt, pred, [0.9, 0.5], min_area=0)
    assert r["matches"][0][0] == 0 and r["matches"][0][2] == 1.0


def test_iou_must_exceed_threshold_and_min_area_filters_both_sides():
    gt = [box(0, 0, 10, 10), box(50, 50, 54, 54)]  # the second (16 px^2) is below min_area 20
    pred = [box(0, 0, 10, 5), box(50, 50, 54, 54), box(100, 100, 104, 105)]  # IoU 0.5 exactly; 16; 20 px^2
    r = metrics.score_polygons(gt, pred, min_area=20)
    # IoU 0.5 is not > 0.5 -> FP; the 16 px^2 proposal is not scored; 20 px^2 is not > 20 -> not scored
    assert (r["tp"], r["fp"], r["fn"]) == (0, 1, 1)
    r = metrics.score_polygons(gt, pred, min_area=0)
    assert (r["tp"], r["fp"], r["fn"]) == (1, 2, 1)


def test_jaccard_sum_is_sum_of_intersections_over_sum_of_unions_not_a_mean_of_images():
    total = metrics.JaccardSum()
    a_pred, a_gt = np.zeros((20, 20), bool), np.zeros((20, 20), bool)
    a_pred[0:10, 0:10] = True
    a_gt[0:10, 5:15] = True  # I 50, U 150
    b_gt = np.zeros((20, 20), bool)
    b_gt[0:2, 0:2] = True  # missed: I 0, U 4
    assert total.add("a", a_pred, a_gt) == pytest.approx(1 / 3)
    assert total.add("b", np.zeros((20, 20), bool), b_gt) == 0.0
    assert total.summary() == {"jaccard": pytest.approx(50 / 154), "intersection": 50, "union": 154}
    assert metrics.prf(0, 0, 0)["f1"] is None and metrics.prf(1, 1, 0)["precision"] == 0.5


def test_outline_stats_count_vertices_and_right_angle_corners_only():
    from shapely.geometry import Polygon

    square_with_collinear_vertex = Polygon([(0, 0), (5, 0), (10, 0), (10, 10), (0, 10)])  # 5 vertices, 4 corners
    triangle = Polygon([(0, 0), (10, 0), (0, 10)])  # one right angle of three corners
    stats = metrics.outline_stats([square_with_collinear_vertex, triangle])
    assert stats == {"polygons": 2, "vertices_per_polygon": 4.0, "right_angle_share": 5 / 7}
    nearly = Polygon([(0, 0), (10, 0), (10.5, 10), (0, 10)])  # corners of 92.9 and 87.1 degrees count
    assert metrics.outline_stats([nearly])["right_angle_share"] == 1.0
    assert metrics.outline_stats([])["vertices_per_polygon"] is None


def test_min_area_can_be_judged_on_ground_areas_given_beside_pixel_polygons():
    gt, pred = [box(0, 0, 10, 10)], [box(0, 0, 10, 10)]
    assert metrics.score_polygons(gt, pred, min_area=20, gt_areas=[25.0], pred_areas=[25.0])["tp"] == 1
    r = metrics.score_polygons(gt, pred, min_area=20, gt_areas=[10.0], pred_areas=[10.0])
    assert (r["tp"], r["fp"], r["fn"]) == (0, 0, 0)

"""Scores for building footprints: pixel Jaccard (the Open Cities metric) and SpaceNet polygon F1.

Pixel Jaccard is summed over a whole set -- sum of intersections / sum of unions -- as the competition
computed it, not averaged per image (an empty image would otherwise count as much as a city block).

Polygon scoring follows the SpaceNet rules: ground-truth polygons with area >= `min_area` and
proposals with area > `min_area` take part; proposals are taken in descending confidence (file order
on ties); each is matched to the *remaining* ground-truth polygon of highest IoU, counts as a true
positive when that IoU exceeds `iou_threshold`, and the matched ground truth is removed. Candidates
come from an STRtree, so scoring is near-linear in the number of polygons.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import shapely


def pixel_counts(pred: np.ndarray, gt: np.ndarray, ignore: np.ndarray | None = None) -> tuple[int, int]:
    """(intersection, union) pixel counts of two boolean masks, leaving out `ignore` pixels."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if pred.shape != gt.shape:
        raise ValueError(f"mask shapes differ: {pred.shape} vs {gt.shape}")
    if ignore is not None:
        keep = ~np.asarray(ignore, bool)
        pred, gt = pred & keep, gt & keep
    return int(np.count_nonzero(pred & gt)), int(np.count_nonzero(pred | gt))


def jaccard(intersection: float, union: float) -> float:
    """Intersection over union; two empty masks agree perfectly (1.0)."""
    return float(intersection) / float(union) if union else 1.0


@dataclass
class JaccardSum:
    """Accumulates intersections and unions over images: global = sum I / sum U."""

    intersection: int = 0
    union: int = 0
    per_image: dict = field(default_factory=dict)

    def add(self, image_id: str, pred: np.ndarray, gt: np.ndarray, ignore: np.ndarray | None = None) -> float:
        i, u = pixel_counts(pred, gt, ignore)
        self.intersection += i
        self.union += u
        self.per_image[image_id] = {"jaccard": jaccard(i, u), "intersection": i, "union": u}
        return jaccard(i, u)

    @property
    def value(self) -> float:
        return jaccard(self.intersection, self.union)

    def summary(self) -> dict:
        return {"jaccard": self.value, "intersection": self.intersection, "union": self.union}


def prf(tp: int, fp: int, fn: int) -> dict:
    """Precision, recall and F1 (None where undefined: nothing proposed / nothing to find)."""
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / (tp + fn) if tp + fn else None
    if precision is None or recall is None:
        f1 = None if tp + fp + fn == 0 else 0.0
    else:
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"tp": tp, "fp": fp, "fn": fn, "precision": precision, "recall": recall, "f1": f1}


def _polygonal(geoms) -> np.ndarray:
    geoms = np.asarray(list(geoms), dtype=object)
    if len(geoms) == 0:
        return geoms
    geoms = np.where(shapely.is_valid(geoms), geoms, shapely.make_valid(geoms))
    return geoms


def score_polygons(gt, pred, confidence=None, *, min_area: float = 20.0, iou_threshold: float = 0.5,
                   gt_areas=None, pred_areas=None) -> dict:
    """SpaceNet matching of proposals `pred` against ground truth `gt` (shapely geometries, same CRS).

    `gt_areas` / `pred_areas` are the areas compared with `min_area` (e.g. m^2 on the ground while
    the polygons are in pixels); by default the polygons' own areas. Returns prf() counts plus
    `matches` [(pred index, gt index, iou)] of the true positives.
    """
    gt, pred = _polygonal(gt), _polygonal(pred)
    gt_areas = shapely.area(gt) if gt_areas is None else np.asarray(gt_areas, dtype=float)
    pred_areas = shapely.area(pred) if pred_areas is None else np.asarray(pred_areas, dtype=float)
    gt_idx = [i for i, g in enumerate(gt) if g is not None and not g.is_empty and gt_areas[i] >= min_area]
    pr_idx = [i for i, g in enumerate(pred) if g is not None and not g.is_empty and pred_areas[i] > min_area]
    conf = np.ones(len(pred)) if confidence is None else np.asarray(confidence, dtype=float)
    order = sorted(pr_idx, key=lambda i: -conf[i])  # stable: file order on ties
    gts = gt[gt_idx] if gt_idx else np.array([], dtype=object)
    tree = shapely.STRtree(gts)
    remaining = np.ones(len(gts), bool)
    gt_area = shapely.area(gts) if len(gts) else np.array([])
    tp, matches = 0, []
    for i in order:
        p = pred[i]
        cand = [c for c in tree.query(p, predicate="intersects") if remaining[c]]
        if not cand:
            continue
        cand = np.asarray(cand)
        inter = shapely.area(shapely.intersection(p, gts[cand]))
        iou = inter / (p.area + gt_area[cand] - inter)
        best = int(np.argmax(iou))
        if iou[best] > iou_threshold:
            remaining[cand[best]] = False
            tp += 1
            matches.append((i, gt_idx[cand[best]], float(iou[best])))
    out = prf(tp, len(order) - tp, int(remaining.sum()))
    out["matches"] = matches
    return out


def outline_stats(geoms, tolerance_deg: float = 10.0) -> dict:
    """How squared a set of outlines is: vertices per polygon and the share of right-angle corners.

    `geoms` are shapely geometries or a GeoDataFrame, in a frame with equal x/y units (pixels or
    metres -- not longitude/latitude). A corner is a vertex where the outline turns by more than
    `tolerance_deg` (straight-through vertices are not corners); it counts as a right angle when the
    turn is within `tolerance_deg` of 90 degrees (inner or outer corner alike).
    """
    geoms = getattr(geoms, "geometry", geoms)
    parts = shapely.get_parts(np.asarray(list(geoms), dtype=object)) if len(geoms) else np.array([])
    parts = [p for p in parts if p is not None and p.geom_type == "Polygon" and not p.is_empty]
    vertices, corners, right = [], 0, 0
    for p in parts:
        count = 0
        for ring in (p.exterior, *p.interiors):
            xy = np.asarray(ring.coords)[:-1]
            count += len(xy)
            d = np.roll(xy, -1, axis=0) - xy
            d = d[np.hypot(d[:, 0], d[:, 1]) > 0]
            a = np.arctan2(d[:, 1], d[:, 0])
            turn = np.degrees(np.abs((a - np.roll(a, 1) + np.pi) % (2 * np.pi) - np.pi))
            turning = turn > tolerance_deg
            corners += int(turning.sum())
            right += int((turning & (np.abs(turn - 90) <= tolerance_deg)).sum())
        vertices.append(count)
    return {"polygons": len(parts), "vertices_per_polygon": float(np.mean(vertices)) if vertices else None,
            "right_angle_share": right / corners if corners else None}

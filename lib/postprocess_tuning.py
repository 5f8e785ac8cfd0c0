"""Choosing `threshold`, `seed_threshold` and `min_area` on a labelled holdout, with no model run per trial.

`find_hyperparameters.py mode=postprocess` runs the models once over the holdout and keeps every
image's maps (building probability; border and contact with the instance head) in memory as a
`Sample`. A trial then only turns those maps into footprints the way inference does --
lib.instances.label_instances (seeds + watershed; the mask's 4-connected components for models
without the head, as lib.footprints.Polygonizer), lib.instances.instance_pieces, then
lib.footprints.footprints_frame with the output options (simplify, regularize) -- and scores them with
the SpaceNet matcher of lib.metrics against the truth buildings. So a trial's score is the score
inference's footprints of these maps would get.

A plain grid rather than optuna: three axes of a few values each, and `min_area` only drops
footprints, so every `min_area` of a (threshold, seed_threshold) pair is scored on one set of
footprints -- the expensive part (watershed, regularisation) runs once per pair. Ties go to the values
nearest lib.postprocess.DEFAULTS, so a flat optimum does not move the settings for nothing.

Areas: `min_area` and the SpaceNet `score_min_area` are ground m^2 when a sample knows its ground
size (a CRS, or a chip GSD), pixels otherwise -- the units inference uses for the same image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import shapely

from lib import footprints, metrics, raster_outputs
from lib.errors import UserError
from lib.postprocess import DEFAULTS

AXES = ("threshold", "seed_threshold", "min_area")
METRICS = ("polygon_f1", "jaccard")


@dataclass
class Sample:
    """One holdout image: its maps (float32 0..1, 0 where not scored) and truth, in pixel coordinates.

    `transform`/`crs` give ground units for areas (an Affine scaling pixels to metres with crs None
    for a chip of known GSD; the scene's own for a georeferenced scene; both None = pixels).
    """

    name: str
    prob: np.ndarray
    border: np.ndarray | None
    contact: np.ndarray | None
    truth: list  # shapely polygons, one per building, pixel coordinates
    truth_mask: np.ndarray  # bool: building pixels of the truth (pixel Jaccard)
    ignore: np.ndarray | None = None  # bool: pixels not scored by the pixel Jaccard
    transform: object = None
    crs: object = None

    @property
    def instance_maps(self) -> bool:
        return self.border is not None and self.contact is not None

    @property
    def georeferenced(self) -> bool:
        return self.transform is not None


def ground_scale(geoms, sample: Sample, metric=None) -> np.ndarray:
    """Ground area units per pixel^2 at each pixel-coordinate geometry (1 without ground units)."""
    geoms = np.asarray(list(geoms), dtype=object)
    if not sample.georeferenced or len(geoms) == 0:
        return np.ones(len(geoms))
    px = shapely.area(geoms)
    ground = shapely.area(footprints.ground_geometries(geoms, sample.transform, sample.crs, metric))
    return np.where(px > 0, ground / np.maximum(px, 1e-12), 0.0)


def pixel_area(sample: Sample) -> float:
    """Ground area of one pixel at the image centre (px units: 1)."""
    h, w = sample.prob.shape
    cell = shapely.box(w // 2, h // 2, w // 2 + 1, h // 2 + 1)
    return float(ground_scale([cell], sample)[0])


def truth_from_ids(ids: np.ndarray) -> list:
    """Polygons of an instance-id raster (0 = background), one per id, in pixel coordinates."""
    from lib.instances import instance_pieces

    pieces = instance_pieces(ids.astype(np.int32), np.full(ids.shape, 255, np.uint8))
    return [p.geom for p in pieces]


def label(sample: Sample, threshold: float, seed_threshold: float | None, seed_min_px: int) -> np.ndarray:
    """Instance labels as inference makes them: seeds + watershed with the head, else 4-connected components."""
    if sample.instance_maps and seed_threshold is not None:
        from lib.instances import label_instances

        return label_instances(sample.prob, sample.border, sample.contact, threshold=float(threshold),
                               seed_threshold=float(seed_threshold), seed_min_px=int(seed_min_px))
    mask = (sample.prob >= float(threshold)).astype(np.uint8)
    return cv2.connectedComponents(mask, connectivity=4, ltype=cv2.CV_32S)[1]


@dataclass
class _Footprints:
    """One sample's footprints at one (threshold, seed_threshold), before the `min_area` filter."""

    geoms: np.ndarray  # written outlines (pixel coordinates)
    confidence: np.ndarray
    ground_px: np.ndarray  # mask pixels x ground area per pixel: what min_area is compared with
    outline_area: np.ndarray  # ground area of the outline: what score_min_area is compared with
    label_of: np.ndarray  # the instance id of each footprint (pixel Jaccard)
    labels: np.ndarray


def _footprints_of(sample: Sample, labels: np.ndarray, options: dict) -> _Footprints:
    from lib.instances import instance_pieces

    prob_u8 = np.round(np.clip(sample.prob, 0, 1) * 255).astype(np.uint8)
    pieces = instance_pieces(labels, prob_u8)
    frame = footprints.footprints_frame(pieces, None, None, min_area=0.0, simplify=options["simplify"],
                                        regularize=bool(options["regularize"]), angles=int(options["angles"]),
                                        gsd=math.sqrt(pixel_area(sample)) if sample.georeferenced else None)
    raw = np.array([p.geom for p in pieces], dtype=object)
    scale = ground_scale(raw, sample, options.get("metric"))
    geoms = np.asarray(frame.geometry.values, dtype=object)
    reps = shapely.point_on_surface(raw) if len(raw) else raw
    h, w = labels.shape
    rows = np.clip(np.floor(shapely.get_y(reps)).astype(int), 0, h - 1) if len(raw) else np.zeros(0, int)
    cols = np.clip(np.floor(shapely.get_x(reps)).astype(int), 0, w - 1) if len(raw) else np.zeros(0, int)
    return _Footprints(geoms, frame["confidence"].to_numpy(float), frame["area_px"].to_numpy(float) * scale,
                       shapely.area(geoms) * scale if len(geoms) else np.zeros(0), labels[rows, cols], labels)


def _truth_areas(sample: Sample, cache: dict) -> np.ndarray:
    if sample.name not in cache:
        cache[sample.name] = shapely.area(np.asarray(sample.truth, dtype=object)) * ground_scale(sample.truth,
                                                                                                  sample)
    return cache[sample.name]


def _score(samples: list[Sample], found: list[_Footprints], min_area: float, options: dict, cache: dict) -> dict:
    """polygon_f1 (SpaceNet counts summed over samples) and jaccard (summed I / U) at one `min_area`."""
    tp = fp = fn = 0
    jac = metrics.JaccardSum()
    for sample, f in zip(samples, found):
        keep = f.ground_px >= float(min_area)
        s = metrics.score_polygons(sample.truth, f.geoms[keep], f.confidence[keep],
                                   min_area=float(options["score_min_area"]), iou_threshold=float(options["iou"]),
                                   gt_areas=_truth_areas(sample, cache), pred_areas=f.outline_area[keep])
        tp, fp, fn = tp + s["tp"], fp + s["fp"], fn + s["fn"]
        lut = np.zeros(int(f.labels.max()) + 1, bool)
        lut[f.label_of[keep]] = True
        lut[0] = False
        jac.add(sample.name, lut[f.labels], sample.truth_mask, sample.ignore)
    out = metrics.prf(tp, fp, fn)
    return {"polygon_f1": out["f1"] or 0.0, "precision": out["precision"], "recall": out["recall"],
            "tp": tp, "fp": fp, "fn": fn, "jaccard": jac.value}


def seed_min_px(sample: Sample, seed_min_area: float) -> int:
    """`seed_min_area` (ground units, px without) as a pixel count, at least 1."""
    return raster_outputs.seed_min_px(seed_min_area, math.sqrt(max(pixel_area(sample), 1e-24)))  # as inference


def _pair(samples, threshold, seed_threshold, options) -> list[_Footprints]:
    return [_footprints_of(s, label(s, threshold, seed_threshold, seed_min_px(s, options["seed_min_area"])), options)
            for s in samples]


def evaluate(samples: list[Sample], settings: dict, options: dict) -> dict:
    """Scores of one setting {threshold, seed_threshold, min_area} (seed_threshold None: no instances)."""
    found = _pair(samples, settings["threshold"], settings["seed_threshold"], options)
    return _score(samples, found, settings["min_area"], options, {})


def search(samples: list[Sample], grids: dict, metric: str, options: dict) -> dict:
    """Every threshold x seed_threshold x min_area of `grids` scored; the best by `metric`, ties nearest
    the defaults. `grids["seed_threshold"]` = [None] for models without the instance head.

    `options`: simplify, regularize, angles (footprints_frame), seed_min_area, score_min_area, iou.
    Returns {"best": {settings, scores}, "curve": [rows], "grid": {axis: [values]}}.
    """
    if metric not in METRICS:
        raise ValueError(f"metric {metric!r}: use one of {', '.join(METRICS)}")
    cache: dict = {}
    curve = []
    for t in grids["threshold"]:
        for s in grids["seed_threshold"]:
            found = _pair(samples, t, s, options)
            for m in grids["min_area"]:
                curve.append({"threshold": float(t), "seed_threshold": None if s is None else float(s),
                              "min_area": float(m), **_score(samples, found, m, options, cache)})
    best = max(curve, key=lambda r: (round(r[metric], 12), -_distance(r)))
    return {"best": best, "curve": curve,
            "grid": {k: [None if v is None else float(v) for v in grids[k]] for k in AXES}}


def _distance(row: dict) -> float:
    """How far a setting is from the defaults, each axis relative to its default (ties: the nearest wins)."""
    total = 0.0
    for key in AXES:
        if row[key] is not None:
            total += abs(row[key] - DEFAULTS[key]) / max(DEFAULTS[key], 1e-9)
    return total


def grids(threshold_grid, seed_threshold_grid, min_area_grid, heads: bool) -> dict:
    """The values searched: two [first, last, step] threshold grids and a list of areas; without the
    instance head seed_threshold is not searched ([None])."""
    from lib.point_tuning import threshold_grid as steps

    out = {}
    for key, grid in (("threshold", threshold_grid), ("seed_threshold", seed_threshold_grid)):
        if grid is None or len(grid) != 3:
            raise UserError(f"{key}_grid={grid}: give [first, last, step], e.g. [0.3,0.9,0.1]")
        out[key] = steps(*grid)
    if not heads:
        out["seed_threshold"] = [None]
    areas = [float(a) for a in (min_area_grid or [])]
    if not areas or min(areas) < 0:
        raise UserError(f"min_area_grid={min_area_grid}: give a list of areas >= 0, e.g. [0,4,16]")
    out["min_area"] = np.array(sorted(set(areas)))
    return out


def headline(row: dict) -> dict:
    """The scores of a curve row or evaluation, without its settings."""
    return {k: row[k] for k in ("polygon_f1", "precision", "recall", "tp", "fp", "fn", "jaccard")}


def print_report(report: dict, out) -> None:
    """Defaults vs best, the inference.py overrides, where the choice was stored."""
    metric = report["metric"]

    def line(side: dict) -> str:
        s = side["scores"]
        settings = " ".join(f"{k}={side[k]:g}" for k in AXES if side[k] is not None)
        return (f"{settings}: {metric} {s[metric]:.4f} (polygon_f1 {s['polygon_f1']:.4f}, jaccard {s['jaccard']:.4f}, "
                f"tp {s['tp']} fp {s['fp']} fn {s['fn']})")

    print(f"defaults {line(report['default'])}")
    print(f"best {line(report['best'])}")
    print("inference.py overrides: " + " ".join(f"{k}={report['best'][k]:g}" for k in AXES
                                                if report["best"][k] is not None))
    if report["stored_in"]:
        print(f"stored in {report['stored_in']} (meta.postprocess): inference.py and combine_images.py use them "
              "unless given on their command line")
    print(f"report: {out}")

"""Squared building outlines: edges snapped to each building's dominant orientation with right angles.

A mask outline follows pixel stair-steps and model noise; a mapper wants the few straight walls of
the building. Each polygon (in pixel units, so tolerances do not depend on the CRS) is:

1. simplified (Douglas-Peucker, `tolerance` px) to find its walls;
2. measured for its dominant orientation: the mean of edge directions modulo 90 degrees, weighted
   by squared length so walls outweigh chamfered corners (angles x4 on the unit circle, so walls at
   0 and 90 degrees agree). How strongly the edges agree (about 0.1 for a circle or a triangle, 1
   for a rectangle) says whether the shape is rectilinear at all;
3. rotated so that orientation is the x axis; every edge is snapped to 0/90 degrees (or also
   45/135), runs of edges with one direction become one wall at their length-weighted mean offset
   (this keeps area and position), walls shorter than `2 * tolerance` are dropped, and the
   outline is rebuilt from the intersections of consecutive walls -- all corners exact;
4. rotated back and kept only if its IoU with the raw outline is >= `MIN_IOU` (else the raw one).
"""

from __future__ import annotations

import numpy as np
import shapely
from shapely.geometry import Polygon

MIN_IOU = 0.85          # a squared outline must overlap the raw one this well, or the raw one is kept
MIN_CONCENTRATION = 0.45  # edge directions must agree this much (0 circle .. 1 rectangle) to be squared


def dominant_orientation(coords: np.ndarray, fold: int = 4) -> tuple[float, float]:
    """(angle in radians, concentration 0..1) of a ring's edges modulo 360 / `fold` degrees."""
    d = np.diff(coords, axis=0)
    length = np.hypot(d[:, 0], d[:, 1]) ** 2  # long walls count most: corner chamfers are short
    if length.sum() == 0:
        return 0.0, 0.0
    z = np.sum(length * np.exp(1j * fold * np.arctan2(d[:, 1], d[:, 0])))
    return float(np.angle(z) / fold), float(abs(z) / length.sum())


def _walls(coords: np.ndarray, step: float) -> list[list[float]]:
    """Edges snapped to multiples of `step` (travel direction index, offset, length), runs merged."""
    d = np.diff(coords, axis=0)
    length = np.hypot(d[:, 0], d[:, 1])
    keep = length > 0
    d, length, mid = d[keep], length[keep], ((coords[:-1] + coords[1:]) / 2)[keep]
    n_dirs = round(2 * np.pi / step)
    k = np.round(np.arctan2(d[:, 1], d[:, 0]) / step).astype(int) % n_dirs
    phi = k * step
    offset = -np.sin(phi) * mid[:, 0] + np.cos(phi) * mid[:, 1]  # signed distance along the wall normal
    walls: list[list[float]] = []
    for ki, ci, li in zip(k, offset, length):
        if walls and walls[-1][0] == ki:
            _merge(walls[-1], [ki, ci, li])
        else:
            walls.append([int(ki), float(ci), float(li)])
    if len(walls) > 1 and walls[0][0] == walls[-1][0]:
        _merge(walls[0], walls.pop())
    return walls


def _merge(into: list, other: list) -> None:
    w = into[2] + other[2]
    into[1] = (into[1] * into[2] + other[1] * other[2]) / w
    into[2] = w


def _corners(walls: list, step: float) -> np.ndarray:
    """Intersection of each wall with the previous one (walls must not be parallel neighbours)."""
    phi = np.array([w[0] for w in walls]) * step
    c = np.array([w[1] for w in walls])
    n = np.column_stack([-np.sin(phi), np.cos(phi)])
    n_prev, c_prev = np.roll(n, 1, axis=0), np.roll(c, 1)
    det = n_prev[:, 0] * n[:, 1] - n_prev[:, 1] * n[:, 0]
    x = (c_prev * n[:, 1] - c * n_prev[:, 1]) / det
    y = (n_prev[:, 0] * c - n[:, 0] * c_prev) / det
    return np.column_stack([x, y])


def _clean(walls: list, n_dirs: int) -> bool:
    """Resolve parallel neighbours once: same direction -> merge, opposite -> drop the lighter one."""
    for i in range(len(walls)):
        a, b = walls[i - 1], walls[i]
        if (a[0] - b[0]) % (n_dirs // 2) == 0:
            if a[0] == b[0]:
                _merge(a, b)
                walls.pop(i)
            else:
                walls.pop(i if b[2] < a[2] else i - 1)
            return True
    return False


def square_ring(coords: np.ndarray, step: float, min_wall: float) -> np.ndarray | None:
    """An axis-aligned (multiples of `step`) ring rebuilt from snapped walls, or None if it collapses."""
    walls = _walls(coords, step)
    n_dirs = round(2 * np.pi / step)
    min_walls = 4 if n_dirs == 4 else 3
    while len(walls) >= min_walls:
        if _clean(walls, n_dirs):
            continue
        v = _corners(walls, step)
        phi = np.array([w[0] for w in walls]) * step
        seg = np.roll(v, -1, axis=0) - v  # wall i runs from corner i to corner i + 1
        signed = seg[:, 0] * np.cos(phi) + seg[:, 1] * np.sin(phi)
        worst = int(np.argmin(signed))
        if signed[worst] >= min_wall:
            return np.vstack([v, v[:1]])
        walls.pop(worst)
    return None


def square_polygon(poly: Polygon, angles: int = 90, tolerance: float = 1.0) -> Polygon | None:
    """The squared outline of one polygon (pixel units), or None when it should stay as it is.

    `angles` 90 allows right angles only; 45 also allows walls at 45 degrees to the main ones.
    """
    if poly.is_empty or poly.area <= 0:
        return None
    simple = shapely.simplify(poly, tolerance, preserve_topology=True)
    shell = np.asarray(simple.exterior.coords)
    theta, _ = dominant_orientation(shell)
    _, concentration = dominant_orientation(shell, 4 if angles == 90 else 8)
    if concentration < MIN_CONCENTRATION:
        return None
    origin = np.asarray(poly.centroid.coords[0])
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    step = np.pi / 2 if angles == 90 else np.pi / 4

    def square(ring) -> np.ndarray | None:
        local = (np.asarray(ring.coords) - origin) @ rot  # rotate by -theta
        out = square_ring(local, step, 2 * tolerance)
        return None if out is None else out @ rot.T + origin

    outer = square(simple.exterior)
    if outer is None:
        return None
    holes = [h for h in (square(r) for r in simple.interiors) if h is not None]
    out = Polygon(outer, holes)
    if not out.is_valid or out.area <= 0:
        return None
    inter = out.intersection(poly).area
    iou = inter / (out.area + poly.area - inter)
    return out if iou >= MIN_IOU else None


def square_polygons(geoms, angles: int = 90, tolerance=1.0) -> tuple[np.ndarray, np.ndarray]:
    """(geometries, squared flags): each polygon squared where that is faithful, else unchanged.

    `tolerance` (px; one, or one per polygon) finds the walls; where the squared outline is not
    faithful at it, walls found at half of it (at least 1 px) are tried: a building with a short jog
    gets it as an extra right-angled corner instead of staying unsquared."""
    out = np.empty(len(geoms), dtype=object)
    squared = np.zeros(len(geoms), bool)
    tolerances = np.broadcast_to(np.asarray(tolerance, dtype=float), (len(geoms),))
    for i, (g, t) in enumerate(zip(geoms, tolerances)):
        s = None
        if isinstance(g, Polygon):
            for tol in dict.fromkeys((t, max(t / 2, 1.0))):
                s = square_polygon(g, angles, tol)
                if s is not None:
                    break
        out[i], squared[i] = (s, True) if s is not None else (g, False)
    return out, squared

"""Instance ids -> the border and contact training targets that separate touching buildings.

The recipe of the SpaceNet-4 winners (and HOT's ramp): beside the building body a network learns each
building's *border* (building pixels close to a pixel of another id, background included) and the
*contact* zone (background pixels close to two different buildings). At inference, seeds are the body
minus border and contact, grown back by watershed (lib.instances), so buildings that touch come out as
separate footprints.

Both targets are "two different ids inside a disk": with an elliptical structuring element, a window
holds two different ids exactly when its maximum differs from its minimum, so one OpenCV dilation and one
erosion on the uint16 id image answer it for every pixel at once (milliseconds on a 1024 px chip,
instead of a per-building distance transform). For the border, background (0) counts as an id; for the
contact, background is set to the largest value before the erosion so that only building ids take part.
Chip edges are not borders: OpenCV's default border value never wins a min/max.
"""

from __future__ import annotations

import cv2
import numpy as np

_BIG = np.iinfo(np.uint16).max  # stands for "no building" in the contact erosion, so ids must stay below it


def _disk(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def _as_cv(ids: np.ndarray) -> tuple[np.ndarray, float]:
    """ids in a dtype OpenCV's morphology takes, and the stand-in for 'no building' in that dtype."""
    if ids.size and int(ids.max()) >= _BIG:  # more ids than uint16 holds: float64 is exact for them
        return ids.astype(np.float64), np.inf
    return ids.astype(np.uint16, copy=False), _BIG


def instance_targets(ids: np.ndarray, border_px: int, contact_px: int) -> tuple[np.ndarray, np.ndarray]:
    """(border, contact) float32 0/1 [H, W] for instance ids [H, W] (uint16/int32, 0 = background).

    border: building pixels within `border_px` of a pixel with another id (background included);
    contact: background pixels within `contact_px` of two different building ids. Widths are radii in
    pixels (at least 1).
    """
    ids = np.asarray(ids)
    work, big = _as_cv(ids)
    building = ids > 0
    b = _disk(max(1, int(border_px)))
    border = building & (cv2.dilate(work, b) != cv2.erode(work, b))
    c = _disk(max(1, int(contact_px)))
    lowest = cv2.erode(np.where(building, work, work.dtype.type(big)), c)  # smallest building id near
    contact = ~building & (lowest < cv2.dilate(work, c))  # ...below the largest: two different ones
    return border.astype(np.float32), contact.astype(np.float32)


def widths_px(gsd: float | None, border_m, contact_m, border_px, contact_px) -> tuple[int, int] | None:
    """(border, contact) radii in pixels: metres / GSD when the GSD is known, else the pixel widths;
    None when neither is given (the targets are then unknown)."""
    if gsd and border_m is not None and contact_m is not None:
        return max(1, round(float(border_m) / gsd)), max(1, round(float(contact_m) / gsd))
    if border_px is not None and contact_px is not None:
        return max(1, int(border_px)), max(1, int(contact_px))
    return None


def ids_from_mask(mask: np.ndarray) -> np.ndarray:
    """uint16 ids of a 0..255 mask's 4-connected components (chips prepared before instances.png existed:
    touching buildings share one id, so only their outer border is known)."""
    _, labels = cv2.connectedComponents((mask >= 128).astype(np.uint8), connectivity=4, ltype=cv2.CV_32S)
    return labels.astype(np.uint16)

"""Where the windows of a sliding-window sweep go, and how their overlaps are blended.

Used by the tiling engine (inference, validation) and by data preparation's grid mode, so a scene is
cut the same way everywhere: windows of `extent` pixels with `overlap`, the last one aligned to the edge.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

BLEND_FLOOR = 0.02  # weight floor of the Hann window: border pixels of the scene keep a weight
OUT_COLS = 2048  # finished rows are handed out, written and vectorised in column blocks of this width


def window_offsets(length: int, extent: int, overlap: int) -> list[int]:
    """Start offsets of windows of `extent` covering `length`; the last one ends at the edge."""
    if length <= extent:
        return [0]
    stride = max(1, extent - overlap)
    n = math.ceil((length - extent) / stride) + 1
    return sorted({min(i * stride, length - extent) for i in range(n)})


def blend_weights_1d(n: int, floor: float = BLEND_FLOOR) -> np.ndarray:
    """Hann window with a floor: centre pixels of a window count more than its seams."""
    i = np.arange(n, dtype=np.float64)
    return np.maximum(np.sin(np.pi * (i + 0.5) / n) ** 2, floor).astype(np.float32)


def weight_sums(length: int, extent: int, offsets: Sequence[int], floor: float = BLEND_FLOOR) -> np.ndarray:
    """Accumulated 1-D blend weight at every position; the 2-D sum is the outer product.

    Windows form a full grid, so the weight sum is separable and needs no per-pixel accumulator.
    Skipped (all-nodata) windows do not break this: every pixel they cover is nodata and written as 0.
    """
    w = blend_weights_1d(extent, floor)
    total = np.zeros(length, dtype=np.float32)
    for off in offsets:
        total[off:off + extent] += w[: max(0, min(extent, length - off))]
    return total


def model_size(extent: int, factor: float) -> tuple[int, int]:
    """(model pixels, padded source pixels) for a window side of `extent` source pixels.

    The model side is extent * factor rounded *up* to a multiple of 32; the window is padded by the
    few source pixels that this adds, so content is never cut and the resize factor stays `factor`.
    """
    m = max(32, math.ceil(extent * factor / 32.0 - 1e-9) * 32)
    padded = max(extent, math.ceil(m / factor - 1e-6))
    return m, padded

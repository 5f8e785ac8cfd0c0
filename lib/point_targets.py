"""Point labels -> the target maps CircleNet is trained against (keys and units: lib.point_contract).

Geometry (lib.point_contract): positions are input pixels with pixel centres at integers; output
cell (i, j) at stride s covers input pixels [s*i, s*i + s) and its reference point is the cell's
centre, s*i + (s - 1) / 2 (2i + 0.5 at the model's stride 2). An object belongs to the cell of the
input pixel it lies in, floor((row + 0.5) / s); for the integer positions of xView3 labels this is
floor(row / s).

What each map holds:
* heatmap: CenterNet's Gaussian "splat" with a fixed radius of HEATMAP_RADIUS cells (the seed's
  fixed radius; object sizes hardly vary in pixels, and unknown lengths need no special case). As in
  CenterNet's `draw_umich_gaussian`, the kernel covers (2r + 1)^2 cells with sigma = (2r + 1) / 6
  (7/6 cells for r = 3), is exactly 1.0 at the object's cell, and overlapping objects combine by
  element-wise maximum, so every object keeps its peak of 1.
* class, length and offset targets live on the cells within CLASS_RADIUS of an object: their weight
  is 1 at the object's cell and falls linearly to 0 at CLASS_RADIUS cells (distance between cell
  indices). Where several objects reach a cell, the one nearest to the cell's reference point owns
  it (ties: the earlier object), so tightly packed objects never average each other's labels.
* vessel / fishing: 0/1 target and weight where the owner's label is known; where it is unknown,
  target and weight are 0 and `*_unknown` carries the weight instead (the loss regularises the
  prediction's entropy there rather than guessing a label).
* length: the owner's length in input pixels, weight 0 where unknown.
* offset: (dy, dx) in output cells from the cell's reference point to the owner's position. The
  field is linear in the cell position around each object, which is what lets the decoder read it
  after bilinear upsampling (lib.point_decoding).
* valid: 1 where any input pixel of the cell had data.

Objects outside the chip still reach into it with their tails, exactly as they would in the whole
scene, so a chip's targets are a crop of the scene's targets.
"""

from __future__ import annotations

import numpy as np

from lib import point_contract as pc


def gaussian_sigma(radius: int = pc.HEATMAP_RADIUS) -> float:
    """CenterNet's sigma for a kernel of `radius` cells: the diameter (2r + 1) over 6."""
    return (2 * radius + 1) / 6


def _as_float(values, n: int, name: str) -> np.ndarray:
    out = np.asarray(values, dtype=np.float64).reshape(-1)
    if len(out) != n:
        raise ValueError(f"{name}: {len(out)} values for {n} objects")
    return out


def _window(radius: int) -> tuple[np.ndarray, np.ndarray]:
    """Cell offsets (di, dj) of the (2r + 1)^2 window."""
    d = np.arange(-radius, radius + 1)
    di, dj = np.meshgrid(d, d, indexing="ij")
    return di.reshape(-1), dj.reshape(-1)


def _splat(ci, cj, h: int, w: int, radius: int):
    """Every (object, window cell) pair inside the map: object index, flat cell index, di, dj."""
    di, dj = _window(radius)
    obj = np.repeat(np.arange(len(ci)), len(di))
    di, dj = np.tile(di, len(ci)), np.tile(dj, len(ci))
    ii, jj = ci[obj] + di, cj[obj] + dj
    inside = (ii >= 0) & (ii < h) & (jj >= 0) & (jj < w)
    return obj[inside], ii[inside] * w + jj[inside], di[inside].astype(np.float64), dj[inside].astype(np.float64)


def encode_heatmap(ci: np.ndarray, cj: np.ndarray, h: int, w: int, radius: int = pc.HEATMAP_RADIUS) -> np.ndarray:
    """[h, w] float32: the element-wise maximum of every object's Gaussian, 1.0 at each object's cell."""
    heat = np.zeros(h * w, np.float64)
    if len(ci):
        _, flat, di, dj = _splat(ci, cj, h, w, radius)
        sigma = gaussian_sigma(radius)
        np.maximum.at(heat, flat, np.exp(-(di * di + dj * dj) / (2 * sigma * sigma)))
    return heat.reshape(h, w).astype(np.float32)


def _owners(rows, cols, ci, cj, h: int, w: int, stride: int, radius: int):
    """Cells within `radius` of some object: flat index, owning object, weight and offset (cells).

    The owner is the object nearest to the cell's reference point (ties: the lower index); its
    weight falls linearly from 1 at its own cell to 0 at `radius` cells.
    """
    obj, flat, di, dj = _splat(ci, cj, h, w, radius)
    ref_r = (ci[obj] + di) * stride + (stride - 1) / 2
    ref_c = (cj[obj] + dj) * stride + (stride - 1) / 2
    dy, dx = (rows[obj] - ref_r) / stride, (cols[obj] - ref_c) / stride
    order = np.lexsort((obj, dy * dy + dx * dx, flat))  # per cell: nearest first, then lower index
    first = np.ones(len(order), bool)
    first[1:] = flat[order][1:] != flat[order][:-1]
    keep = order[first]
    weight = np.clip(1 - np.hypot(di[keep], dj[keep]) / radius, 0, None)
    return flat[keep], obj[keep], weight, dy[keep], dx[keep]


def _valid_cells(valid, shape, h: int, w: int, stride: int) -> np.ndarray:
    """[h, w]: any valid input pixel in the cell (cells past the edge of an odd-sized chip: partial)."""
    if valid is None:
        return np.ones((h, w), np.float32)
    valid = np.asarray(valid, dtype=bool)
    if valid.shape != tuple(shape):
        raise ValueError(f"valid: shape {valid.shape} differs from the chip's {tuple(shape)}")
    padded = np.zeros((h * stride, w * stride), bool)
    padded[:shape[0], :shape[1]] = valid
    return padded.reshape(h, stride, w, stride).any(axis=(1, 3)).astype(np.float32)


def encode_targets(rows, cols, is_vessel, is_fishing, length_px, shape, valid=None, *,
                   stride: int = pc.OUTPUT_STRIDE) -> dict[str, np.ndarray]:
    """Target maps (lib.point_contract T_* keys, float32 [1 or 2, h, w]) of one chip's objects.

    rows / cols: object positions in the chip's input pixels; is_vessel / is_fishing: 1, 0 or NaN
    (unknown); length_px: input pixels, NaN unknown; shape: the chip's (H, W); valid: [H, W] bool
    (None: all valid). The maps are at (ceil(H / stride), ceil(W / stride)); strides other than the
    model's 2 serve only the encoding analysis (lib.point_decoding.round_trip).
    """
    rows = np.asarray(rows, dtype=np.float64).reshape(-1)
    n = len(rows)
    cols = _as_float(cols, n, "cols")
    vessel, fishing = _as_float(is_vessel, n, "is_vessel"), _as_float(is_fishing, n, "is_fishing")
    length = _as_float(length_px, n, "length_px")
    if not (np.isfinite(rows).all() and np.isfinite(cols).all()):
        raise ValueError("rows/cols: every object needs a finite position")
    h, w = -(-int(shape[0]) // stride), -(-int(shape[1]) // stride)
    ci = np.floor((rows + 0.5) / stride).astype(np.int64)
    cj = np.floor((cols + 0.5) / stride).astype(np.int64)

    out = {name: np.zeros((1, h, w), np.float32) for name in pc.TARGETS}
    out[pc.T_OFFSET] = np.zeros((2, h, w), np.float32)
    out[pc.T_HEATMAP][0] = encode_heatmap(ci, cj, h, w)
    out[pc.T_VALID][0] = _valid_cells(valid, shape, h, w, stride)
    if n == 0:
        return out
    flat, owner, weight, dy, dx = _owners(rows, cols, ci, cj, h, w, stride, pc.CLASS_RADIUS)

    def put(name, values, channel=0):
        out[name][channel].reshape(-1)[flat] = values

    for label, target, t_weight, t_unknown in ((vessel, pc.T_VESSEL, pc.T_VESSEL_W, pc.T_VESSEL_UNKNOWN),
                                              (fishing, pc.T_FISHING, pc.T_FISHING_W, pc.T_FISHING_UNKNOWN)):
        known = ~np.isnan(label[owner])
        put(target, np.where(known, label[owner], 0.0))
        put(t_weight, np.where(known, weight, 0.0))
        put(t_unknown, np.where(known, 0.0, weight))
    known = np.isfinite(length[owner])
    put(pc.T_LENGTH, np.where(known, length[owner], 0.0))
    put(pc.T_LENGTH_W, np.where(known, weight, 0.0))
    put(pc.T_OFFSET, dy, 0)
    put(pc.T_OFFSET, dx, 1)
    put(pc.T_OFFSET_W, weight)
    return out

"""CircleNet outputs -> point detections: the engine decoder, CenterNet NMS, and an exact streaming sink.

The tiling engine (lib.tiling) is task-neutral: `PointDecoder` tells it which maps a CircleNet gives
and in which units, the engine tiles, un-flips, upsamples and blends them, and `PeakSink` turns the
finished blocks of a scene into a table of detections without ever holding the scene's maps.

Why offsets survive the engine's bilinear upsampling: the offset target of every cell near an object
is (object - cell reference point) (lib.point_targets), a field that is linear in the cell's
position. Bilinear interpolation reproduces a linear function exactly, and the engine samples the
stride-2 map at input pixel p at the fractional cell position whose reference point is p (cell i's
reference point 2i + 0.5 is where align_corners=False interpolation puts cell i). So the upsampled
offset at p, times the stride, is object - p, and a peak at input pixel p decodes to p + offset
wherever the four cells around p belong to the same object (always at its own peak, which lies
within a quarter cell of the object's cell).

Why NMS breaks ties: bilinear upsampling of a peak cell gives the same value at the 2 x 2 input
pixels around the cell's centre, and max-pool equality (CenterNet's NMS) would keep all four. A
pixel here is a peak when it is above the threshold, no neighbour within the kernel is larger, and
no neighbour *earlier in raster order* is equal, so a flat top keeps its first pixel only. The rule
only looks at the kernel's neighbourhood, which is what lets `PeakSink` reproduce it block by block.
The same averaging lowers peak values: a perfect stride-2 peak of 1 reads about 0.85 at input
pixels (9/16 of the peak cell, 7/16 of its neighbours), which the objectness threshold absorbs.

Units: offsets and lengths are in the model's input pixels, i.e. the scene's pixels when the engine
does not resize windows (width == tile_size, scale_factor 1, no GSD matching: the xView3 setting).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from lib import point_contract as pc
from lib.point_targets import encode_targets
from lib.xview3_metric import DISTANCE_TOLERANCE_M, PIX_TO_M, match_points

DETECTION_COLUMNS = ("row", "col", "objectness", "length_px", "vessel", "fishing")
AGREEMENT_THRESHOLD = 0.5  # reduced precision must reproduce fp32's objectness >= 0.5 cells
_ATTRIBUTES = (pc.M_OBJECTNESS, pc.M_LENGTH, pc.M_VESSEL, pc.M_FISHING)


class PointDecoder:
    """Decoded maps in input-pixel units: objectness, length, offset (dy, dx), vessel and fishing
    probabilities; no per-window scores. Inputs are the SAR source's uint8 windows (0 = nodata)."""

    maps = pc.MAPS
    scores = ()
    vectors = ((pc.M_OFFSET_Y, pc.M_OFFSET_X),)

    def prepare_input(self, t: torch.Tensor) -> torch.Tensor:
        return t.float() / 255

    def __call__(self, out: dict, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        maps = torch.cat([torch.sigmoid(out[pc.OBJECTNESS].float()), out[pc.LENGTH].float(),
                          out[pc.OFFSET].float() * pc.OUTPUT_STRIDE,  # output cells -> input pixels
                          torch.sigmoid(out[pc.VESSEL].float()), torch.sigmoid(out[pc.FISHING].float())], 1)
        return maps, torch.zeros((n, 0), device=device)

    def agreement(self, ref: torch.Tensor, low: torch.Tensor) -> float:
        """Share of cells whose objectness >= 0.5 is the same in both results."""
        i = pc.MAPS.index(pc.M_OBJECTNESS)
        return ((ref[:, i] >= AGREEMENT_THRESHOLD) == (low[:, i] >= AGREEMENT_THRESHOLD)).float().mean().item()


# ----- NMS --------------------------------------------------------------------------------------

def _check_kernel(kernel: int) -> int:
    if int(kernel) != kernel or kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"kernel={kernel}: the NMS kernel must be an odd number of pixels >= 1")
    return int(kernel)


def _peak_mask(x: torch.Tensor, threshold: float, kernel: int) -> torch.Tensor:
    """[H, W] bool: above `threshold`, no larger neighbour, no equal neighbour earlier in raster order."""
    r = _check_kernel(kernel) // 2
    x = x.float()[None, None]
    keep = x >= threshold
    if r:
        keep &= x == F.max_pool2d(x, kernel, stride=1, padding=r)
        above = F.max_pool2d(F.pad(x, (r, r, r, 0), value=-float("inf")), (r, kernel), stride=1)[..., :-1, :]
        left = F.max_pool2d(F.pad(x, (r, 0, 0, 0), value=-float("inf")), (1, r), stride=1)[..., :-1]
        keep &= x > torch.maximum(above, left)
    return keep[0, 0]


def find_peaks(objectness, threshold: float, kernel: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """CenterNet NMS with raster-order tie-breaking (module docstring): peak rows, cols in raster order."""
    x = torch.as_tensor(objectness)
    rr, cc = _peak_mask(x, threshold, kernel).nonzero(as_tuple=True)
    return rr.cpu().numpy(), cc.cpu().numpy()


def _gather(maps: dict, rr: np.ndarray, cc: np.ndarray) -> dict[str, np.ndarray]:
    """Every map's value at the peaks, as float32 numpy."""
    out = {}
    for name in pc.MAPS:
        m = torch.as_tensor(maps[name])
        idx = torch.as_tensor(rr, device=m.device), torch.as_tensor(cc, device=m.device)
        out[name] = m[idx].float().cpu().numpy()
    return out


def _table(peak_r: np.ndarray, peak_c: np.ndarray, values: dict) -> pd.DataFrame:
    """Detections from peaks (scene pixels) and the maps' values there, in raster order of the peaks."""
    return pd.DataFrame({
        "row": peak_r + values[pc.M_OFFSET_Y].astype(np.float64),
        "col": peak_c + values[pc.M_OFFSET_X].astype(np.float64),
        "objectness": values[pc.M_OBJECTNESS], "length_px": values[pc.M_LENGTH],
        "vessel": values[pc.M_VESSEL], "fishing": values[pc.M_FISHING]}, columns=list(DETECTION_COLUMNS))


def detect(maps: dict, threshold: float, kernel: int = 3) -> pd.DataFrame:
    """Detections of whole maps ({MAPS name: [H, W]}): `find_peaks` on objectness, offsets applied."""
    rr, cc = find_peaks(maps[pc.M_OBJECTNESS], threshold, kernel)
    return _table(rr.astype(np.float64), cc.astype(np.float64), _gather(maps, rr, cc))


class PeakSink:
    """An engine sink that finds the scene's peaks block by block, exactly as `detect` on the whole map.

    A peak decision needs only the kernel's neighbourhood. Peaks of a block at least kernel // 2 pixels
    from its edges are final when the block arrives; those nearer an edge are kept as candidates, and
    each block also leaves behind its edge strips (kernel // 2 wide) -- only their pixels at or above
    the threshold, since nothing lower can suppress a peak. `finish` checks every candidate against
    the strips of the other blocks. Memory: the peaks plus above-threshold edge pixels, not the scene.
    Blocks may come in any order and shape, as long as they tile the scene without overlapping.
    """

    def __init__(self, height: int, width: int, threshold: float, kernel: int = 3, *, nms_kernel: int | None = None):
        self.height, self.width = int(height), int(width)
        self.threshold = float(threshold)
        self.kernel = _check_kernel(kernel if nms_kernel is None else nms_kernel)
        self._peaks: list[tuple] = []  # (rows, cols, edge candidate?, values) per block
        self._strips: list[tuple] = []  # (flat index, objectness) per block

    def add(self, block) -> None:
        obj = block.maps[pc.M_OBJECTNESS]
        h, w = obj.shape
        r = self.kernel // 2
        rr, cc = find_peaks(obj, self.threshold, self.kernel)
        edge = (rr < r) | (rr >= h - r) | (cc < r) | (cc >= w - r)
        self._peaks.append((rr + block.row_off, cc + block.col_off, edge, _gather(block.maps, rr, cc)))
        if r:
            strip = torch.ones((h, w), dtype=torch.bool, device=obj.device)
            strip[r:h - r, r:w - r] = False
            sr, sc = (strip & (obj >= self.threshold)).nonzero(as_tuple=True)
            values = obj[sr, sc].float().cpu().numpy()
            flat = (sr.cpu().numpy() + block.row_off) * self.width + sc.cpu().numpy() + block.col_off
            self._strips.append((flat, values))

    def _suppressed(self, rows: np.ndarray, cols: np.ndarray, values: np.ndarray) -> np.ndarray:
        """Candidates with a larger, or an equal and earlier, neighbour in another block's strips."""
        out = np.zeros(len(rows), bool)
        if not self._strips or not len(rows):
            return out
        flat = np.concatenate([s[0] for s in self._strips])
        order = np.argsort(flat, kind="stable")
        flat, strip_values = flat[order], np.concatenate([s[1] for s in self._strips])[order]
        r = self.kernel // 2
        for dr in range(-r, r + 1):
            for dc in range(-r, r + 1):
                if dr == dc == 0:
                    continue
                nr, nc = rows + dr, cols + dc
                inside = (nr >= 0) & (nr < self.height) & (nc >= 0) & (nc < self.width)
                key = nr * self.width + nc
                pos = np.minimum(np.searchsorted(flat, key), len(flat) - 1)
                found = inside & (flat[pos] == key)
                v = strip_values[pos]
                earlier = dr < 0 or (dr == 0 and dc < 0)
                out |= found & ((v > values) | ((v == values) if earlier else False))
        return out

    def finish(self) -> pd.DataFrame:
        """The scene's detections, identical to `detect` on the whole map (rows in raster order)."""
        if not self._peaks:
            return _table(np.zeros(0), np.zeros(0), {name: np.zeros(0, np.float32) for name in pc.MAPS})
        rows = np.concatenate([p[0] for p in self._peaks])
        cols = np.concatenate([p[1] for p in self._peaks])
        edge = np.concatenate([p[2] for p in self._peaks])
        values = {name: np.concatenate([p[3][name] for p in self._peaks]) for name in pc.MAPS}
        drop = np.zeros(len(rows), bool)
        drop[edge] = self._suppressed(rows[edge], cols[edge], values[pc.M_OBJECTNESS][edge])
        keep = np.flatnonzero(~drop)
        keep = keep[np.lexsort((cols[keep], rows[keep]))]
        return _table(rows[keep].astype(np.float64), cols[keep].astype(np.float64),
                      {name: v[keep] for name, v in values.items()})


# ----- encoding analysis ------------------------------------------------------------------------

def round_trip(rows, cols, shape, stride: int = pc.OUTPUT_STRIDE, threshold: float = 0.5, kernel: int = 3,
               tolerance_m: float = DISTANCE_TOLERANCE_M, pix_to_m: float = PIX_TO_M) -> dict:
    """Localisation scores of ground truth encoded at `stride` and decoded as inference would.

    The seed's stride table: the targets (heatmap and offsets) stand in for a perfect model, are
    upsampled bilinearly to input pixels as the engine does, and go through `detect`; the decoded
    points are matched to the truth with the xView3 rule (Hungarian, within `tolerance_m`).
    """
    rows, cols = np.asarray(rows, float), np.asarray(cols, float)
    n = len(rows)
    unknown = np.full(n, np.nan)
    t = encode_targets(rows, cols, unknown, unknown, unknown, shape, stride=stride)
    H, W = int(shape[0]), int(shape[1])

    def up(a: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(a)[None, None]
        return F.interpolate(x, size=(a.shape[0] * stride, a.shape[1] * stride), mode="bilinear",
                             align_corners=False)[0, 0, :H, :W]

    zeros = torch.zeros((H, W))
    maps = {pc.M_OBJECTNESS: up(t[pc.T_HEATMAP][0]), pc.M_OFFSET_Y: up(t[pc.T_OFFSET][0]) * stride,
            pc.M_OFFSET_X: up(t[pc.T_OFFSET][1]) * stride, pc.M_LENGTH: zeros, pc.M_VESSEL: zeros,
            pc.M_FISHING: zeros}
    dets = detect(maps, threshold, kernel)
    pred = dets[["row", "col"]].to_numpy()
    truth = np.column_stack([rows, cols])
    p, g = match_points(pred, truth, tolerance_m, scale=pix_to_m)
    tp, fp, fn = len(p), len(pred) - len(p), n - len(p)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"stride": stride, "f1": f1, "precision": precision, "recall": recall, "tp": tp, "fp": fp, "fn": fn,
            "error_px": np.hypot(*(pred[p] - truth[g]).T), "matched_truth": g}

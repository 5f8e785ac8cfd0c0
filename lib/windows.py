"""Where the windows of a sliding-window sweep go, how their overlaps are blended, in bounded memory.

Used by the tiling engine (inference, validation) and by data preparation's grid mode, so a scene is
cut the same way everywhere: windows of `extent` pixels with `overlap`, the last one aligned to the edge.

`BlendSweep` is the engine's accumulator. Memory is bounded by the tile size, the batch and the
output block width, not by the scene, in both directions:
- The scene is swept one row of windows at a time, windows left to right. The accumulator is a set
  of column blocks (`out_cols` wide, the blocks that are handed out, written and vectorised) one
  window tall, created when the first window reaches them. A block is final for its row once the
  last window of the row that touches it has been added: its rows that no later row of windows
  touches are handed out at once and the block is dropped, so only the few blocks under the
  windows of the current batch are alive, whatever the scene width.
- The block's bottom rows (the overlap with the next row of windows) are carried to that row. The
  carried strip is overlap x scene width; up to `carry_ram_bytes` it stays on the device, beyond
  that every block's part goes to its fixed slot in an unlinked temporary file (in TMPDIR) and is
  read back when the next row reaches the block, so wide and tall scenes do not grow the RSS (the
  page cache holds the file, not the process).
- Sums are formed exactly as by a whole-scene accumulator: every pixel starts at 0 and adds its
  windows' weighted maps in row-major window order, and carried values are copied bit for bit; the
  result equals a whole-scene sweep's bit for bit (in fp32 on the CPU).
- A band of output rows [start, stop) computes every window row that touches it, and no other:
  its pixels get all their windows, so bands of a scene agree with the whole scene exactly.
"""

from __future__ import annotations

import bisect
import itertools
import math
import tempfile
from collections.abc import Iterator, Sequence

import numpy as np
import torch

BLEND_FLOOR = 0.02  # weight floor of the Hann window: border pixels of the scene keep a weight
OUT_COLS = 2048  # finished rows are handed out, written and vectorised in column blocks of this width
CARRY_RAM_BYTES = 16 * 2**20  # a carried strip (overlap x scene width) larger than this goes to a temporary file


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


def windows_touching(offsets: Sequence[int], extent: int, start: int, stop: int) -> range:
    """Indices of the windows (of `extent`, at sorted `offsets`) that touch positions [start, stop)."""
    if stop <= start:
        return range(0)
    first = bisect.bisect_right([o + extent for o in offsets], start)  # the first window ending after start
    return range(first, bisect.bisect_left(offsets, stop))  # ... up to the first one starting at stop or later


def balanced_bands(length: int, extent: int, overlap: int, n: int) -> list[tuple[int, int]]:
    """At most `n` bands [start, stop) covering `length` once, cut where a row of windows starts, with
    as equal numbers of window rows to compute as possible.

    A band computes every window row that touches it, so each cut costs the rows reaching across it
    once more. Fewer than `n` bands only when there are fewer window rows. Chosen by a small dynamic
    programme: the largest band's window rows first, then the sum of their squares (the rest even).
    """
    offsets = window_offsets(length, extent, overlap)
    rows, m = len(offsets), max(1, min(int(n), len(offsets)))
    first = np.array([windows_touching(offsets, extent, o, o + 1).start for o in offsets], np.int64)
    cut = np.arange(rows + 1)
    cost = cut[None, :] - first[:, None]  # [a, b]: window rows a band from cut a to cut b computes
    usable = cut[None, :] > np.arange(rows)[:, None]
    big, inf = (m + 1) * (rows + 1) ** 2 + 1, np.iinfo(np.int64).max  # key = max cost * big + sum of squares
    best = np.where(cut >= 1, cost[0] * big + cost[0] ** 2, inf)  # one band over cuts [0, b)
    choices = []
    for _ in range(m - 1):
        prev = best[:rows, None]
        known = prev < inf
        p = np.where(known, prev, 0)
        cand = np.where(usable & known, np.maximum(p // big, cost) * big + p % big + cost ** 2, inf)
        choices.append(cand.argmin(0))
        best = cand[choices[-1], cut]
    cuts = [rows]
    for arg in reversed(choices):
        cuts.append(int(arg[cuts[-1]]))
    bounds = [0] + [offsets[c] if c < rows else length for c in reversed(cuts)]
    return list(itertools.pairwise(bounds))


_OUTER: dict = {}  # (a, b, device) -> a x b: the weight grids of the last few window and block shapes
_OUTER_KEEP = 4


def outer(a: np.ndarray, b: np.ndarray, device) -> torch.Tensor:
    """The outer product of two float32 weight vectors, [len(a), len(b)] on `device` (a x b in float32, as
    ever), made once for the last few pairs: a folder of same-sized tiles asks for the same window weights
    and weight sums for every image (two products of 1024 x 1024 per tile). Never modified by callers."""
    key = (a.tobytes(), b.tobytes(), str(device))
    grid = _OUTER.get(key)
    if grid is None:
        grid = torch.from_numpy(a).to(device)[:, None] * torch.from_numpy(b).to(device)[None, :]
        if len(_OUTER) >= _OUTER_KEEP:
            _OUTER.pop(next(iter(_OUTER)))
        _OUTER[key] = grid
    return grid


class BlendSweep:
    """Blend one scene's windows into finished blocks with Hann weights, in column blocks (see above).

    Calls, in row-major window order over the window rows `rows` (those touching `band`): `add(j, ...)`
    for every predicted window j of the current row k, `advance(k, j)` once windows 0..j of row k are
    all added or skipped, and `finish_row(k)` at the end of each row. The last two yield
    (row_off, col_off, maps, valid) blocks of the output rows within `band`: maps [n_maps, h, w]
    normalised by the summed weight and 0 on nodata, valid [h, w].
    """

    def __init__(self, n_maps: int, height: int, width: int, extent_h: int, extent_w: int, *, overlap: int,
                 band: tuple[int, int], out_cols: int, floor: float = BLEND_FLOOR, device="cpu",
                 carry_ram_bytes: int = CARRY_RAM_BYTES):
        self.n_maps, self.H, self.W, self.eh, self.ew = n_maps, height, width, extent_h, extent_w
        self.row_offsets = window_offsets(height, extent_h, overlap)
        self.col_offsets = window_offsets(width, extent_w, overlap)
        self.band = band
        self.rows = windows_touching(self.row_offsets, extent_h, *band)
        self.device = torch.device(device)
        self.w2d = outer(blend_weights_1d(extent_h, floor), blend_weights_1d(extent_w, floor), self.device)
        self.sum_r = weight_sums(height, extent_h, self.row_offsets, floor)
        self.sum_c = weight_sums(width, extent_w, self.col_offsets, floor)
        self.out_cols = out_cols
        self.blocks = [(c, min(width, c + out_cols)) for c in range(0, width, out_cols)]
        # the last window of a row that touches each block: once it is added, the block is final
        self.last_window = [bisect.bisect_left(self.col_offsets, c1) - 1 for _, c1 in self.blocks]
        self.live: dict[int, tuple[torch.Tensor, np.ndarray]] = {}
        self.next_block = 0  # the first block of the current row not yet handed out
        carry_rows = max([self.eh - self._finished_rows(k) for k in self.rows[:-1]], default=0)
        self.carry = _CarryStore(n_maps, carry_rows, out_cols, width, self.device, carry_ram_bytes)
        self.peak_bytes = self.peak_cols = 0

    def _finished_rows(self, k: int) -> int:
        """Rows of window row k's accumulator that no later window row touches."""
        end = self.row_offsets[k + 1] if k + 1 < len(self.row_offsets) else self.H
        return end - self.row_offsets[k]

    def _block(self, b: int) -> tuple[torch.Tensor, np.ndarray]:
        """Block b's accumulator in the current row, started from the rows carried from the row above."""
        if b not in self.live:
            c0, c1 = self.blocks[b]
            acc = torch.zeros((self.n_maps, self.eh, c1 - c0), device=self.device)
            valid = np.zeros((self.eh, c1 - c0), dtype=bool)
            carried = self.carry.take(b)
            if carried is not None:
                acc[:, :carried[0].shape[1]] = carried[0]
                valid[:carried[1].shape[0]] = carried[1]
            self._start(b, acc, valid)
        return self.live[b]

    def _start(self, b: int, acc: torch.Tensor, valid: np.ndarray) -> None:
        self.live[b] = acc, valid
        cols = sum(v.shape[1] for _, v in self.live.values())
        self.peak_cols = max(self.peak_cols, cols)
        self.peak_bytes = max(self.peak_bytes, cols * self.eh * (4 * self.n_maps + 1) + self.carry.ram_bytes)

    def add(self, j: int, maps: torch.Tensor, valid: np.ndarray) -> None:
        """Add window j of the current row: its maps [n_maps, eh, ew], Hann-weighted, and validity [eh, ew]."""
        c = self.col_offsets[j]
        weighted = maps * self.w2d
        for b in range(c // self.out_cols, (c + self.ew - 1) // self.out_cols + 1):
            c0, c1 = self.blocks[b]
            lo, hi = max(c, c0), min(c + self.ew, c1)
            part, part_valid = weighted[:, :, lo - c:hi - c], valid[:, lo - c:hi - c]
            if b not in self.live and (lo, hi) == (c0, c1) and not self.carry.holds(b):
                # the first window of a block covers it whole: its weighted maps are the block's sum so far
                # (0 + x = x), with no zeroed accumulator to add them to -- a tile's whole-scene window
                self._start(b, part, part_valid.copy())
                continue
            acc, v = self._block(b)
            acc[:, :, lo - c0:hi - c0] += part
            v[:, lo - c0:hi - c0] |= part_valid

    def advance(self, k: int, j: int) -> Iterator[tuple[int, int, torch.Tensor, np.ndarray]]:
        """Hand out the blocks of row k that no window after window j touches."""
        while self.next_block < len(self.blocks) and self.last_window[self.next_block] <= j:
            yield from self._hand_out(k, self.next_block)
            self.next_block += 1

    def finish_row(self, k: int) -> Iterator[tuple[int, int, torch.Tensor, np.ndarray]]:
        yield from self.advance(k, len(self.col_offsets))
        self.next_block = 0

    def _hand_out(self, k: int, b: int) -> Iterator[tuple[int, int, torch.Tensor, np.ndarray]]:
        top, n = self.row_offsets[k], self._finished_rows(k)
        lo, hi = max(top, self.band[0]), min(top + n, self.band[1])
        c0, c1 = self.blocks[b]
        acc, v = self._block(b)
        del self.live[b]
        if k + 1 < self.rows.stop:
            self.carry.put(b, acc[:, n:], v[n:])
        if lo < hi:
            valid = v[lo - top:hi - top].copy()
            out = acc[:, lo - top:hi - top] / outer(self.sum_r[lo:hi], self.sum_c[c0:c1], self.device)
            if not valid.all():  # most blocks of most scenes have imagery everywhere
                out.masked_fill_(~torch.from_numpy(valid).to(self.device), 0.0)
        del acc, v  # the block is gone before the consumer gets its rows
        if lo < hi:
            yield lo, c0, out, valid

    def close(self) -> None:
        self.carry.close()


class _CarryStore:
    """The bottom rows of finished blocks, kept for the next row of windows: on the device up to
    `ram_limit` bytes for the whole strip, else each block's part at a fixed slot of a temporary file."""

    def __init__(self, n_maps: int, rows: int, out_cols: int, width: int, device, ram_limit: int):
        self.device = device
        self.slot = rows * out_cols * (4 * n_maps + 1)
        spill = rows * width * (4 * n_maps + 1) > ram_limit
        self.file = tempfile.TemporaryFile(prefix="blend_carry_") if spill else None  # noqa: SIM115 - see close()
        self.held: dict[int, tuple] = {}  # block -> (maps, valid) on the device, or their shapes in the file
        self.ram_bytes = 0

    def put(self, b: int, maps: torch.Tensor, valid: np.ndarray) -> None:
        if valid.size == 0:  # no overlap with the next row of windows
            return
        if self.file is None:
            self.held[b] = maps.clone(), valid.copy()
            self.ram_bytes += maps.numel() * 4 + valid.size
            return
        self.file.seek(b * self.slot)
        self.file.write(memoryview(maps.contiguous().cpu().numpy()).cast("B"))
        self.file.write(memoryview(np.ascontiguousarray(valid)).cast("B"))
        self.held[b] = tuple(maps.shape), valid.shape

    def holds(self, b: int) -> bool:
        return b in self.held

    def take(self, b: int) -> tuple[torch.Tensor, np.ndarray] | None:
        item = self.held.pop(b, None)
        if item is None or self.file is None:
            if item is not None:
                self.ram_bytes -= item[0].numel() * 4 + item[1].size
            return item
        maps = np.empty(item[0], np.float32)
        valid = np.empty(item[1], bool)
        self.file.seek(b * self.slot)
        self.file.readinto(memoryview(maps).cast("B"))
        self.file.readinto(memoryview(valid).cast("B"))
        return torch.from_numpy(maps).to(self.device), valid

    def close(self) -> None:
        if self.file is not None:
            self.file.close()

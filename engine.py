"""The one tiled inference engine: tiling, padding, resizing, TTA, ensembles, blending, writing.

Every script that turns imagery into building probabilities goes through `Engine` (inference,
validation, export checks), and every script that writes probability/mask rasters goes through
`SceneWriter` (inference, combine_images), so tiling and georeferencing rules live in one place.

How a scene is predicted:
- The scene is covered by windows of `tile_size` source pixels (the whole side when the scene is
  smaller) with `overlap`; the last window of a row/column is aligned to the scene edge, so reads never
  leave the image and nothing is stretched.
- Each window is resized by `width / tile_size * scale_factor` (times source GSD / training GSD with
  `match_gsd`; the training GSD is checkpoint meta `gsd`, `train_gsd` or `ref_scale`) to a model size
  that is a multiple of 32. When the scaled size is not a multiple of 32 the window is reflect-padded
  at its bottom/right just enough to keep the scale exact, and the padding is cropped off again.
- Every (model, width, TTA) combination is predicted in batches; softmax probabilities of the 2-class
  head are un-transformed exactly, upsampled bilinearly to the window, and averaged.
- Overlapping windows are blended with a separable Hann weight (with a floor so scene borders keep a
  weight) and normalised by the accumulated weight, so a constant model gives a seamless constant map.
- The scene is swept in rows of windows with one accumulator of window height x scene width (shifted
  in place); each finished band of rows is handed out in column blocks (OUT_COLS) that are quantised,
  written by Window and vectorised, so memory does not grow with the scene height and the per-block
  work does not grow with its width. Windows that are entirely nodata are skipped; nodata/alpha
  pixels are always 0.
- Precision: `fp32`, `bf16`/`fp16` (autocast), or `auto`: on CUDA bf16 (fp16 where bf16 is missing),
  on CPUs with AMX/AVX512-BF16 bf16, elsewhere fp32 (emulated bf16 ran ~8x slower than fp32 on an
  AVX2 CPU); the reduced precision is kept only if its masks agree with fp32 on >= 99.5 % of the
  pixels of the first batch.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import os
import shutil
import threading
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import rasterio
import torch
import torch.nn.functional as F
from rasterio.windows import Window

from lib import geo_io
from lib.windows import BLEND_FLOOR, blend_weights_1d, model_size, weight_sums, window_offsets  # noqa: F401
from lib.cli import progress_bar
from lib.errors import UserError
from lib.files import atomic_path

# --------------------------------------------------------------------------------------------------
# Test-time augmentation: the dihedral transforms of a tile, each inverted exactly.
# --------------------------------------------------------------------------------------------------

# `transpose_*` = transpose first, then flip (the original pipeline's `flip=3 transpose=True`).
TTA_NAMES = ("none", "hflip", "vflip", "hvflip", "transpose", "transpose_hflip", "transpose_vflip",
             "transpose_hvflip")
_SEED_FLIPS = {0: "none", 2: "vflip", 3: "hflip", 23: "hvflip", 32: "hvflip"}
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
AGREEMENT_MIN = 0.995  # reduced precision must give the fp32 mask on this share of pixels
OUT_COLS = 2048  # finished rows are converted, written and vectorised in column blocks of this width


def seed_tta_name(flip: int | str = 0, transpose: bool = False) -> str:
    """Name of the TTA that the original pipeline's `flip` (0|2|3|23) and `transpose` keys select."""
    try:
        name = _SEED_FLIPS[int(flip)]
    except (KeyError, ValueError):
        raise UserError(f"flip={flip}: must be 0, 2 (vertical), 3 (horizontal) or 23 (both)") from None
    if transpose:
        return "transpose" if name == "none" else f"transpose_{name}"
    return name


def parse_tta(tta: Sequence[str] | str | None, flip: int | str = 0, transpose: bool = False) -> list[str]:
    """Validated list of TTA names; without `tta` the seed keys select one transform."""
    if tta is None:
        return [seed_tta_name(flip, transpose)]
    names = [tta] if isinstance(tta, str) else list(tta)
    for name in names:
        if name not in TTA_NAMES:
            raise UserError(f"tta={name}: unknown transform; choose from {', '.join(TTA_NAMES)}")
    if not names:
        raise UserError("tta=[]: give at least one transform, e.g. tta=[none]")
    return list(dict.fromkeys(names))


def tta_forward(x: torch.Tensor, name: str) -> torch.Tensor:
    """Apply a TTA transform to the last two (H, W) dimensions."""
    if name.startswith("transpose"):
        x = x.transpose(-2, -1)
        name = name[len("transpose"):].lstrip("_") or "none"
    if name == "hflip":
        return x.flip(-1)
    if name == "vflip":
        return x.flip(-2)
    if name == "hvflip":
        return x.flip(-2, -1)
    return x


def tta_inverse(y: torch.Tensor, name: str) -> torch.Tensor:
    """Undo `tta_forward(., name)` on a prediction (flips are self-inverse; transpose comes last)."""
    flip = name[len("transpose"):].lstrip("_") if name.startswith("transpose") else name
    y = tta_forward(y, flip or "none")
    return y.transpose(-2, -1) if name.startswith("transpose") else y


# --------------------------------------------------------------------------------------------------
# Window geometry
# --------------------------------------------------------------------------------------------------

class RasterSource:
    """A georeferenced (or plain) image read by windows with the data-preparation rules."""

    def __init__(self, path: str | os.PathLike, stretch: str = geo_io.STRETCH_PERCENTILE, stretch_low: float = 2,
                 stretch_high: float = 98, stretch_range=None, zero_is_nodata: bool = False):
        self.path = Path(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            self.ds = geo_io.open_raster(self.path)
        geo_io.check_readable(self.ds, self.path)
        bands, _ = geo_io.band_layout(self.ds)
        value_range = tuple(stretch_range) if stretch_range is not None else None
        self.stretch = geo_io.stretch_range(self.ds, bands, stretch, stretch_low, stretch_high, value_range)
        self.zero_is_nodata = zero_is_nodata
        self.height, self.width = self.ds.height, self.ds.width
        self.gsd = geo_io.raster_gsd(self.ds)

    def read(self, row: int, col: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        return geo_io.read_window(self.ds, Window(col, row, w, h), self.stretch, self.zero_is_nodata)

    def reopen(self) -> RasterSource:
        """Another handle on the same image with the same stretch (one per reading thread)."""
        other = object.__new__(RasterSource)
        other.__dict__.update(self.__dict__)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            other.ds = rasterio.open(self.path)
        return other

    def close(self) -> None:
        self.ds.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ArraySource:
    """An in-memory RGB uint8 image (validation, tests) with an optional valid mask."""

    def __init__(self, rgb: np.ndarray, valid: np.ndarray | None = None, gsd: float | None = None):
        self.rgb = np.ascontiguousarray(rgb)
        self.valid = np.ones(rgb.shape[:2], bool) if valid is None else valid.astype(bool)
        self.height, self.width = rgb.shape[:2]
        self.gsd = gsd

    def read(self, row: int, col: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        rgb = self.rgb[row:row + h, col:col + w].copy()
        valid = self.valid[row:row + h, col:col + w].copy()
        rgb[~valid] = 0
        return rgb, valid

    def reopen(self) -> ArraySource:
        return self

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Pass:
    """One model at one width with its TTA transforms; all passes of a run are averaged."""

    model: int
    width: int
    tta: tuple[str, ...]


@dataclass
class Strip:
    """A finished block of rows x columns: probability (float on the engine device, 0 on nodata), validity."""

    row_off: int
    prob: torch.Tensor
    valid: np.ndarray
    col_off: int = 0


@dataclass
class SceneStats:
    """Per-scene figures for negative mining and reports."""

    windows: int = 0
    skipped: int = 0
    cls_prob: float = float("nan")  # max over windows of the classification head's building probability
    max_prob: float = 0.0  # max pixel probability
    accumulator_shape: tuple[int, int] = (0, 0)
    passes: list = field(default_factory=list)


@dataclass
class _Item:
    row_index: int
    row: int
    col: int
    valid: np.ndarray
    inputs: dict


def _cpu_has_native_bf16() -> bool:
    """AMX or AVX512-BF16: the CPUs on which bf16 autocast is faster than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def build_passes(n_models: int, widths, tta) -> list[Pass]:
    """Passes for every model x width; `widths`/`tta` may be flat lists or one list per model."""
    def per_model(value, name):
        if value and isinstance(value[0], (list, tuple)):
            if len(value) != n_models:
                raise UserError(f"{name}: {len(value)} lists given for {n_models} models; give one per model "
                                f"or a flat list for all")
            return [list(v) for v in value]
        return [list(value)] * n_models

    passes = []
    for m, (ws, ts) in enumerate(zip(per_model(list(widths), "widths"), per_model(list(tta), "tta"))):
        ts = parse_tta(ts)
        for w in ws:
            w = int(w)
            if w <= 0 or w % 32:
                raise UserError(f"width={w}: must be a positive multiple of 32 (e.g. 512, 672, 1024)")
            passes.append(Pass(m, w, tuple(ts)))
    return passes


class Engine:
    """Predict building probability maps of whole scenes with tiles, TTA, ensembles and blending."""

    def __init__(self, models: Sequence[torch.nn.Module], *, widths: Sequence = (1024,),
                 tta: Sequence = ("none",), tile_size: int = 1024, overlap: int | None = None, batch_size: int = 8,
                 device: str | torch.device = "cpu", precision: str = "fp32", scale_factor: float = 1.0,
                 match_gsd: bool = False, num_workers: int = 1, progress: bool = False,
                 blend_floor: float = BLEND_FLOOR, channels_last: bool = True):
        import model as model_lib

        if tile_size < 32:
            raise UserError(f"tile_size={tile_size}: must be at least 32 source pixels")
        overlap = tile_size // 4 if overlap is None else overlap
        if not 0 <= overlap < tile_size:
            raise UserError(f"overlap={overlap}: must be >= 0 and smaller than tile_size={tile_size}")
        if precision not in PRECISIONS:
            raise UserError(f"precision={precision}: choose one of {', '.join(PRECISIONS)}")
        if scale_factor <= 0:
            raise UserError(f"scale_factor={scale_factor}: must be positive")
        self.lib = model_lib
        self.device = torch.device(device)
        # channels_last: cuDNN and oneDNN run EfficientNet's depthwise convolutions much faster in NHWC
        # (measured 1.7x for b1 at 672 px on a 2-core AVX2 CPU, fp32); the outputs are unchanged.
        self.channels_last = bool(channels_last)
        self.models = [m.eval().to(self.device) for m in models]
        if self.channels_last:
            self.models = [m.to(memory_format=torch.channels_last) for m in self.models]
        # graphs run outside PyTorch (ONNX Runtime) take plain NCHW arrays
        self.is_onnx = [getattr(m, "format", "") == "onnx" for m in self.models]
        self.passes = build_passes(len(self.models), widths, tta)
        self.tile_size, self.overlap = int(tile_size), int(overlap)
        self.batch_size = max(1, int(batch_size))
        self.scale_factor, self.match_gsd = float(scale_factor), bool(match_gsd)
        self.num_workers = max(0, int(num_workers))  # 0: read in the calling thread
        self.progress, self.blend_floor = progress, blend_floor
        self.out_cols = max(OUT_COLS, self.tile_size)  # finished rows are handed out in blocks this wide
        self.precision = precision
        self._dtype = self._initial_dtype(precision)
        self.agreement: float | None = None  # reduced-vs-fp32 mask agreement measured by precision=auto
        self.stats = SceneStats()

    # ----- precision ------------------------------------------------------------------------------
    def _initial_dtype(self, precision: str) -> torch.dtype | None:
        """None = fp32; a dtype = autocast to it. `auto` is resolved on the first batch."""
        if precision == "fp32":
            return None
        if precision in ("bf16", "fp16"):
            return torch.bfloat16 if precision == "bf16" else torch.float16
        return "auto"

    def _autocast(self, dtype):
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def _auto_candidate(self) -> torch.dtype | None:
        if self.device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if self.device.type == "cpu" and _cpu_has_native_bf16():
            return torch.bfloat16
        return None

    def _resolve_auto(self, model, x) -> None:
        """Pick the reduced precision when its masks agree with fp32 on >= 99.5 % of the first batch."""
        candidate = self._auto_candidate()
        self._dtype = None
        if candidate is None:  # CPU without AMX/AVX512-BF16: emulated bf16 is many times slower than fp32
            return
        ref, _ = self._run_model(model, x, None)
        low, _ = self._run_model(model, x, candidate)
        agreement = ((ref >= 0.5) == (low >= 0.5)).float().mean().item()
        if agreement >= AGREEMENT_MIN:
            self._dtype = candidate
        self.agreement = agreement

    @property
    def precision_name(self) -> str:
        d = self._dtype
        return "auto" if d == "auto" else {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[d]

    # ----- model calls ----------------------------------------------------------------------------
    def _run_model(self, model, x: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Building probability [N, h, w] at the model's output stride, and image-level probability [N]."""
        with torch.inference_mode(), self._autocast(dtype):
            out = model(x)
        seg = out[self.lib.SEG] if isinstance(out, dict) else out
        seg = seg.float()
        prob = torch.softmax(seg, 1)[:, 1] if seg.shape[1] >= 2 else torch.sigmoid(seg[:, 0])
        cls = out.get(self.lib.CLS) if isinstance(out, dict) else None
        cls_prob = torch.softmax(cls.float(), 1)[:, 1] if cls is not None else torch.full(
            (x.shape[0],), float("nan"), device=x.device)
        return prob, cls_prob

    def _forward(self, model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._dtype == "auto":
            self._resolve_auto(model, x[: self.batch_size])
        outs = [self._run_model(model, chunk, self._dtype) for chunk in x.split(self.batch_size)]
        return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])

    def _to_device(self, batch: np.ndarray) -> torch.Tensor:
        """uint8 [N, H, W, 3] -> normalised float [N, 3, H, W] on the device (pinned, non-blocking on CUDA)."""
        t = torch.from_numpy(batch)
        if self.device.type == "cuda":
            t = t.pin_memory().to(self.device, non_blocking=True)
        t = t.permute(0, 3, 1, 2)
        x = self.lib.normalize(t)
        return x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)

    # ----- geometry per scene ---------------------------------------------------------------------
    def factor(self, p: Pass, gsd: float | None) -> float:
        """Resize factor source -> model pixels for pass `p` on a scene of ground sample distance `gsd`."""
        f = p.width / self.tile_size * self.scale_factor
        if self.match_gsd and gsd:
            meta = getattr(self.models[p.model], "meta", None) or {}
            ref = meta.get("gsd") or meta.get("train_gsd") or meta.get("ref_scale")  # m/px the model learned at
            if ref:
                f *= gsd / float(ref)
        return f

    def _sizes(self, p: Pass, gsd, eh: int, ew: int) -> tuple[int, int, int, int]:
        f = self.factor(p, gsd)
        mh, ph = model_size(eh, f)
        mw, pw = model_size(ew, f)
        return mh, mw, ph, pw

    # ----- reading (background thread) ------------------------------------------------------------
    def _prepare(self, src, row_index, row, col, eh, ew, sizes) -> _Item | None:
        rgb, valid = src.read(row, col, eh, ew)
        if not valid.any():
            return None
        inputs = {}
        for key in set(sizes):
            mh, mw, ph, pw = key
            img = rgb
            if ph > eh or pw > ew:
                img = _reflect_pad(rgb, ph - eh, pw - ew)
            if (mh, mw) != img.shape[:2]:
                shrink = mh < img.shape[0] or mw < img.shape[1]
                img = cv2.resize(img, (mw, mh), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
            inputs[key] = img
        return _Item(row_index, row, col, valid, inputs)

    def _items(self, src, rows, cols, eh, ew, sizes) -> Iterator[_Item | None]:
        """Windows in row-major order, read and resized ahead of the model by `num_workers` threads.

        Each thread reads through its own dataset handle (rasterio handles are not thread-safe); at
        most a few batches are in flight, so read-ahead memory is bounded.
        """
        jobs = iter([(k, r, c) for k, r in enumerate(rows) for c in cols])
        if self.num_workers == 0:
            for k, r, c in jobs:
                yield self._prepare(src, k, r, c, eh, ew, sizes)
            return
        local = threading.local()
        handles = []
        lock = threading.Lock()

        def prepare(job):
            s = getattr(local, "src", None)
            if s is None:
                with lock:
                    s = local.src = src if not handles else src.reopen()
                    handles.append(s)
            return self._prepare(s, *job, eh, ew, sizes)

        depth = max(2, 2 * self.batch_size)
        pool = ThreadPoolExecutor(self.num_workers, thread_name_prefix="read")
        futures = deque(pool.submit(prepare, job) for job in itertools.islice(jobs, depth))
        try:
            while futures:
                item = futures.popleft().result()
                job = next(jobs, None)
                if job is not None:
                    futures.append(pool.submit(prepare, job))
                yield item
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            for h in handles:
                if h is not src:
                    h.close()

    # ----- prediction -----------------------------------------------------------------------------
    def _predict_items(self, items: list[_Item], sizes: list, eh: int, ew: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Average probability [k, eh, ew] over passes and TTA, and classification probability [k]."""
        total = torch.zeros((len(items), eh, ew), device=self.device)
        cls_total = torch.zeros(len(items), device=self.device)
        n_cls = 0
        for p, key in zip(self.passes, sizes):
            _, _, ph, pw = key
            x = self._to_device(np.stack([it.inputs[key] for it in items]))
            groups: dict[tuple, list[str]] = {}
            for name in p.tta:  # transforms giving the same shape are batched together
                groups.setdefault(tuple(tta_forward(x[:1], name).shape), []).append(name)
            for names in groups.values():
                xt = torch.cat([tta_forward(x, n) for n in names])
                nchw = self.is_onnx[p.model] or not self.channels_last
                xt = xt.contiguous(memory_format=torch.contiguous_format if nchw else torch.channels_last)
                prob, cls = self._forward(self.models[p.model], xt)
                for i, n in enumerate(names):
                    part = tta_inverse(prob[i * len(items):(i + 1) * len(items)], n)
                    up = F.interpolate(part[:, None], size=(ph, pw), mode="bilinear", align_corners=False)
                    total += up[:, 0, :eh, :ew]
                    c = cls[i * len(items):(i + 1) * len(items)]
                    if not torch.isnan(c).any():
                        cls_total += c
                        n_cls += 1
        n = sum(len(p.tta) for p in self.passes)
        cls_mean = cls_total / n_cls if n_cls else torch.full((len(items),), float("nan"), device=self.device)
        return total / n, cls_mean

    def predict(self, src) -> Iterator[Strip]:
        """Yield the scene's probability in finished bands of rows, top to bottom, covering every row.

        Memory: one accumulator of (window height x scene width) floats plus a batch of windows.
        """
        H, W = src.height, src.width
        eh, ew = min(self.tile_size, H), min(self.tile_size, W)
        rows = window_offsets(H, eh, self.overlap)
        cols = window_offsets(W, ew, self.overlap)
        sizes = [self._sizes(p, src.gsd, eh, ew) for p in self.passes]
        wr = torch.from_numpy(blend_weights_1d(eh, self.blend_floor)).to(self.device)
        wc = torch.from_numpy(blend_weights_1d(ew, self.blend_floor)).to(self.device)
        w2d = wr[:, None] * wc[None, :]
        sum_r = torch.from_numpy(weight_sums(H, eh, rows, self.blend_floor)).to(self.device)
        sum_c = torch.from_numpy(weight_sums(W, ew, cols, self.blend_floor)).to(self.device)
        acc = torch.zeros((eh, W), device=self.device)
        valid_acc = np.zeros((eh, W), dtype=bool)
        self.stats = SceneStats(accumulator_shape=tuple(acc.shape), passes=[
            {"model": p.model, "width": p.width, "tta": list(p.tta), "model_size": list(s[:2]),
             "factor": round(self.factor(p, src.gsd), 6)} for p, s in zip(self.passes, sizes)])
        per_step = max(1, self.batch_size // max(len(p.tta) for p in self.passes))  # windows per model call
        bar = _progress(len(rows) * len(cols), self.progress, "tiles")
        top = rows[0]
        current = 0
        pending: list[_Item] = []

        def flush(batch: list[_Item]):
            if not batch:
                return
            prob, cls = self._predict_items(batch, sizes, eh, ew)
            for it, pr in zip(batch, prob):
                r0 = it.row - top
                acc[r0:r0 + eh, it.col:it.col + ew] += pr * w2d
                valid_acc[r0:r0 + eh, it.col:it.col + ew] |= it.valid
            if not torch.isnan(cls).all():  # one device sync per batch
                c = float(torch.nan_to_num(cls, nan=0.0).max())
                self.stats.cls_prob = c if math.isnan(self.stats.cls_prob) else max(c, self.stats.cls_prob)
            self.stats.windows += len(batch)
            bar.update(len(batch))

        def finish_row(k: int) -> Iterator[Strip]:
            """Hand out the rows no later window touches, in column blocks, then shift the accumulator."""
            nonlocal top
            end = rows[k + 1] if k + 1 < len(rows) else H
            n = end - top
            for c0 in range(0, W, self.out_cols):
                c1 = min(W, c0 + self.out_cols)
                valid = valid_acc[:n, c0:c1].copy()
                prob = acc[:n, c0:c1] / (sum_r[top:end, None] * sum_c[None, c0:c1])
                prob.masked_fill_(~torch.from_numpy(valid).to(self.device), 0.0)
                if valid.any():
                    self.stats.max_prob = max(self.stats.max_prob, float(prob.max()))
                yield Strip(top, prob, valid, c0)
            # shift up by the finished rows in place, in non-overlapping steps (no second accumulator)
            for r in range(0, eh - n, n):
                m = min(n, eh - n - r)
                acc[r:r + m] = acc[r + n:r + n + m]
            acc[eh - n:] = 0
            valid_acc[: eh - n] = valid_acc[n:]
            valid_acc[eh - n:] = False
            top = end

        try:
            for item in self._items(src, rows, cols, eh, ew, sizes):
                k = item.row_index if item is not None else None
                if item is None:
                    self.stats.skipped += 1
                    bar.update(1)
                    continue
                while current < k:  # rows before this window's row are complete
                    flush(pending)
                    pending = []
                    yield from finish_row(current)
                    current += 1
                pending.append(item)
                if len(pending) >= per_step:
                    flush(pending)
                    pending = []
            flush(pending)
            while current < len(rows):
                yield from finish_row(current)
                current += 1
        finally:
            bar.close()

    def predict_array(self, rgb: np.ndarray, valid: np.ndarray | None = None, gsd: float | None = None) -> np.ndarray:
        """Probability [H, W] float32 of an in-memory RGB uint8 image (same path as whole scenes)."""
        src = ArraySource(rgb, valid, gsd)
        out = np.zeros((src.height, src.width), np.float32)
        for s in self.predict(src):
            h, w = s.prob.shape
            out[s.row_off:s.row_off + h, s.col_off:s.col_off + w] = s.prob.cpu().numpy()
        return out


def _reflect_pad(img: np.ndarray, dh: int, dw: int) -> np.ndarray:
    mode = "reflect" if min(img.shape[:2]) > 1 else "edge"
    return np.pad(img, ((0, dh), (0, dw), (0, 0)), mode=mode)


def _progress(total: int, enabled: bool, unit: str):
    return progress_bar(total=total, disable=not enabled, unit=unit, leave=False, dynamic_ncols=True)


def quantize(prob: torch.Tensor, valid: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Probability (0..1, any device) -> (uint8 0-255 map, bool mask at `threshold`), computed on the device.

    Nodata pixels are never building, whatever the threshold.
    """
    prob_u8 = (prob.clamp(0, 1) * 255.0).round().to(torch.uint8)
    mask = (prob >= threshold) & torch.from_numpy(np.ascontiguousarray(valid)).to(prob.device)
    return prob_u8.cpu().numpy(), mask.cpu().numpy()


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------

ARCH_OVERRIDES = ("model_name", "use_mish", "use_context_block", "use_attention")


def file_sha256(path: str | os.PathLike) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(functools.partial(f.read, 1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_models(paths: Sequence[str | os.PathLike], **overrides) -> list[torch.nn.Module]:
    """Load checkpoints (`model.load_model`) or exported files (`export.load_any`: .onnx, TorchScript).

    Only non-None architecture overrides are passed. A checkpoint whose weights do not fit the
    architecture becomes a one-line UserError.
    """
    import export  # imported here: export.py builds on this module

    loader = export.load_any
    kwargs = {k: v for k, v in overrides.items() if v is not None}
    models = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: checkpoint not found; pass model=<path to .pth>")
        try:
            models.append(loader(path, **kwargs))
        except UserError:
            raise
        except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as err:
            first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
            hint = ", ".join(f"{k}=" for k in ARCH_OVERRIDES)
            raise UserError(f"{path}: checkpoint does not match the model ({first}); check {hint}") from None
    return models


BACKENDS = ("torch", "onnxruntime")
ONNX_TRACE_SIZE = 256  # side used to trace the ONNX graph (its axes stay dynamic)


def onnx_cache_dir() -> Path:
    """Where `backend=onnxruntime` keeps exported checkpoints ($BUILDINGS_CACHE or ~/.cache/buildings)."""
    root = os.environ.get("BUILDINGS_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return Path(root) / ("onnx" if os.environ.get("BUILDINGS_CACHE") else "buildings/onnx")


def onnxruntime_models(models: Sequence[torch.nn.Module], paths: Sequence[str | os.PathLike],
                       cache_dir: str | os.PathLike | None = None) -> list[torch.nn.Module]:
    """The same models run by ONNX Runtime (about 2x faster than eager PyTorch on CPUs without AMX).

    Each checkpoint is exported once with export.py's graph and no TTA (the engine batches TTA itself),
    checked against eager PyTorch (max |diff| <= export.CHECK_TOLERANCE on a batch of another size), and
    cached under `cache_dir` by the sha256 of its file and configuration. Exported files pass through.
    """
    import hashlib
    import json

    import export
    import model as model_lib

    cache = Path(cache_dir) if cache_dir else onnx_cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
        probe = cache / f".probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError:  # read-only home (CI, containers): export into a private temporary folder instead
        import tempfile

        cache = Path(tempfile.mkdtemp(prefix="buildings-onnx-"))
    out = []
    for net, path in zip(models, paths):
        if isinstance(net, export.ExportedModel):
            out.append(net)
            continue
        key = hashlib.sha256((file_sha256(path) + json.dumps(getattr(net, "config", {}), sort_keys=True)
                              + torch.__version__).encode()).hexdigest()[:24]
        target = cache / f"{Path(path).stem}-{key}.onnx"
        if not target.is_file():
            ensemble = export.EnsembleTTA([net], ["none"])
            example = model_lib.normalize(torch.full((1, ensemble.in_channels, ONNX_TRACE_SIZE, ONNX_TRACE_SIZE), 128,
                                                     dtype=torch.uint8))
            data = export.onnx_bytes(ensemble, example)
            check_x = export.check_batch(ensemble, ONNX_TRACE_SIZE)
            with torch.no_grad():
                reference = ensemble(check_x)
            import onnxruntime as ort

            session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
            got = session.run(list(export.OUTPUT_NAMES), {export.INPUT_NAME: check_x.numpy()})
            diff = max(float((torch.as_tensor(g) - r).abs().max()) for g, r in zip(got, reference))
            if diff > export.CHECK_TOLERANCE:
                raise UserError(f"{path}: the ONNX graph differs from PyTorch by {diff:.1e}; use backend=torch")
            meta = export.export_metadata(ensemble, [Path(path)], ONNX_TRACE_SIZE, "onnx", export.MIN_OPSET)
            meta["check"] = {"input_shape": list(check_x.shape), "max_abs_diff": diff}
            with atomic_path(target) as tmp:
                tmp.write_bytes(export.with_onnx_metadata(data, meta))
                make_readable(tmp)
        out.append(export.load_exported(target))
    return out


# --------------------------------------------------------------------------------------------------
# Writing: probability + mask GeoTIFFs by Window, atomically, and footprints
# --------------------------------------------------------------------------------------------------

def raster_profile(src_ds, georeferenced: bool | None = None) -> dict:
    """uint8 single-band profile aligned with the source; plain (non-georeferenced) images stay plain."""
    profile = geo_io.output_profile(src_ds)
    if georeferenced is None:
        georeferenced = src_ds.crs is not None
    if not georeferenced:
        profile.pop("crs", None)
        profile.pop("transform", None)
    return profile


def is_georeferenced(ds) -> bool:
    return ds.crs is not None and not ds.transform.is_identity


class SceneWriter:
    """Write one scene's probability and mask rasters strip by strip, then footprints; commit atomically.

    Files are written to temporary names beside their targets and renamed only by `commit()`, so an
    interrupted run never leaves a file that a resumed run would take as finished.
    """

    def __init__(self, prob_path, mask_path, profile: dict, tags: dict | None = None, *, cog: bool = True,
                 polygonizer=None):
        self.targets = [Path(prob_path), Path(mask_path)]
        self.profile = dict(profile)
        self.georef = "crs" in profile and profile.get("crs") is not None
        self.cog = cog and self.georef
        self.tags = {k: str(v) for k, v in (tags or {}).items()}
        self.polygonizer = polygonizer
        self._stack = contextlib.ExitStack()
        self._tmps = [self._stack.enter_context(atomic_path(t)) for t in self.targets]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            self._dsts = [rasterio.open(t, "w", **self.profile) for t in self._tmps]
        self.pixels_written = 0

    def write(self, row_off: int, prob_u8: np.ndarray, mask: np.ndarray, col_off: int = 0) -> None:
        h, w = prob_u8.shape
        window = Window(col_off, row_off, w, h)
        self._dsts[0].write(prob_u8, 1, window=window)
        self._dsts[1].write(mask.astype(np.uint8) * np.uint8(255), 1, window=window)
        if self.polygonizer is not None:
            self.polygonizer.add(row_off, mask, prob_u8, col_off)
        self.pixels_written += h * w

    def commit(self) -> None:
        """Finish files (tags, COG layout) and rename them over their targets."""
        try:
            total = self.profile["height"] * self.profile["width"]
            if self.pixels_written != total:
                raise RuntimeError(f"wrote {self.pixels_written} of {total} pixels")
            for i, dst in enumerate(self._dsts):
                dst.update_tags(**self.tags)
                if i == 0:
                    dst.set_band_description(1, "building probability (0-255)")
                else:
                    dst.set_band_description(1, "building mask (0/255)")
                dst.close()
            if self.cog:
                for tmp, resampling in zip(self._tmps, ("average", "nearest")):
                    _to_cog(tmp, resampling)
            self._stack.close()  # renames the temporary files over the targets
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        for dst in self._dsts:
            if not dst.closed:
                dst.close()
        self._stack.__exit__(RuntimeError, RuntimeError("aborted"), None)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        return False


def _to_cog(path: Path, resampling: str) -> None:
    """Rewrite a strip-written GeoTIFF as a Cloud-Optimized GeoTIFF (streamed by GDAL, same values)."""
    from rasterio.shutil import copy as rio_copy

    tmp = path.with_name(path.name + ".cog.tif")
    try:
        rio_copy(path, tmp, driver="COG", compress="DEFLATE", overview_resampling=resampling, blocksize=512)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def gdal_env(cache_mb: int = 32):
    """GDAL settings for streaming: a bounded block cache so memory does not follow the scene size.

    32 MB holds the source blocks of one 1024-row band of an 8192-px-wide RGBA scene, enough for
    neighbouring windows to share reads; GDAL's default (5 % of RAM) would fill with whole scenes.
    """
    return rasterio.Env(GDAL_CACHEMAX=cache_mb, GDAL_TIFF_INTERNAL_MASK=True)


def copy_file(src: Path, dst: Path) -> None:
    """Copy atomically (used for negative mining and soft-label images)."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
        make_readable(tmp)


def make_readable(path: str | os.PathLike) -> None:
    """Give a file written through a private temporary file the usual permissions (0666 & ~umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)

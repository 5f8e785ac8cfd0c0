"""The one tiled inference engine: tiling, padding, resizing, TTA, ensembles, blending of named maps.

Every script that turns imagery into maps goes through `Engine` (inference, validation, export checks),
so tiling rules live in one place. The engine is task-neutral: a decoder (default: the segmentation
task's, lib.segmentation) turns each model output into named per-pixel maps and per-window scores, and
finished blocks of every map are handed to a sink (the segmentation task's is
lib.raster_outputs.SceneWriter) or yielded by `predict`.

How a scene is predicted:
- The scene is covered by windows of `tile_size` source pixels (the whole side when the scene is
  smaller) with `overlap`; the last window of a row/column is aligned to the scene edge, so reads never
  leave the image and nothing is stretched.
- Each window is resized by `width / tile_size * scale_factor`, times source GSD / model GSD with
  `match_gsd` when both are known (`model_gsd`: the GSD the model saw in training), to a model size
  that is a multiple of 32. When the scaled size is not a multiple of 32 the window is reflect-padded
  at its bottom/right just enough to keep the scale exact, and the padding is cropped off again.
- Every (model, width, TTA) combination is predicted in batches; the decoded maps are un-transformed
  exactly, upsampled bilinearly to the window, and averaged.
- Overlapping windows are blended with a separable Hann weight (with a floor so scene borders keep a
  weight) and normalised by the accumulated weight, so a constant model gives a seamless constant map.
- The scene is swept in rows of windows, each row left to right, and blended by lib.windows.BlendSweep
  in column blocks (OUT_COLS) one window tall: a block is handed out as soon as the last window of
  the row touching it is predicted, and only its overlap with the next row is carried (kept on the
  device when small, else in a temporary file). Memory is bounded by the tile size, batch and block
  width, not by the scene's width or height. Windows that are entirely nodata are skipped;
  nodata/alpha pixels are always 0.
- `predict(src, rows=(r0, r1))` produces output rows [r0, r1) only, computing exactly the windows
  that touch them: equal, bit for bit, to the same rows of a whole-scene run. `band_rows` cuts a
  scene into such bands with balanced window counts (for sharing one scene among processes).
- Precision: `fp32`, `bf16`/`fp16` (autocast), or `auto`: on CUDA bf16 (fp16 where bf16 is missing),
  on CPUs with AMX/AVX512-BF16 bf16, elsewhere fp32 (emulated bf16 ran ~8x slower than fp32 on an
  AVX2 CPU); the reduced precision is kept only if the decoder's agreement with fp32 (for
  segmentation: the same mask) is >= 99.5 % on the first batch. Exported graphs (ONNX Runtime,
  TorchScript) always run as exported, in fp32: autocast cannot reach inside them, and
  `precision_used` says so.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from lib import model_contract
from lib.cli import progress_bar
from lib.devices import cpu_has_native_bf16
from lib.errors import UserError
from lib.image_sources import ArraySource
from lib.segmentation import SegmentationDecoder
from lib.tta import parse_tta, tta_forward, tta_inverse, tta_inverse_vectors
from lib.windows import BLEND_FLOOR, CARRY_RAM_BYTES, OUT_COLS, BlendSweep, balanced_bands, model_size

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPE_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
WRITE_AHEAD = 1  # blocks handed to the sink and not yet written, besides the one being computed
AGREEMENT_MIN = 0.995  # reduced precision must reproduce fp32 (decoder.agreement) on this share


@dataclass(frozen=True)
class Pass:
    """One model at one width with its TTA transforms; all passes of a run are averaged."""

    model: int
    width: int
    tta: tuple[str, ...]


@dataclass
class Block:
    """A finished block of rows x columns: every named map (float on the engine device, 0 on nodata), validity."""

    row_off: int
    maps: dict[str, torch.Tensor]
    valid: np.ndarray
    col_off: int = 0


@dataclass
class SceneStats:
    """Per-scene figures for negative mining and reports."""

    windows: int = 0
    skipped: int = 0
    scores: dict[str, float] = field(default_factory=dict)  # per score: max over windows (NaN: model has none)
    map_max: dict[str, float] = field(default_factory=dict)  # per map: max over valid pixels
    accumulator_shape: tuple[int, int] = (0, 0)  # rows x columns of each map's accumulator (at its largest)
    accumulator_bytes: int = 0  # the blend buffers' peak bytes in memory (live blocks + carried strip if held)
    carry_on_disk: bool = False  # the carried overlap strip went to a temporary file (wide scenes)
    passes: list = field(default_factory=list)


@dataclass
class _Item:
    row_index: int
    col_index: int
    valid: np.ndarray
    inputs: dict


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
            passes.append(Pass(m, model_contract.check_input_multiple("width", w), tuple(ts)))
    return passes


def model_gsd(meta: dict | None) -> tuple[float | None, str | None]:
    """The ground sample distance (m/px) a model saw in training, and which record it comes from.

    Checkpoints from train.py record `model_gsd` (with `model_gsd_source`: `ref_scale` when chips were
    resized to it, else `train_gsd`, the training chips' median GSD). Older ones only have `ref_scale`
    and `train_gsd`: ref_scale is what the model saw unless `train_gsd` is recorded as unknown (no chip
    had a GSD, so none was resized); `gsd` is the oldest exports' name. None: the model's GSD is unknown
    (the original pipeline's published checkpoints), so no GSD matching is possible.
    """
    meta = meta or {}
    if "model_gsd" in meta:
        value = meta["model_gsd"]
        return (float(value), meta.get("model_gsd_source") or "model_gsd") if value else (None, None)
    if meta.get("ref_scale") and not ("train_gsd" in meta and not meta["train_gsd"]):
        return float(meta["ref_scale"]), "ref_scale"
    for key in ("gsd", "train_gsd"):
        if meta.get(key):
            return float(meta[key]), key
    return None, None


def takes_arrays(model) -> bool:
    """A graph run outside PyTorch (ONNX Runtime, OpenVINO): it takes plain NCHW arrays."""
    return getattr(model, "format", "") in ("onnx", "openvino")


def is_exported(model) -> bool:
    """An exported graph (ONNX Runtime or TorchScript): run as exported, in fp32."""
    return getattr(model, "format", "") in ("onnx", "torchscript", "openvino") or bool(
        (getattr(model, "config", None) or {}).get("exported"))


class _ArrayCollector:
    """A sink that pastes every block of one map into an in-memory array."""

    def __init__(self, height: int, width: int, name: str):
        self.out = np.zeros((height, width), np.float32)
        self.name = name

    def add(self, block: Block) -> None:
        h, w = block.valid.shape
        self.out[block.row_off:block.row_off + h, block.col_off:block.col_off + w] = block.maps[self.name].cpu().numpy()


class Engine:
    """Predict named maps of whole scenes with tiles, TTA, ensembles and blending."""

    def __init__(self, models: Sequence[torch.nn.Module], *, widths: Sequence = (1024,),
                 tta: Sequence = ("none",), tile_size: int = 1024, overlap: int | None = None, batch_size: int = 8,
                 device: str | torch.device = "cpu", precision: str = "fp32", scale_factor: float = 1.0,
                 match_gsd: bool = False, num_workers: int = 1, progress: bool = False,
                 blend_floor: float = BLEND_FLOOR, channels_last: bool = True, decoder=None,
                 model_gsds: Sequence[float | None] | None = None):
        if tile_size < 32:
            raise UserError(f"tile_size={tile_size}: must be at least 32 source pixels")
        overlap = tile_size // 4 if overlap is None else overlap
        if not 0 <= overlap < tile_size:
            raise UserError(f"overlap={overlap}: must be >= 0 and smaller than tile_size={tile_size}")
        if precision not in PRECISIONS:
            raise UserError(f"precision={precision}: choose one of {', '.join(PRECISIONS)}")
        if scale_factor <= 0:
            raise UserError(f"scale_factor={scale_factor}: must be positive")
        self.decoder = decoder if decoder is not None else SegmentationDecoder()
        # displacement maps (dy, dx) a decoder names in `vectors`: TTA must undo their signs too
        self._vector_pairs = [(self.decoder.maps.index(a), self.decoder.maps.index(b))
                              for a, b in getattr(self.decoder, "vectors", ())]
        self.device = torch.device(device)
        # channels_last: cuDNN and oneDNN run EfficientNet's depthwise convolutions much faster in NHWC
        # (measured 1.7x for b1 at 672 px on a 2-core AVX2 CPU, fp32); the outputs are unchanged.
        self.channels_last = bool(channels_last)
        self.models = [m.eval().to(self.device) for m in models]
        if self.channels_last:
            self.models = [m.to(memory_format=torch.channels_last) for m in self.models]
        # graphs run outside PyTorch (ONNX Runtime) take plain NCHW arrays
        self.is_onnx = [takes_arrays(m) for m in self.models]
        self.exported = [is_exported(m) for m in self.models]
        # the GSD each model saw in training; given by callers that swap models for exported copies
        self.model_gsds = list(model_gsds) if model_gsds is not None else [
            model_gsd(getattr(m, "meta", None))[0] for m in models]
        self.passes = build_passes(len(self.models), widths, tta)
        self.tile_size, self.overlap = int(tile_size), int(overlap)
        self.batch_size = max(1, int(batch_size))
        self.scale_factor, self.match_gsd = float(scale_factor), bool(match_gsd)
        self.num_workers = max(0, int(num_workers))  # 0: read in the calling thread
        self.progress, self.blend_floor = progress, blend_floor
        self.out_cols = max(OUT_COLS, self.tile_size)  # finished rows are handed out in blocks this wide
        self.carry_ram_bytes = CARRY_RAM_BYTES  # a larger carried overlap strip goes to a temporary file
        self.precision = precision
        self._dtype = self._initial_dtype(precision)
        self._used: set[str] = set()  # precisions the models actually ran in
        self.agreement: float | None = None  # reduced-vs-fp32 agreement measured by precision=auto
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
        if self.device.type == "cpu" and cpu_has_native_bf16():
            return torch.bfloat16
        return None

    def _resolve_auto(self, model, x) -> None:
        """Pick the reduced precision when it agrees with fp32 on >= 99.5 % of the first batch."""
        candidate = self._auto_candidate()
        self._dtype = None
        if candidate is None:  # CPU without AMX/AVX512-BF16: emulated bf16 is many times slower than fp32
            return
        ref, _ = self._run_model(model, x, None)
        low, _ = self._run_model(model, x, candidate)
        agreement = self.decoder.agreement(ref, low)
        if agreement >= AGREEMENT_MIN:
            self._dtype = candidate
        self.agreement = agreement

    @property
    def precision_name(self) -> str:
        """The precision eager PyTorch models run in (`auto` until the first batch resolves it)."""
        d = self._dtype
        return "auto" if d == "auto" else _DTYPE_NAMES[d]

    @property
    def precision_used(self) -> str:
        """The precision the models actually ran in so far (e.g. `fp32`, `bf16`, `bf16+fp32` for an
        ensemble of eager and exported models); before any batch: what they will run in."""
        if self._used:
            return "+".join(sorted(self._used))
        if all(self.exported):
            return "+".join(sorted({getattr(m, "precision", "fp32") for m in self.models}))
        return self.precision_name

    # ----- model calls ----------------------------------------------------------------------------
    def _run_model(self, model, x: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoded maps [N, maps, h, w] at the model's output stride, and scores [N, scores]."""
        with torch.inference_mode(), self._autocast(dtype):
            out = model(x)
        return self.decoder(out, x.shape[0], x.device)

    def _forward(self, model, x: torch.Tensor, exported: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        if exported:
            dtype = None  # autocast cannot reach inside an exported graph; OpenVINO's has its own precision
            self._used.add(getattr(model, "precision", "fp32"))
        else:
            if self._dtype == "auto":
                self._resolve_auto(model, x[: self.batch_size])
            dtype = self._dtype
            self._used.add(_DTYPE_NAMES[dtype])
        outs = [self._run_model(model, chunk, dtype) for chunk in x.split(self.batch_size)]
        return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])

    def _to_device(self, batch: np.ndarray, model) -> torch.Tensor:
        """[N, H, W, C] windows (uint8 RGB, or the task's floats) -> `model`'s input [N, C, H, W] on the device
        (normalised, unless the model normalises its own input: lib.model_contract.model_input)."""
        t = torch.from_numpy(batch)
        if self.device.type == "cuda":
            t = t.pin_memory().to(self.device, non_blocking=True)
        t = t.permute(0, 3, 1, 2)
        # a decoder may bring its task's input rule (SAR arrives as floats already in 0..1)
        prepare = getattr(self.decoder, "prepare_input", None)
        x = prepare(t) if prepare is not None else model_contract.model_input(model, t)
        return x.contiguous(memory_format=self._input_format(model))

    def _input_format(self, model) -> torch.memory_format:
        """channels_last for a PyTorch model run so; NCHW for a graph run outside PyTorch (it takes NCHW
        arrays), made so before TTA's flips and batching, which then copy plain rows."""
        nhwc = self.channels_last and not takes_arrays(model)
        return torch.channels_last if nhwc else torch.contiguous_format

    # ----- geometry per scene ---------------------------------------------------------------------
    def factor(self, p: Pass, gsd: float | None) -> float:
        """Resize factor source -> model pixels for pass `p` on a scene of ground sample distance `gsd`:
        width / tile_size x scale_factor, times gsd / model GSD with `match_gsd` when both are known."""
        f = p.width / self.tile_size * self.scale_factor
        ref = self.model_gsds[p.model]
        if self.match_gsd and gsd and ref:
            f *= gsd / float(ref)
        return f

    def gsd_matched(self, p: Pass, gsd: float | None) -> bool:
        return bool(self.match_gsd and gsd and self.model_gsds[p.model])

    def _sizes(self, p: Pass, gsd, eh: int, ew: int) -> tuple[int, int, int, int]:
        f = self.factor(p, gsd)
        mh, ph = model_size(eh, f)
        mw, pw = model_size(ew, f)
        return mh, mw, ph, pw

    # ----- reading (background threads) -----------------------------------------------------------
    def _prepare(self, src, k, j, row, col, eh, ew, sizes) -> tuple[int, int, _Item | None]:
        rgb, valid = src.read(row, col, eh, ew)
        if not valid.any():
            return k, j, None
        inputs = {}
        for key in set(sizes):
            mh, mw, ph, pw = key
            img = rgb
            if ph > eh or pw > ew:
                img = reflect_pad(rgb, ph - eh, pw - ew)
            if (mh, mw) != img.shape[:2]:
                shrink = mh < img.shape[0] or mw < img.shape[1]
                img = cv2.resize(img, (mw, mh), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
            inputs[key] = img
        return k, j, _Item(k, j, valid, inputs)

    def read_ahead(self, src) -> tuple:
        """The scene's first window, read and resized now -- e.g. in a worker thread while the model runs
        on the previous scene, so the model does not wait for it; `predict(src, first=...)` starts with
        it. Only for whole-scene runs (a band of rows starts elsewhere)."""
        eh, ew = min(self.tile_size, src.height), min(self.tile_size, src.width)
        sizes = [self._sizes(p, src.gsd, eh, ew) for p in self.passes]
        job = (0, 0, 0, 0)
        return (src, job, eh, ew, tuple(sizes)), self._prepare(src, *job, eh, ew, sizes)

    def _items(self, src, sweep: BlendSweep, eh, ew, sizes, first=None) -> Iterator[tuple[int, int, _Item | None]]:
        """(row index, column index, window or None when all nodata) of the sweep's window rows in
        row-major order, read and resized ahead of the model by `num_workers` threads.

        Each thread reads through its own source handle (rasterio handles are not thread-safe); at
        most a few batches are in flight, so read-ahead memory is bounded.
        """
        jobs = ((k, j, sweep.row_offsets[k], c) for k in sweep.rows for j, c in enumerate(sweep.col_offsets))
        ready = []  # read_ahead's window, when it is this sweep's first one
        if first is not None:
            (source, job, *geometry), item = first
            head = next(jobs, None)
            if source is src and head == job and geometry == [eh, ew, tuple(sizes)]:
                ready.append(item)
            elif head is not None:
                jobs = itertools.chain([head], jobs)
        if self.num_workers == 0:
            yield from ready
            for job in jobs:
                yield self._prepare(src, *job, eh, ew, sizes)
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
            yield from ready  # while the threads read the next windows
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
        """Maps [k, maps, eh, ew] averaged over passes and TTA, and scores [k, scores] (NaN where none)."""
        k = len(items)
        total = None  # the first pass's maps, then the sum of all: [k, maps, eh, ew]
        score_total = torch.zeros((k, len(self.decoder.scores)), device=self.device)
        n_scores = torch.zeros(len(self.decoder.scores), device=self.device)
        for p, key in zip(self.passes, sizes):
            _, _, ph, pw = key
            x = self._to_device(np.stack([it.inputs[key] for it in items]), self.models[p.model])
            groups: dict[tuple, list[str]] = {}
            shape_only = torch.empty((1, *x.shape[1:]), device="meta")  # flipped without a byte copied
            for name in p.tta:  # transforms giving the same shape are batched together
                groups.setdefault(tuple(tta_forward(shape_only, name).shape), []).append(name)
            # the pass's TTA maps are summed at the model's resolution and upsampled once: bilinear
            # interpolation is linear, so this equals upsampling each, at a fifth of the cost for 5-way TTA
            summed: dict[tuple, torch.Tensor] = {}
            for names in groups.values():
                xt = torch.cat([tta_forward(x, n) for n in names]).contiguous(
                    memory_format=self._input_format(self.models[p.model]))
                maps, scores = self._forward(self.models[p.model], xt, self.exported[p.model])
                for i, n in enumerate(names):
                    part = tta_inverse(maps[i * k:(i + 1) * k], n)
                    part = tta_inverse_vectors(part, n, self._vector_pairs)
                    shape = tuple(part.shape)
                    summed[shape] = part.to(torch.float32, copy=True) if shape not in summed else summed[shape].add_(part)
                    s = scores[i * k:(i + 1) * k]
                    known = ~torch.isnan(s).any(0)  # a model without a score's head does not dilute it
                    score_total[:, known] += s[:, known]
                    n_scores += known
            for part in summed.values():
                up = F.interpolate(part, size=(ph, pw), mode="bilinear", align_corners=False)[:, :, :eh, :ew]
                total = up if total is None else total.add_(up)
        n = sum(len(p.tta) for p in self.passes)
        mean_scores = torch.where(n_scores > 0, score_total / n_scores.clamp(min=1), float("nan"))
        return total / n, mean_scores

    def predict(self, src, rows: tuple[int, int] | None = None, first=None) -> Iterator[Block]:
        """Yield the scene's maps in finished blocks, top to bottom, covering every row (or `rows`).
        `first`: the scene's first window from `read_ahead(src)`, if read already.

        `rows=(r0, r1)`: only output rows [r0, r1) are produced, by every window that touches them
        (and no other), so they equal the same rows of a whole-scene run. Memory: a few column blocks
        one window tall per map (lib.windows.BlendSweep) plus a batch of windows.
        """
        H, W = src.height, src.width
        band = self._check_rows(rows, H)
        eh, ew = min(self.tile_size, H), min(self.tile_size, W)
        sizes = [self._sizes(p, src.gsd, eh, ew) for p in self.passes]
        names = self.decoder.maps
        sweep = BlendSweep(len(names), H, W, eh, ew, overlap=self.overlap, band=band, out_cols=self.out_cols,
                           floor=self.blend_floor, device=self.device, carry_ram_bytes=self.carry_ram_bytes)
        self.stats = SceneStats(
            scores={s: float("nan") for s in self.decoder.scores}, map_max={m: 0.0 for m in names},
            carry_on_disk=sweep.carry.file is not None, passes=[
                {"model": p.model, "width": p.width, "tta": list(p.tta), "model_size": list(s[:2]),
                 "factor": round(self.factor(p, src.gsd), 6), "gsd_matched": self.gsd_matched(p, src.gsd)}
                for p, s in zip(self.passes, sizes)])
        self._used = set()  # precision_used is per scene
        per_step = max(1, self.batch_size // max(len(p.tta) for p in self.passes))  # windows per model call
        bar = progress_bar(total=len(sweep.rows) * len(sweep.col_offsets), disable=not self.progress,
                           unit="tiles", leave=False, dynamic_ncols=True)
        current = sweep.rows.start
        pending: list[_Item] = []

        def flush():
            if pending:
                maps, scores = self._predict_items(pending, sizes, eh, ew)
                for it, pr in zip(pending, maps):
                    sweep.add(it.col_index, pr, it.valid)
                self._note_scores(scores)
                self.stats.windows += len(pending)
                bar.update(len(pending))
                pending.clear()

        try:
            for k, j, item in self._items(src, sweep, eh, ew, sizes, first):
                if k > current:  # a model call never mixes rows of windows: the rows above are complete
                    flush()
                    for row in range(current, k):
                        yield from self._blocks(sweep.finish_row(row), sweep)
                    current = k
                if item is None:
                    self.stats.skipped += 1
                    bar.update(1)
                else:
                    pending.append(item)
                    if len(pending) >= per_step:
                        flush()
                if not pending:  # windows 0..j of this row are in: hand out the blocks they finish
                    yield from self._blocks(sweep.advance(k, j), sweep)
            flush()
            for row in range(current, sweep.rows.stop):
                yield from self._blocks(sweep.finish_row(row), sweep)
        finally:
            bar.close()
            sweep.close()

    def _blocks(self, parts, sweep: BlendSweep) -> Iterator[Block]:
        """The sweep's finished parts as Blocks; keeps each map's maximum and the accumulator's peak size."""
        for row_off, col_off, maps, valid in parts:
            named = dict(zip(self.decoder.maps, maps))
            if valid.any():
                for name, m in named.items():
                    self.stats.map_max[name] = max(self.stats.map_max[name], float(m.max()))
            self.stats.accumulator_shape = (sweep.eh, sweep.peak_cols)
            self.stats.accumulator_bytes = sweep.peak_bytes
            yield Block(row_off, named, valid, col_off)
            del named, maps, valid  # not held while the sweep goes on

    @staticmethod
    def _check_rows(rows, height: int) -> tuple[int, int]:
        if rows is None:
            return 0, height
        r0, r1 = (int(r) for r in rows)
        if not 0 <= r0 <= r1 <= height:
            raise UserError(f"rows={tuple(rows)}: need 0 <= first <= end <= the scene's {height} rows")
        return r0, r1

    def band_rows(self, height: int, n: int) -> list[tuple[int, int]]:
        """At most `n` bands (r0, r1) of a scene `height` rows tall, covering every row once, cut where
        a row of windows starts, balanced by the number of windows each band computes (its window rows
        and the ones reaching into it from above); fewer only when the scene has fewer window rows.
        `predict(src, rows=band)` of every band together equal one whole-scene run."""
        return balanced_bands(height, min(self.tile_size, height), self.overlap, n)

    def _note_scores(self, scores: torch.Tensor) -> None:
        """Keep each score's maximum over the scene's windows (one device sync per score and batch)."""
        for j, name in enumerate(self.decoder.scores):
            col = scores[:, j]
            if not torch.isnan(col).all():
                c = float(torch.nan_to_num(col, nan=0.0).max())
                old = self.stats.scores[name]
                self.stats.scores[name] = c if math.isnan(old) else max(c, old)

    def predict_into(self, src, sink, rows: tuple[int, int] | None = None) -> SceneStats:
        """Hand every finished block of the scene (or of `rows`) to `sink.add(block)` (the task's writer);
        return the stats once the sink has them all."""
        stats, wait = self.start_into(src, sink, rows)
        wait()
        return stats

    def start_into(self, src, sink, rows: tuple[int, int] | None = None,
                   first=None) -> tuple[SceneStats, Callable[[], None]]:
        """predict_into in two halves: run the model over the scene and return (stats, wait), where
        `wait()` returns once the sink has written every block (and raises the sink's error, if any).

        The sink runs in one worker thread, in block order, while the model computes the next block
        (writing, polygonizing and watershed cost as much as a third of the model's time per block, and
        the runtimes release the GIL); at most WRITE_AHEAD blocks are in its hands. The last blocks are
        still being written when this returns, so the caller can start the next scene's model call and
        `wait()` elsewhere. Blocks are fresh tensors (lib.windows), so the sweep never changes one being
        written.
        """
        pool = ThreadPoolExecutor(1, thread_name_prefix="sink")
        waiting: deque = deque()

        def wait() -> None:
            try:
                while waiting:
                    waiting.popleft().result()
            finally:
                for f in waiting:
                    f.cancel()
                pool.shutdown(wait=True)

        try:
            for block in self.predict(src, rows, first):
                while len(waiting) >= WRITE_AHEAD:
                    waiting.popleft().result()
                waiting.append(pool.submit(sink.add, block))
                del block  # not held while the next block is computed
        except BaseException:
            wait_quietly(wait)
            raise
        return self.stats, wait

    def predict_array(self, rgb: np.ndarray, valid: np.ndarray | None = None, gsd: float | None = None,
                      name: str | None = None) -> np.ndarray:
        """Map `name` (default: the decoder's first) [H, W] float32 of an in-memory RGB uint8 image."""
        src = ArraySource(rgb, valid, gsd)
        sink = _ArrayCollector(src.height, src.width, name or self.decoder.maps[0])
        self.predict_into(src, sink)
        return sink.out


def wait_quietly(wait: Callable[[], None]) -> None:
    """Let a sink finish after the model failed: the model's error is the one to report."""
    with contextlib.suppress(Exception):  # secondary to the error being raised
        wait()


def reflect_pad(img: np.ndarray, dh: int, dw: int) -> np.ndarray:
    """An image [H, W, C] mirrored below and to the right by dh, dw pixels (a window smaller than the model's
    input, as the engine and int8 calibration fill it)."""
    mode = "reflect" if min(img.shape[:2]) > 1 else "edge"
    return np.pad(img, ((0, dh), (0, dw), (0, 0)), mode=mode)

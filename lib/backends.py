"""Which runtime runs the models of an inference run: `backend=auto|torch|onnxruntime|openvino`.

- `torch`: the models as loaded; `precision=auto` is resolved on the first batch by the engine
  (reduced precision where native and agreeing with fp32), as it always was.
- `onnxruntime` / `openvino`: the checkpoints exported once to ONNX (cached, lib.exported) and run by
  that runtime; OpenVINO also runs bf16 where the CPU has it, and int8 copies of the exports calibrated
  on the run's own images (lib.int8; timed under `auto` where the CPU has VNNI or AMX-INT8).
- `auto`: every candidate this machine allows (lib.backend_trial.candidates) is built and timed on one
  batch at the run's width, and the fastest that agrees with fp32 runs the job. The trial is cached per
  machine, packages, models and width; under torchrun rank 0 decides and the others follow.

A candidate that cannot be built under `auto` (an export that fails its check, a runtime that cannot
compile the graph) is left out with one warning; an explicit backend fails loudly instead.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lib import backend_trial
from lib.backend_trial import Candidate
from lib.errors import UserError, one_line
from lib.exported import ExportedModel, load_exported, onnx_exports
from lib.segmentation import has_instance_head

BACKENDS = ("auto", "torch", "onnxruntime", "openvino")


@dataclass
class Chosen:
    models: list
    precision: str                 # what the engine is told (torch candidates: their precision)
    trial: dict | None = None      # the timed trial (or its cached copy) under backend=auto
    notes: list[str] = field(default_factory=list)


def _is_format(models: list, fmt: str) -> bool:
    return bool(models) and all(getattr(m, "format", "") == fmt for m in models)


class _Builder:
    """Builds a candidate's models from the loaded ones, exporting to ONNX at most once."""

    def __init__(self, models: list, paths: list[str], onnx_cache, device, calibration=None):
        self.models, self.paths, self.onnx_cache, self.device = models, paths, onnx_cache, device
        self.calibration = calibration
        self._files = None
        self._built: dict[Candidate, list] = {}
        self.export_s = 0.0
        self.int8_s = 0.0  # the int8 graphs quantized (lib.int8) and compiled: one-off

    def onnx_files(self) -> list:
        if self._files is None:
            start = time.perf_counter()
            self._files = onnx_exports(self.models, self.paths, self.onnx_cache)
            self.export_s = time.perf_counter() - start
        return self._files

    def build(self, cand: Candidate) -> list:
        """The candidate's models, built once (the trial's copy is the one the run uses)."""
        if cand not in self._built:
            if cand.backend != "torch":
                self.onnx_files()  # exported first: not part of int8_s
            start = time.perf_counter()
            self._built[cand] = self._build(cand)
            if cand.precision == "int8":
                self.int8_s = time.perf_counter() - start
        return self._built[cand]

    def _build(self, cand: Candidate) -> list:
        if cand.backend == "torch":  # as the engine runs them: on the device, channels-last
            return [m.eval().to(self.device, memory_format=torch.channels_last) for m in self.models]
        if cand.backend == "onnxruntime":
            return [f if isinstance(f, ExportedModel) else load_exported(f) for f in self.onnx_files()]
        from lib.openvino_backend import compiled_cache, openvino_models

        return openvino_models(self.onnx_files(), cand.precision, compiled_cache(self.onnx_cache), self.calibration)


def _check_installed(backend: str) -> None:
    if backend in ("onnxruntime", "openvino") and not backend_trial.installed(backend):
        raise UserError(f"backend={backend} needs the optional package: pip install {backend}")


def choose_backend(cfg, models: list, paths: list[str], device, model_ids: list[str],
                   keep_heads: bool = False, d=None, calibration=None) -> Chosen:
    """The models the engine runs and the precision it is told; see the module docstring.

    `keep_heads`: the instance maps are wanted, so a candidate whose copies lack the head is dropped.
    `model_ids` (sha256 + configuration of each model) key the trial cache; `d` is torchrun's Dist.
    `calibration`: a Calibration (inputs cut from the images to predict) for the int8 candidate.
    """
    backend, precision = str(cfg.backend), str(cfg.precision)
    if backend not in BACKENDS:
        raise UserError(f"backend={backend}: choose {', '.join(BACKENDS[:-1])} or {BACKENDS[-1]}")
    _check_installed(backend)
    if precision == "int8" and (backend in ("torch", "onnxruntime") or device.type != "cpu"):
        raise UserError(f"precision=int8 runs on OpenVINO on the CPU; use backend=openvino (or auto) with device=cpu, "
                        f"not backend={backend} on {device.type}")
    if backend == "torch" or any(getattr(m, "format", "") == "torchscript" for m in models):
        return Chosen(models, precision)
    onnx_files = _is_format(models, "onnx")
    if backend == "onnxruntime":  # fp32 whatever `precision` says (autocast cannot reach it; the engine warns)
        cands = [Candidate("onnxruntime", "fp32")]
    else:
        cands = backend_trial.candidates(device, backend, precision, exported_onnx=onnx_files)
    if not cands:
        if precision == "int8":
            raise UserError("precision=int8 needs the optional packages openvino and onnxruntime: pip install openvino")
        if backend == "openvino":
            raise UserError(f"backend=openvino precision={precision}: OpenVINO runs fp32, and bf16 on CPUs with "
                            "native bf16 (AVX512-BF16/AMX), and int8")
        return Chosen(models, precision)  # e.g. fp16 on a CPU: PyTorch autocast, as asked
    cands = _calibrated(cands, calibration, explicit=precision == "int8")
    builder = _Builder(models, paths, cfg.onnx_cache, device, calibration)
    if len(cands) == 1:
        built = builder.build(cands[0])
        return Chosen(built, _engine_precision(cands[0], precision))
    width = trial_width(cfg)
    key = backend_trial.trial_key(device, model_ids, width, keep_heads, [c.name for c in cands])
    cache_file = backend_trial.default_cache_file() if cfg.trial_cache is None else Path(cfg.trial_cache)
    record = _decide(builder, cands, key, cache_file, width, models, keep_heads, backend, device, d)
    if record["choice"].endswith(" int8") and record.get("int8_digest") != calibration.digest:
        record = _recheck_int8(builder, record, calibration, width, models, keep_heads, device)
    choice = backend_trial.parse_choice(record["choice"])
    chosen = builder.build(choice)
    if choice.precision == "int8":
        record["int8_calibration"] = calibration.describe()
    print(backend_trial.describe(record), file=sys.stderr)
    return Chosen(chosen, _engine_precision(choice, precision), trial=record)


def _recheck_int8(builder: _Builder, record: dict, calibration, width: int, models: list, keep_heads: bool,
                  device) -> dict:
    """A cached trial chose int8 for inputs calibrated on other images (the trial's key leaves the
    calibration out, so a new folder costs a quantization, not a new trial). This run's int8 graph must
    agree with fp32 on the trial's input too; if it does not, the fastest other path that agreed runs."""
    from lib.segmentation import SegmentationDecoder

    names = list(record["figures"])
    ref = backend_trial.parse_choice("torch fp32" if "torch fp32" in names else
                                     next(n for n in names if n.endswith(" fp32")))
    low = backend_trial.parse_choice(record["choice"])
    decoder = SegmentationDecoder(instance=keep_heads)
    x = backend_trial.trial_input(width, _channels(models)).to(device)
    a, b = (backend_trial.decoded_maps(builder.build(c), x, c.precision, decoder, device) for c in (ref, low))
    agreement = decoder.agreement(a, b)
    record = {**record, "int8_digest": calibration.digest, "int8_recheck": round(agreement, 5)}
    if agreement >= backend_trial.AGREEMENT_MIN:
        return record
    agreeing = [(t["s_per_image"], n) for n, t in record["figures"].items()
                if n != low.name and t["timed"] and t["agreement"] >= backend_trial.AGREEMENT_MIN]
    record["choice"] = min(agreeing)[1] if agreeing else ref.name
    print(f"warning: int8 calibrated on these images agrees with fp32 on {100 * agreement:.2f} % of the trial's "
          f"mask pixels only; {record['choice']} runs instead", file=sys.stderr)
    return record


def _channels(models: list) -> int:
    return int(getattr(models[0], "in_channels", None) or (getattr(models[0], "config", None) or {}).get(
        "in_channels", 3))


def _calibrated(cands: list, calibration, explicit: bool) -> list:
    """The candidates, less the int8 one when its calibration inputs cannot be had (no images, all
    nodata): under `auto` with a warning, and as an error when int8 was asked for."""
    if not any(c.precision == "int8" for c in cands):
        return cands
    try:
        if calibration is None:
            raise UserError("precision=int8 needs calibration inputs, cut from the images to predict")
        calibration()
    except UserError as err:
        if explicit:
            raise
        print(f"warning: openvino int8 not tried ({one_line(err, 120)})", file=sys.stderr)
        return [c for c in cands if c.precision != "int8"]
    return cands


def trial_width(cfg) -> int:
    """The widest model input of the run: what the trial times and int8 is calibrated at."""
    return max(flat_widths(cfg.widths) if cfg.widths is not None else [int(cfg.width)])


def flat_widths(widths) -> list[int]:
    """Every width of `widths` (a number, a list, or a list of lists per model; Hydra's or plain)."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(widths):
        widths = OmegaConf.to_object(widths)
    if not isinstance(widths, (list, tuple)):
        return [int(widths)]
    return [w for item in widths for w in flat_widths(item)]


def _engine_precision(cand: Candidate, requested: str) -> str:
    """Torch candidates tell the engine their precision; exported graphs carry theirs (`.precision`)."""
    if cand.backend == "torch":
        return cand.precision
    return "fp32" if requested == "int8" else requested  # the engine's own precision rule knows no int8


def _decide(builder: _Builder, cands: list, key: dict, cache_file, width: int, models: list, keep_heads: bool,
            backend: str, device, d) -> dict:
    """The trial record: from the cache, from rank 0 under torchrun, or by timing the candidates now."""
    if d is not None and d.enabled:
        from lib.distributed import broadcast_object

        record = _trial_or_cached(builder, cands, key, cache_file, width, models, keep_heads, backend, device) \
            if d.main else None
        return broadcast_object(record, d)
    return _trial_or_cached(builder, cands, key, cache_file, width, models, keep_heads, backend, device)


def _trial_or_cached(builder, cands, key, cache_file, width, models, keep_heads, backend, device) -> dict:
    record = backend_trial.cached_trial(cache_file, key)
    if record is not None:
        return {**{k: v for k, v in record.items() if k != "key"}, "cached": True, "cache": str(cache_file)}
    built = {}
    for cand in cands:
        try:
            ms = builder.build(cand)
        except (RuntimeError, ValueError, OSError, UserError) as err:
            if backend != "auto":
                raise
            print(f"warning: {cand.name} unavailable for these models ({one_line(err, 120)}); not tried",
                  file=sys.stderr)
            continue
        if keep_heads and not all(has_instance_head(m) for m in ms):
            continue  # the instance maps would be lost on this path
        built[cand] = ms
    from lib.segmentation import SegmentationDecoder

    decoder = SegmentationDecoder(instance=keep_heads)
    _, record = backend_trial.run_trial(built, width, _channels(models), decoder, device)
    record["export_s"] = round(builder.export_s, 2)
    if builder.int8_s:  # the int8 graph's one-off cost, and the calibration its agreement was measured with
        record.update(int8_s=round(builder.int8_s, 2), int8_digest=builder.calibration.digest)
    stored = backend_trial.store_trial(cache_file, key, record)
    return {**record, "cached": False, "cache": str(cache_file) if stored else None}

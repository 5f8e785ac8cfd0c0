"""`precision=int8`: a checkpoint's ONNX export quantized to 8-bit integers, calibrated on the run's images.

Why: on a CPU without native bf16 the seed's FPN is bound by fp32 arithmetic (the three dilated ASPP
convolutions at stride 4 run at the cores' fp32 peak), while CPUs since Cascade Lake / Zen 4 multiply
int8 with VNNI at four times the rate. OpenVINO runs a QDQ-quantized ONNX graph on those kernels: b0 at
672 px took 0.26 s per image against 0.48 s in fp32 on a 2-core EPYC with oneDNN capped below bf16.

What is quantized: the convolutions of the decoder's ASPP block (the dilated 3x3 ones, the 1x1 branch
and the split projection, not the pooled branch's), which are about 70 % of b0's arithmetic at 672 px;
the encoder, the other decoder blocks and the heads stay fp32. Measured on a Kampala-trained b0 at
1024 px (4 calibration windows, masks compared with OpenVINO fp32 on 3 other holdout windows and the
trial's demo tile; benchmarks/bench_int8.py): quantizing every convolution is faster still but changes
a few per cent of the mask pixels, beyond backend=auto's agreement rule (lib.backend_trial); the ASPP
alone stays within it (figures in benchmarks/RESULTS.md).

How: ONNX Runtime's static post-training quantization (shipped with onnxruntime, no other dependency)
writes QuantizeLinear/DequantizeLinear pairs around those convolutions: weights per output channel
(int8, symmetric), activations per tensor (uint8) with ranges measured on calibration inputs. Those inputs are
model inputs cut from the images being predicted (`calibration_for`), so the ranges fit
the imagery at hand rather than a stand-in; the quantized file is cached by the export, the calibration
inputs' digest and the quantizer's version, and whether its masks agree with fp32 is left to
backend=auto's trial (lib.backend_trial), as for every reduced precision.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from lib.errors import UserError, one_line
from lib.exported import INPUT_NAME, META_KEY, with_onnx_metadata

QUANT_REVISION = 1  # raised when the quantization recipe below changes: cached int8 graphs are redone
QUANTIZED_BLOCK = "/decoder/aspp/"  # ONNX node names of the ASPP block's convolutions (model.py's decoder.aspp)
KEPT_FP32 = "/pool/"  # ... except its pooled branch: a 1x1 convolution of a 1x1 map, no time, all error
CALIBRATION_INPUTS = 4  # model inputs measured for the activation ranges (inference.py reads them)
CALIBRATION_SIDE = 512  # ... their central crops of at most this side: the quantizer's run costs by the pixel


def calibration_digest(batch: np.ndarray) -> str:
    """Identifies the calibration inputs (their bytes and shape), for the cache key and the provenance."""
    h = hashlib.sha256(str(batch.shape).encode())
    h.update(np.ascontiguousarray(batch, dtype=np.float32).tobytes())
    return h.hexdigest()[:16]


def _quantizer_version() -> str:
    try:
        return importlib.metadata.version("onnxruntime")
    except importlib.metadata.PackageNotFoundError:
        raise UserError("precision=int8 needs onnxruntime (its quantizer): pip install onnxruntime") from None


def quantized_path(onnx_path: Path, digest: str) -> Path:
    """Where the int8 copy of `onnx_path` calibrated on inputs of `digest` is cached: beside it, in int8/."""
    key = hashlib.sha256(f"{onnx_path.name}/{digest}/{_quantizer_version()}/q{QUANT_REVISION}"
                         .encode()).hexdigest()[:24]
    return onnx_path.parent / "int8" / f"{onnx_path.stem}-int8-{key}.onnx"


class _Inputs:
    """ONNX Runtime's CalibrationDataReader protocol over a batch, one input at a time."""

    def __init__(self, batch: np.ndarray):
        h, w = batch.shape[-2:]
        ch, cw = min(h, CALIBRATION_SIDE), min(w, CALIBRATION_SIDE)
        top, left = (h - ch) // 2, (w - cw) // 2
        crop = batch[..., top:top + ch, left:left + cw]
        self._items = [{INPUT_NAME: np.ascontiguousarray(crop[i:i + 1], dtype=np.float32)} for i in range(len(crop))]

    def get_next(self):
        return self._items.pop(0) if self._items else None

    def rewind(self):  # pragma: no cover - part of the protocol; the quantizer reads the inputs once
        pass


@contextlib.contextmanager
def _quiet():
    """The quantizer logs a warning per GroupNorm constant it leaves alone; none of them is news."""
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _with_quantization_meta(source: Path, quantized: Path, batch: np.ndarray, digest: str, nodes: list[str]) -> bytes:
    """The quantized graph with the export's provenance (lib.exported) plus how it was quantized."""
    import onnx

    props = {p.key: p.value for p in onnx.load(str(source), load_external_data=False).metadata_props}
    meta = json.loads(props.get(META_KEY, "null") or "null") or {}
    meta["quantization"] = {"precision": "int8", "tool": f"onnxruntime {_quantizer_version()} quantize_static",
                            "format": "QDQ", "nodes": nodes, "weights": "int8 per channel, symmetric",
                            "activations": "uint8 per tensor, min/max", "calibration_inputs": len(batch),
                            "calibration_crop": CALIBRATION_SIDE,
                            "calibration_digest": digest, "revision": QUANT_REVISION}
    proto = onnx.load(str(quantized))
    del proto.metadata_props[:]
    return with_onnx_metadata(proto.SerializeToString(), meta)


def quantized_nodes(onnx_path: Path) -> list[str]:
    """The names of the convolutions that become int8 (QUANTIZED_BLOCK less KEPT_FP32)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return [n.name for n in graph.node if n.op_type == "Conv" and QUANTIZED_BLOCK in n.name and KEPT_FP32 not in n.name]


def quantize(onnx_path: str | os.PathLike, batch: np.ndarray, digest: str | None = None) -> Path:
    """The int8 (QDQ) copy of an exported fp32 ONNX graph, calibrated on `batch` [N, C, H, W] (normalised
    model inputs; `digest`: its calibration_digest when known); made once and cached (quantized_path),
    written atomically."""
    onnx_path = Path(onnx_path)
    if batch.ndim != 4 or not len(batch):
        raise UserError(f"{onnx_path}: int8 calibration needs model inputs [N, C, H, W], got {batch.shape}")
    digest = digest or calibration_digest(batch)
    target = quantized_path(onnx_path, digest)
    if target.is_file():
        return target
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".int8-", dir=target.parent))
    try:
        with _quiet():
            prepared = work / "prepared.onnx"
            quant_pre_process(str(onnx_path), str(prepared), skip_symbolic_shape=True)
            nodes = quantized_nodes(prepared)
            if not nodes:
                raise UserError(f"{onnx_path}: no ASPP convolution to quantize (int8 covers the seed's FPN only)")
            quantize_static(str(prepared), str(work / "int8.onnx"), _Inputs(batch), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=["Conv"], nodes_to_quantize=nodes, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax,
                            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
        (work / "tagged.onnx").write_bytes(_with_quantization_meta(onnx_path, work / "int8.onnx", batch, digest, nodes))
        os.replace(work / "tagged.onnx", target)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - the quantizer raises whatever ONNX or its session raise
        raise UserError(f"{onnx_path}: int8 quantization failed ({one_line(err, 160)}); use precision=fp32") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


class Calibration:
    """Calibration inputs for int8 graphs, read only when one is first needed: `read()` returns the
    normalised batch [N, C, H, W] and one line per input saying where it was cut from (provenance)."""

    def __init__(self, read):
        self._read = read
        self._batch: np.ndarray | None = None
        self.sources: list[str] = []

    def __call__(self) -> np.ndarray:
        if self._batch is None:
            self._batch, self.sources = self._read()
        if not len(self._batch):
            raise UserError("precision=int8: no calibration input could be read from the images "
                            "(all windows are nodata); use precision=fp32")
        return self._batch

    @functools.cached_property
    def digest(self) -> str:
        """calibration_digest of the inputs, hashed once (the trial key, the cache path and provenance)."""
        return calibration_digest(self())

    def describe(self) -> dict:
        return {"inputs": len(self()), "digest": self.digest, "windows": list(self.sources)}


def windows_from_images(paths: list, open_image, source_side, width: int, n: int = CALIBRATION_INPUTS,
                        normalized: bool = True):
    """Up to `n` model inputs cut from the images to predict, for Calibration: windows spread along each of
    the first images' diagonal (more per image when there are fewer images), of `source_side(gsd)` source
    pixels (what the engine resizes to `width`), resized at the engine's scale and normalised as the
    engine does; a window cut smaller by a small image keeps that scale and is mirrored up to width x
    width, as the engine pads it. Windows less than half valid are passed over, and so is an image that
    cannot be read. Returns (batch [N, C, width, width] float32, one 'file: rows, cols' line per input);
    with `normalized=False` the batch is the uint8 images themselves (what lib.model_contract.model_input takes)."""
    import cv2
    import torch

    from lib.model_contract import normalize
    from lib.tiling import reflect_pad

    inputs, sources = [], []
    per_image = max(1, math.ceil(n / max(1, len(paths))))
    for path in paths[:n]:
        try:
            with open_image(path) as src:
                full = source_side(src.gsd)
                side = max(1, min(int(full), src.height, src.width))
                size = min(width, max(1, round(side * width / full)))  # the engine's scale
                for i in range(per_image):
                    t = (i + 0.5) / per_image
                    row, col = round(t * (src.height - side)), round(t * (src.width - side))
                    rgb, valid = src.read(row, col, side, side)
                    if len(inputs) < n and valid.mean() >= 0.5:
                        img = rgb if size == side else cv2.resize(
                            rgb, (size, size), interpolation=cv2.INTER_AREA if side > size else cv2.INTER_LINEAR)
                        img = img[..., None] if img.ndim == 2 else img
                        inputs.append(reflect_pad(img, width - size, width - size))
                        sources.append(f"{Path(path).name}: rows {row}-{row + side}, cols {col}-{col + side}")
        except (OSError, ValueError, UserError) as err:  # unreadable here: the run itself reports it
            print(f"warning: {path}: not used for int8 calibration ({one_line(err, 100)})", file=sys.stderr)
    if not inputs:
        return np.zeros((0, 3, width, width), np.float32 if normalized else np.uint8), []
    batch = torch.from_numpy(np.stack(inputs)).permute(0, 3, 1, 2)
    return (normalize(batch).numpy() if normalized else np.ascontiguousarray(batch.numpy())), sources


def calibration_for(paths: list, open_image, cfg, width: int, model_gsd: float | None) -> Calibration:
    """The calibration of an inference run: windows of the images to predict (`open_image(path)` reads one
    as the run does), as many source pixels as the engine resizes to `width` -- width / tile_size x
    scale_factor, times image GSD / `model_gsd` with match_gsd -- read when an int8 graph is first built."""

    def source_side(gsd) -> float:
        matched = gsd / model_gsd if cfg.match_gsd and gsd and model_gsd else 1.0
        return cfg.tile_size / (cfg.scale_factor * matched)

    return Calibration(lambda: windows_from_images(list(paths), open_image, source_side, width))


def provenance(model, calibration: Calibration | None) -> dict:
    """{"quantization": how an int8 graph was quantized and on which windows of which images}, or {}."""
    quantization = (getattr(model, "meta", None) or {}).get("quantization")
    if not quantization:
        return {}
    return {"quantization": {**quantization, "windows": calibration.sources if calibration else []}}

"""`backend=openvino`: the cached ONNX exports run by OpenVINO on the CPU (optional dependency).

OpenVINO compiles the same ONNX file that ONNX Runtime runs (lib.exported caches one per checkpoint)
and, on CPUs with native bf16 (AVX512-BF16, AMX), can run it in bf16: on a 2-core EPYC with
avx512_bf16, b0 at 672 px took 0.22 s per image in OpenVINO bf16 against 0.46 s in PyTorch bf16 and
0.52 s in ONNX Runtime fp32. Whether it wins on a given machine is what `backend=auto` measures
(lib.backend_trial); `precision` here is OpenVINO's inference precision hint, so the reduced precision
is a property of the compiled graph and is recorded as such (`.precision`).

A segmentation graph is compiled to take the uint8 images and normalise them itself (OpenVINO's
preprocessing, with `model_contract.normalization`'s mean and standard deviation): the engine then flips
and batches the TTA inputs in uint8, a quarter of the bytes, and the model's speed is the same within
noise (b0 bf16 at 672 px, batch 5, alternated 12 times on a 2-core EPYC: medians 4.26 inputs/s fed uint8
and 4.30 fed normalised floats; benchmarks/RESULTS.md). Loading a cached graph costs about 0.08 s more,
as OpenVINO hashes the in-memory graph.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from lib.devices import onednn_isa_cap
from lib.errors import UserError, one_line
from lib.exported import INPUT_NAME, META_KEY, ExportedModel, check_export_meta, writable_cache
from lib.model_contract import normalization

# OpenVINO's inference precision hint per precision; an int8 graph (lib.int8) carries its own integer
# convolutions, and what it leaves in floating point runs in fp32
HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}
# OpenVINO pins its inference threads to cores by default. The engine's reading, writing and polygonizing
# threads run beside every model call, and a pinned thread cannot move off a core one of them takes, so
# the whole call waits for it: on a 2-core EPYC a 16-tile folder ran 1.5-3.7 % faster unpinned (medians,
# benchmarks/RESULTS.md), the model alone within 1 % of pinned.
PIN_THREADS = False


def _onnx_meta(path: Path) -> dict:
    """The toolkit's provenance stored in the ONNX file (OpenVINO does not expose metadata_props)."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # noqa: BLE001 - onnx raises DecodeError and others for a bad file
        raise UserError(f"{path}: not a readable ONNX model ({one_line(err, 120)}); re-export it with export.py") \
            from None
    props = {p.key: p.value for p in proto.metadata_props}
    try:
        return check_export_meta(json.loads(props.get(META_KEY, "null")), path)
    except json.JSONDecodeError:
        return check_export_meta(None, path)


class OpenVinoModel(ExportedModel):
    """An exported ONNX file compiled by OpenVINO for the CPU, answering like the eager model."""

    format = "openvino"

    def __init__(self, path: str | Path, precision: str = "fp32", cache_dir: Path | None = None):
        if precision not in HINTS:
            raise UserError(f"precision={precision}: OpenVINO runs fp32, bf16 or int8")
        try:
            import openvino as ov
        except ImportError:
            raise UserError("backend=openvino needs the optional package: pip install openvino") from None
        path = Path(path)
        super().__init__(path, _onnx_meta(path))
        self.precision = precision
        settings = {"INFERENCE_PRECISION_HINT": HINTS[precision], "PERFORMANCE_HINT": "LATENCY",
                    "INFERENCE_NUM_THREADS": max(1, torch.get_num_threads()), "ENABLE_CPU_PINNING": PIN_THREADS}
        if cache_dir is not None:  # b0's compiled graph: loaded in 0.17-0.19 s instead of compiled in 0.3-0.4 s
            settings["CACHE_DIR"] = str(cache_dir)
        core = ov.Core()
        try:
            graph = core.read_model(str(path))
            # a segmentation graph takes uint8 images and normalises them itself, fused before its first
            # layer: the engine then flips, batches and copies a quarter of the bytes (lib.model_contract)
            self.uint8_input = self.config.get("task", "segmentation") == "segmentation"
            if self.uint8_input:
                graph = _normalising(graph, self.in_channels)
            self.compiled = core.compile_model(graph, "CPU", settings)
        except Exception as err:  # noqa: BLE001 - OpenVINO raises RuntimeError subclasses of its own
            raise UserError(f"{path}: OpenVINO cannot compile it ({one_line(err, 160)}); use backend=onnxruntime") \
                from None
        self.request = self.compiled.create_infer_request()
        self._ports = [self.compiled.output(name) for name in self.output_names]

    def probabilities(self, x):
        if self.uint8_input and x.dtype != torch.uint8:
            raise ValueError(f"{self.path}: compiled for uint8 images, given {x.dtype} (see model_contract.model_input)")
        image = np.ascontiguousarray((x if self.uint8_input else x.float()).detach().cpu().numpy())
        results = self.request.infer({INPUT_NAME: image})
        return tuple(torch.from_numpy(np.array(results[port])).to(x.device) for port in self._ports)

    def extra_repr(self) -> str:
        return f"{self.path}, OpenVINO {self.precision}"


def _normalising(graph, channels: int):
    """`graph` taking uint8 images [N, C, H, W] and normalising them as `model_contract.normalize` does
    (the same float32 mean and standard deviation), by OpenVINO's preprocessing."""
    from openvino import Layout, Type
    from openvino.preprocess import PrePostProcessor

    mean, std = (np.asarray(v, np.float32) * np.float32(255.0) for v in normalization(channels))
    ppp = PrePostProcessor(graph)
    ppp.input(INPUT_NAME).tensor().set_element_type(Type.u8)
    ppp.input(INPUT_NAME).model().set_layout(Layout("NCHW"))
    ppp.input(INPUT_NAME).preprocess().convert_element_type(Type.f32).mean(mean.tolist()).scale(std.tolist())
    return ppp.build()


def compiled_cache(onnx_cache=None) -> Path:
    """Where OpenVINO keeps compiled graphs: beside the ONNX exports (lib.exported), one folder per oneDNN
    instruction-set cap, so a graph compiled for an emulated CPU is never loaded on the real one."""
    return writable_cache(onnx_cache) / "openvino" / (onednn_isa_cap() or "native").lower()


def openvino_models(onnx_files: list, precision: str, cache_dir: Path | None = None,
                    calibration=None) -> list[OpenVinoModel]:
    """The models' ONNX files (lib.exported.onnx_exports: paths, or ONNX models given as such) compiled
    by OpenVINO (with `cache_dir`, compiled once and then loaded). `precision=int8` compiles each file's
    int8 copy (lib.int8), calibrated on `calibration()`'s inputs [N, C, H, W]."""
    paths = []
    for m in onnx_files:
        if not isinstance(m, Path) and getattr(m, "format", "") != "onnx":
            raise UserError(f"{getattr(m, 'path', m)}: OpenVINO runs ONNX files only; use backend=torch")
        paths.append(m if isinstance(m, Path) else m.path)
    if precision == "int8":
        from lib import int8

        if calibration is None:
            raise UserError("precision=int8 needs calibration inputs (images to predict)")
        batch = calibration()
        digest = getattr(calibration, "digest", None)  # a Calibration hashes its inputs once
        paths = [int8.quantize(p, batch, digest) for p in paths]
    return [OpenVinoModel(p, precision, cache_dir) for p in paths]

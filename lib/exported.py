"""Exported graphs: a models x TTA ensemble traced to TorchScript and ONNX, checked, written, and run back.

The exported graph (`EnsembleTTA`) takes normalised images [N, C, H, W] (lib.model_contract.normalize; H
and W multiples of 32, any batch and size: the axes are dynamic) and returns
`(seg_prob [N, 1, H/4, W/4], cls_prob [N, 1])`: the building probability and the building-present
probability, each averaged over every model x TTA transform (lib.tta's transforms, so a transform has one
definition). When every model has the instance head, a third output `instance_prob [N, 2, H/4, W/4]`
(border, contact probabilities, averaged likewise) follows, and the file names its heads so that it is
read back with INSTANCE logits; ensembles without the head (or with a model lacking it) export as before. It runs without this toolkit: onnxruntime or `torch.jit.load` is enough. Each file carries
its provenance as JSON (toolkit version, model configs, sha256 of the source checkpoints, TTA list, output
semantics, the export check): ONNX `metadata_props` and a TorchScript extra file, both `buildings.json`.

Exporting and checking against eager PyTorch is `export_checked`, used by export.py and by inference's
`backend=onnxruntime` (`onnxruntime_models`, cached by checkpoint hash). `onnx_session` is the one place
that builds an onnxruntime.InferenceSession. `load_exported` wraps a file so it answers like an eager
model ({SEG, CLS} logits whose softmax gives the exported probabilities).

Other tasks subclass `EnsembleTTA` (lib.point_export: CircleNet point heads): the class says what the
graph takes (`model_input`, `input_description`), what it returns (`output_names`, `outputs`,
`output_axes`, `spatial`, `head_probabilities`, `undo`) and what its files record beyond the
segmentation provenance (`task_meta`: "task", "heads", "meta"). Export, check, writing and reading are
the same code for every task; a file with "heads" is read back as those heads (see ExportedModel).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import io
import json
import os
import tempfile
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lib.checkpoints import check_file, unwrap
from lib.cli import VERSION
from lib.errors import UserError, one_line
from lib.files import atomic_path, file_sha256
from lib.model_contract import CLS, INSTANCE, OUTPUT_STRIDE, SEG, STRIDE, check_input_size, normalize
from lib.tta import parse_tta, tta_forward, tta_inverse

FORMATS = ("torchscript", "onnx")
SUFFIXES = {"torchscript": ".torchscript", "onnx": ".onnx"}
EXPORT_FORMAT = "buildings-export"
EXPORT_FORMAT_VERSION = 1
META_KEY = "buildings.json"  # ONNX metadata_props key and TorchScript extra file name
INPUT_NAME = "image"
OUTPUT_NAMES = ("seg_prob", "cls_prob")
MIN_OPSET = 17
PROB_EPS = 1e-6  # probabilities are clamped to [eps, 1 - eps] before turning them back into logits
CHECK_TOLERANCE = 1e-4
GRAPH_REVISION = 2  # raised when a model's traced computation changes (model.py): cached exports are redone
ONNX_TRACE_SIZE = 256  # side used to trace the graphs cached for backend=onnxruntime (axes stay dynamic)
OUTPUTS = {
    "seg_prob": "float32 [N, 1, H/4, W/4]: building probability, mean over models x TTA of softmax(seg)[:, 1] "
                "with each transform undone",
    "cls_prob": "float32 [N, 1]: building-present probability, mean over models x TTA of softmax(cls)[:, 1]",
}
INPUT = ("float32 [N, C, H, W], H and W multiples of 32, RGB 0..255 normalised with the ImageNet mean/std "
         "(model.normalize)")
OUTPUT_AXES = {OUTPUT_NAMES[0]: {0: "batch", 2: "height_4", 3: "width_4"}, OUTPUT_NAMES[1]: {0: "batch"}}
INSTANCE_OUTPUT = "instance_prob"  # third output of ensembles whose models all have the instance head
INSTANCE_DESCRIPTION = ("float32 [N, 2, H/4, W/4]: border (channel 0) and contact (1) probabilities, mean over "
                        "models x TTA of sigmoid(instance) with each transform undone")
TITLES = {"segmentation": "building footprint segmentation", "points": "point detection (CircleNet)"}
# how a file's "heads" entry turns an output back into a head; "probs": [N, 1, ...] -> 2-class logits
HEAD_TRANSFORMS = ("sigmoid", "identity", "probs")


class ExportCheckError(RuntimeError):
    """The exported graph does not reproduce eager PyTorch within CHECK_TOLERANCE."""


# --------------------------------------------------------------------------------------------------
# The exported graph
# --------------------------------------------------------------------------------------------------

class EnsembleTTA(nn.Module):
    """Models x TTA transforms averaged into (seg_prob, cls_prob): the graph that is exported.

    Transforms that keep the tile's orientation (flips) are batched into one model call, as are the
    transposed ones, so an ensemble of m models with t transforms runs at most 2m calls; splitting
    the results back uses `unflatten(0, (k, -1))`, which keeps the batch axis dynamic in the traced
    graph. `batch_tta=False` calls the model once per transform (less memory on large tiles).
    The class attributes and the methods after `__init__` are what a task's subclass redefines.
    """

    task = "segmentation"  # TITLES[task] opens the ONNX doc string
    input_description = INPUT
    output_names = OUTPUT_NAMES
    outputs = OUTPUTS
    output_stride = OUTPUT_STRIDE
    output_axes = OUTPUT_AXES  # dynamic axes of each output in the ONNX graph
    spatial = (True, False)  # per output: a map that TTA moves (undone per transform), or per image

    def __init__(self, models: Sequence[nn.Module], tta: Sequence[str] | str = ("none",), batch_tta: bool = True):
        super().__init__()
        if not models:
            raise UserError("model=[]: give at least one checkpoint to export")
        self.models = nn.ModuleList(unwrap(m).eval() for m in models)
        self.tta = tuple(parse_tta(tta))
        plain = tuple(n for n in self.tta if not n.startswith("transpose"))
        swapped = tuple(n for n in self.tta if n.startswith("transpose"))
        groups = [g for g in (plain, swapped) if g]
        self.groups = groups if batch_tta else [(n,) for n in self.tta]
        channels = {int(getattr(m, "config", {}).get("in_channels", 3)) for m in self.models}
        if len(channels) > 1:
            raise UserError(f"model=[...]: the checkpoints take different numbers of input channels "
                            f"({sorted(channels)}); an ensemble needs one input")
        self.in_channels = channels.pop()
        self.instance = self.task == EnsembleTTA.task and all(
            (getattr(m, "config", None) or {}).get("instance_head") for m in self.models)
        if self.instance:
            self.output_names = (*OUTPUT_NAMES, INSTANCE_OUTPUT)
            self.outputs = {**OUTPUTS, INSTANCE_OUTPUT: INSTANCE_DESCRIPTION}
            self.output_axes = {**OUTPUT_AXES, INSTANCE_OUTPUT: OUTPUT_AXES[OUTPUT_NAMES[0]]}
            self.spatial = (True, False, True)
        self.eval()

    def model_input(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 images [N, C, H, W] -> what the graph takes (ImageNet-normalised RGB here)."""
        return normalize(image)

    def head_probabilities(self, out: dict) -> list[torch.Tensor]:
        """One model call's outputs, in `output_names` order, as the quantities that are averaged."""
        probs = [torch.softmax(out[SEG], 1)[:, 1:2], torch.softmax(out[CLS], 1)[:, 1:2]]
        return [*probs, torch.sigmoid(out[INSTANCE])] if self.instance else probs

    def undo(self, index: int, y: torch.Tensor, name: str) -> torch.Tensor:
        """Spatial output `index` seen through transform `name`, moved back to the input's grid."""
        return tta_inverse(y, name)

    def task_meta(self) -> dict:
        """Provenance entries of this task beyond the segmentation ones: with the instance head, the heads
        the file is read back as (ExportedModel), else none."""
        if not self.instance:
            return {}
        return {"heads": [[OUTPUT_NAMES[0], SEG, "probs"], [OUTPUT_NAMES[1], CLS, "probs"],
                          [INSTANCE_OUTPUT, INSTANCE, "sigmoid"]]}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        sums: list = [None] * len(self.output_names)
        for net in self.models:
            for group in self.groups:
                views = [tta_forward(x, name) for name in group]
                out = net(torch.cat(views) if len(views) > 1 else views[0])
                for k, y in enumerate(self.head_probabilities(out)):
                    y = y.unflatten(0, (len(group), -1))
                    parts = [self.undo(k, y[i], name) for i, name in enumerate(group)] if self.spatial[k] \
                        else [y.sum(0)]
                    for part in parts:
                        sums[k] = part if sums[k] is None else sums[k] + part
        n = float(len(self.models) * len(self.tta))
        return tuple(s / n for s in sums)


@contextlib.contextmanager
def _quiet_tracing():
    """Hide tracer/exporter chatter that says nothing about this graph.

    TorchScript and the TorchScript-based ONNX exporter announce their deprecation, and GroupNorm's
    training-only batch check warns about a shape-to-bool conversion that eval graphs never take.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*(deprecated|legacy TorchScript-based ONNX|will be removed|Constant folding).*")
        yield


def trace_torchscript(ensemble: EnsembleTTA, example: torch.Tensor) -> torch.jit.ScriptModule:
    """`torch.jit.trace` of the ensemble on `example` (sizes stay dynamic: nothing reads them as ints)."""
    with _quiet_tracing(), torch.no_grad():
        return torch.jit.trace(ensemble.eval(), example, check_trace=False)


def onnx_bytes(ensemble: EnsembleTTA, example: torch.Tensor, opset: int = MIN_OPSET) -> bytes:
    """ONNX model of the ensemble with dynamic batch/height/width (TorchScript-based exporter)."""
    if int(opset) < MIN_OPSET:
        raise UserError(f"opset={opset}: must be at least {MIN_OPSET}")
    buf = io.BytesIO()
    dynamic = {INPUT_NAME: {0: "batch", 2: "height", 3: "width"}, **ensemble.output_axes}
    with _quiet_tracing(), torch.no_grad():
        torch.onnx.export(ensemble.eval(), (example,), buf, input_names=[INPUT_NAME],
                          output_names=list(ensemble.output_names), dynamic_axes=dynamic, opset_version=int(opset),
                          dynamo=False, do_constant_folding=True)
    return buf.getvalue()


def with_onnx_metadata(data: bytes, meta: dict) -> bytes:
    """Add the provenance JSON to an ONNX model's metadata_props and validate the model."""
    import onnx

    proto = onnx.load_from_string(data)
    entry = proto.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps(meta, default=str)
    title = TITLES[meta.get("task", EnsembleTTA.task)]
    proto.doc_string = f"{title}: " + "; ".join(f"{k} = {v}" for k, v in (meta.get("outputs") or OUTPUTS).items())
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


# --------------------------------------------------------------------------------------------------
# Export and check
# --------------------------------------------------------------------------------------------------

def export_metadata(ensemble: EnsembleTTA, checkpoints: Sequence[Path], width: int, kind: str, opset: int) -> dict:
    """Provenance of an export: what went in (sha256, configs), what the graph computes, how it was made."""
    models = []
    for path, net in zip(checkpoints, ensemble.models):
        models.append({"path": str(path), "sha256": file_sha256(path), "config": dict(net.config),
                       "meta": json.loads(json.dumps(getattr(net, "meta", {}) or {}, default=str))})
    meta = {
        "format": EXPORT_FORMAT, "format_version": EXPORT_FORMAT_VERSION, "kind": kind,
        "version": VERSION, "torch": torch.__version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "models": models, "tta": list(ensemble.tta), "trace_size": [int(width), int(width)],
        "input_name": INPUT_NAME, "input": ensemble.input_description, "input_channels": ensemble.in_channels,
        "stride": STRIDE, "output_stride": ensemble.output_stride,
        "output_names": list(ensemble.output_names), "outputs": dict(ensemble.outputs),
        **ensemble.task_meta(),
    }
    if kind == "onnx":
        meta["opset"] = int(opset)
    return meta


def check_batch(ensemble: EnsembleTTA, width: int, seed: int = 0) -> torch.Tensor:
    """A batch of 2 non-square images of about half the traced side: checks the dynamic batch and
    spatial axes (a size baked into the graph would fail here) at a quarter of the traced cost."""
    g = torch.Generator().manual_seed(seed)
    side = max(STRIDE, width // 2 // STRIDE * STRIDE)
    img = torch.randint(0, 256, (2, ensemble.in_channels, side, side + STRIDE), generator=g, dtype=torch.uint8)
    return ensemble.model_input(img)


def _max_diff(a: Sequence, b: Sequence) -> float:
    return max(float((torch.as_tensor(x) - torch.as_tensor(y)).abs().max()) for x, y in zip(a, b))


def _run_graph(kind: str, artefact, x: torch.Tensor, output_names: Sequence[str]):
    if kind == "torchscript":
        with torch.no_grad(), torch.jit.optimized_execution(False):
            return artefact(x)
    return onnx_session(artefact).run(list(output_names), {INPUT_NAME: x.numpy()})


def export_checked(ensemble: EnsembleTTA, kinds: Sequence[str], checkpoints: Sequence[Path], width: int, *,
                   batch_size: int = 1, opset: int = MIN_OPSET, check: bool = True) -> dict[str, tuple]:
    """{kind: (traced module or ONNX bytes, metadata)} for each kind, each checked against eager PyTorch.

    Traced on a grey batch of `batch_size` x `width`^2; checked on `check_batch` (another batch size and
    shape, so baked-in sizes fail). A difference above CHECK_TOLERANCE raises ExportCheckError before the
    caller writes anything; the measured difference is recorded in the metadata.
    """
    grey = torch.full((int(batch_size), ensemble.in_channels, width, width), 128, dtype=torch.uint8)
    example = ensemble.model_input(grey)
    check_x = check_batch(ensemble, width) if check else None
    reference = None
    if check_x is not None:
        with torch.no_grad():
            reference = ensemble(check_x)
    out = {}
    for kind in kinds:
        meta = export_metadata(ensemble, checkpoints, width, kind, opset)
        artefact = trace_torchscript(ensemble, example) if kind == "torchscript" else \
            onnx_bytes(ensemble, example, opset)
        if check_x is not None:
            diff = _max_diff(reference, _run_graph(kind, artefact, check_x, ensemble.output_names))
            if diff > CHECK_TOLERANCE:
                raise ExportCheckError(f"exported {kind} graph differs from eager PyTorch by {diff:.2e} "
                                       f"(> {CHECK_TOLERANCE}); nothing was written")
            meta["check"] = {"input_shape": list(check_x.shape), "max_abs_diff": diff, "tolerance": CHECK_TOLERANCE}
        out[kind] = (artefact, meta)
    return out


def write_exported(path: str | os.PathLike, kind: str, artefact, meta: dict) -> None:
    """Write a traced module or ONNX bytes atomically with its `buildings.json` provenance."""
    with atomic_path(path) as tmp:
        if kind == "torchscript":
            with _quiet_tracing():
                torch.jit.save(artefact, str(tmp), _extra_files={META_KEY: json.dumps(meta, default=str)})
        else:
            tmp.write_bytes(with_onnx_metadata(artefact, meta))


# --------------------------------------------------------------------------------------------------
# Running exported files like a model
# --------------------------------------------------------------------------------------------------

def check_export_meta(meta, path: Path) -> dict:
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        raise UserError(f"{path}: not exported by this toolkit (no '{META_KEY}' metadata); "
                        "export the checkpoint with export.py")
    if int(meta.get("format_version", 0)) > EXPORT_FORMAT_VERSION:
        raise UserError(f"{path}: exported by a newer version of this toolkit ({meta.get('version')}); "
                        "upgrade the toolkit or re-export with this version")
    return meta


class ExportedModel(nn.Module):
    """An exported ensemble behind the eager model's interface: `forward(x)` -> {SEG, CLS} logits.

    The file returns probabilities; they become 2-class logits `[log(1 - p), log(p)]` (p clamped to
    [1e-6, 1 - 1e-6]) so that softmax(...)[:, 1] gives p back and callers of an eager model (the
    engine) need no special case. `.config` says `exported: True` with the TTA baked in, `.meta` holds
    the provenance plus the training GSD (`model_gsd`, `ref_scale`, ...) when the source models agree on it.

    A file of another task (lib.point_export) names its heads: `forward` then returns {head: output},
    a probability turned back into a logit (`prob_to_logit`) where the entry says "sigmoid";
    `.config["task"]` is the file's task and `.meta` also holds the meta it stored for inference.
    """

    format = ""

    def __init__(self, path: Path, meta: dict):
        super().__init__()
        self.path = Path(path)
        self.provenance = meta  # the whole buildings.json
        models = meta.get("models") or []
        self.in_channels = int(meta.get("input_channels", 3))
        self.config = {"exported": True, "format": self.format, "tta": list(meta.get("tta") or []),
                       "in_channels": self.in_channels, "models": [m.get("config") for m in models],
                       "model_name": "+".join(sorted({str((m.get("config") or {}).get("model_name")) for m in models}))}
        self.meta = {"source": f"export-{self.format}", "version": meta.get("version"),
                     "created": meta.get("created"), "sha256": [m.get("sha256") for m in models]}
        metas = [m.get("meta") or {} for m in models]
        for key in ("gsd", "ref_scale", "train_gsd", "model_gsd", "model_gsd_source"):  # see tiling.model_gsd
            values = {mm.get(key) for mm in metas}
            if metas and all(key in mm for mm in metas) and len(values) == 1:
                self.meta[key] = values.pop()
        if meta.get("quantization"):  # an int8 copy (lib.int8): how it was quantized
            self.meta["quantization"] = meta["quantization"]
        self.output_names = list(meta.get("output_names") or OUTPUT_NAMES)
        self.heads = [tuple(h) for h in meta.get("heads") or []]  # (output name, head, transform)
        if any(len(h) != 3 or h[0] not in self.output_names or h[2] not in HEAD_TRANSFORMS for h in self.heads):
            raise UserError(f"{path}: its '{META_KEY}' names heads this version cannot read; re-export it with export.py")
        if any(h[1] == INSTANCE for h in self.heads):
            self.config["instance_head"] = True
        if "task" in meta:
            self.config["task"] = meta["task"]
            self.meta.update(meta.get("meta") or {})

    def check_input(self, x: torch.Tensor) -> None:
        """One-line errors for inputs the graph cannot take (it would fail deep inside otherwise)."""
        if x.ndim != 4:
            raise UserError(f"{self.path}: input of shape {tuple(x.shape)}; expected [N, {self.in_channels}, H, W]")
        if x.shape[1] != self.in_channels:
            raise UserError(f"{self.path}: input has {x.shape[1]} channels; this model takes {self.in_channels}")
        check_input_size(x)

    def probabilities(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The file's own outputs, in `output_names` order (segmentation: seg_prob [N, 1, H/4, W/4],
        cls_prob [N, 1]) on x's device."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.check_input(x)
        with torch.no_grad():
            outputs = self.probabilities(x)
        if not self.heads:
            seg_prob, cls_prob = outputs
            return {SEG: probs_to_logits(seg_prob), CLS: probs_to_logits(cls_prob)}
        by_name = dict(zip(self.output_names, outputs))
        how_to = {"sigmoid": prob_to_logit, "probs": probs_to_logits, "identity": lambda y: y.float()}
        return {head: how_to[how](by_name[name]) for name, head, how in self.heads}

    def extra_repr(self) -> str:
        return f"{self.path}, tta={self.config['tta']}"


def probs_to_logits(p: torch.Tensor) -> torch.Tensor:
    """[N, 1, ...] probability -> [N, 2, ...] logits whose softmax is (1 - p, p)."""
    p = p.float().clamp(PROB_EPS, 1.0 - PROB_EPS)
    return torch.cat([torch.log1p(-p), torch.log(p)], 1)


def prob_to_logit(p: torch.Tensor) -> torch.Tensor:
    """The one-channel form of `probs_to_logits`: a probability -> the logit whose sigmoid is p."""
    p = p.float().clamp(PROB_EPS, 1.0 - PROB_EPS)
    return torch.log(p) - torch.log1p(-p)


class TorchScriptModel(ExportedModel):
    format = "torchscript"

    def __init__(self, path: Path, device: str | torch.device = "cpu"):
        extra = {META_KEY: ""}
        try:
            with _quiet_tracing():
                module = torch.jit.load(str(path), map_location=torch.device(device), _extra_files=extra)
        except (RuntimeError, ValueError, OSError, zipfile.BadZipFile) as err:
            raise UserError(f"{path}: not a readable TorchScript file ({one_line(err, 160)}); "
                            "re-export it with export.py") from None
        try:
            meta = json.loads(extra[META_KEY] or "null")
        except json.JSONDecodeError:
            meta = None
        super().__init__(path, check_export_meta(meta, Path(path)))
        self.module = module.eval()

    def probabilities(self, x):
        # The profiling executor re-optimises the graph on its first calls (seconds each, no gain for
        # convolutions); plain execution is as fast from the first tile on.
        with torch.jit.optimized_execution(False):
            return tuple(self.module(x.float()))


class OnnxModel(ExportedModel):
    """Runs the ONNX file with onnxruntime: CUDA provider on a CUDA device when installed, else CPU.

    Tensors cross to numpy and back. `.to(device)` re-creates the session for the new device.
    """

    format = "onnx"

    def __init__(self, path: Path, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        session = onnx_session(Path(path), self.device)
        try:
            meta = json.loads(session.get_modelmeta().custom_metadata_map.get(META_KEY, "null"))
        except json.JSONDecodeError:
            meta = None
        super().__init__(path, check_export_meta(meta, Path(path)))
        self.session = session

    def to(self, *args, **kwargs):
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        if device is not None and torch.device(device) != self.device:
            self.device = torch.device(device)
            self.session = onnx_session(self.path, self.device)
        return self

    def cpu(self):
        return self.to("cpu")

    def cuda(self, device=None):
        return self.to(torch.device("cuda", device) if isinstance(device, int) else (device or "cuda"))

    def providers(self) -> list[str]:
        return self.session.get_providers()

    def probabilities(self, x):
        image = np.ascontiguousarray(x.detach().float().cpu().numpy())
        outputs = self.session.run(self.output_names, {INPUT_NAME: image})
        return tuple(torch.from_numpy(y).to(x.device) for y in outputs)


def onnx_session(model: Path | bytes, device: torch.device | str = "cpu"):
    """The one place an onnxruntime.InferenceSession is built, from a file or from ONNX bytes.

    CUDA provider on a CUDA device when onnxruntime has it, else CPU; CPU threads follow
    `torch.get_num_threads()` so one setting governs both runtimes; a bad file is one line naming it.
    """
    import onnxruntime as ort

    device = torch.device(device)
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    options.log_severity_level = 3
    source = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(source, options, providers=providers)
    except Exception as err:  # noqa: BLE001 - onnxruntime raises its own classes for every kind of bad file
        name = "exported graph" if isinstance(model, bytes) else model
        raise UserError(f"{name}: not a readable ONNX model ({one_line(err, 160)}); re-export it with export.py") \
            from None


def load_exported(path: str | os.PathLike, device: str | torch.device = "cpu") -> ExportedModel:
    """Open an exported file (ONNX or TorchScript) as a model-like module in eval mode."""
    path = check_file(path, "exported model")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: file is empty; re-export it with export.py")
    if path.suffix.lower() == ".onnx":
        return OnnxModel(path, device).eval()
    return TorchScriptModel(path, device).eval()


# --------------------------------------------------------------------------------------------------
# backend=onnxruntime: checkpoints exported once and cached
# --------------------------------------------------------------------------------------------------

def onnx_cache_dir() -> Path:
    """Where `backend=onnxruntime` keeps exported checkpoints ($BUILDINGS_CACHE or ~/.cache/buildings)."""
    root = os.environ.get("BUILDINGS_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return Path(root) / ("onnx" if os.environ.get("BUILDINGS_CACHE") else "buildings/onnx")


def writable_cache(cache_dir: str | os.PathLike | None) -> Path:
    """`cache_dir` (default onnx_cache_dir()), or a private temporary folder when it is read-only (CI)."""
    cache = Path(cache_dir) if cache_dir else onnx_cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
        probe = cache / f".probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError:
        cache = Path(tempfile.mkdtemp(prefix="buildings-onnx-"))
    return cache


def onnxruntime_models(models: Sequence[nn.Module], paths: Sequence[str | os.PathLike],
                       cache_dir: str | os.PathLike | None = None) -> list[nn.Module]:
    """The same models run by ONNX Runtime (about 2x faster than eager PyTorch on CPUs without AMX);
    exported files pass through."""
    return [m if isinstance(m, ExportedModel) else load_exported(m)
            for m in onnx_exports(models, paths, cache_dir)]


def onnx_exports(models: Sequence[nn.Module], paths: Sequence[str | os.PathLike],
                 cache_dir: str | os.PathLike | None = None) -> list:
    """Each checkpoint's ONNX file, exported once by `export_checked` with no TTA (the engine batches TTA
    itself) and cached under `cache_dir` by the sha256 of its file and configuration, the torch version and
    GRAPH_REVISION; an already exported model stays as it is. Other runtimes (OpenVINO) compile these
    files without an ONNX Runtime session."""
    cache = writable_cache(cache_dir)
    out = []
    for net, path in zip(models, paths):
        if isinstance(net, ExportedModel):
            out.append(net)
            continue
        key = hashlib.sha256((file_sha256(path) + json.dumps(getattr(net, "config", {}), sort_keys=True)
                              + torch.__version__ + f"/graph{GRAPH_REVISION}").encode()).hexdigest()[:24]
        target = cache / f"{Path(path).stem}-{key}.onnx"
        if not target.is_file():
            try:
                graphs = export_checked(EnsembleTTA([net], ["none"]), ["onnx"], [Path(path)], ONNX_TRACE_SIZE)
            except ExportCheckError as err:
                raise UserError(f"{path}: {err}; use backend=torch") from None
            write_exported(target, "onnx", *graphs["onnx"])
        out.append(target)
    return out

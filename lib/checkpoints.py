"""Model files of every kind this toolkit reads or writes, as plain data (no network is built here).

    native       this toolkit's `.pth`: {"format": CHECKPOINT_FORMAT, "model_config", "state_dict", "meta",
                 and the training state train.py stores beside them}
    seed         the Open Cities 3rd-place pipeline's published files (`m40000.pth`, `ave.pth`): a bare state
                 dict or {"state_dict": ...}, in the original parameter names and without a config
    safetensors  `.safetensors`: tensors, plus "model_config"/"meta" JSON in the header when present
    torchscript  a TorchScript archive written by export.py (by suffix, or a zip holding `code/`)
    onnx         an ONNX model written by export.py (by suffix)

PyTorch files load with `torch.load(weights_only=True)` only: a checkpoint is data, never code. A bad file
(missing, empty, truncated, pickled objects) is refused with one line naming it. Turning a state dict into a
network is model.py's job; opening exported graphs is lib.exported's. Files are hashed once, by
lib.files.file_sha256.
"""

from __future__ import annotations

import datetime
import json
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lib.cli import VERSION
from lib.errors import UserError
from lib.files import atomic_path, file_sha256

CHECKPOINT_FORMAT = "buildings-efficient-fpn"
CHECKPOINT_FORMAT_VERSION = 1
TORCHSCRIPT_SUFFIXES = (".torchscript", ".ts")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP and torch.compile


@dataclass
class Checkpoint:
    """A weights file read as plain data: what model.py needs to rebuild the network, and the rest."""

    path: Path
    format: str  # native | seed | safetensors
    state_dict: dict  # names as stored (the seed's names for seed files), wrapper prefixes removed
    model_config: dict | None  # None: the architecture must be inferred from the weights
    meta: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # training state: optimizer, step, epoch, metrics, ...

    @property
    def sha256(self) -> str:
        return file_sha256(self.path)

    def model_meta(self, source: str) -> dict:
        """The `.meta` of the network built from it: stored metadata, training progress (step, epoch,
        metrics) and `source`, where the weights come from, unless stored."""
        meta = dict(self.meta)
        for key in ("step", "epoch", "metrics"):
            if key in self.extra and key not in meta:
                meta[key] = self.extra[key]
        meta.setdefault("source", source)
        return meta


# ----------------------------------------------------------------------------------------------
# What a file is
# ----------------------------------------------------------------------------------------------


def exported_kind(path: str | os.PathLike) -> str | None:
    """"onnx" or "torchscript" when `path` names an exported graph, None for a checkpoint.

    `.onnx`/`.torchscript`/`.ts` by name; any other name (`.pt`, `.pth`, ...) only when the file is a
    TorchScript archive. torch.save files are zip archives too, but only TorchScript archives hold a
    `code/` folder (the serialized graph's Python source) beside `constants.pkl`.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    if suffix in TORCHSCRIPT_SUFFIXES or _is_torchscript_archive(path):
        return "torchscript"
    return None


def _is_torchscript_archive(path: Path) -> bool:
    if not path.is_file() or not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            parts = [n.split("/") for n in zf.namelist()]
    except (zipfile.BadZipFile, OSError):
        return False
    has_code = any(len(p) > 2 and p[1] == "code" for p in parts)
    has_constants = any(len(p) == 2 and p[1] == "constants.pkl" for p in parts)
    return has_code and has_constants


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


def check_file(path: str | os.PathLike, what: str = "checkpoint") -> Path:
    """The path, if it names a non-empty file; otherwise one line saying what is wrong."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a directory, not a {what} file; pass the file with model=<path>")
    if not path.is_file():
        raise UserError(f"{path}: {what} not found; check the model=<path> argument")
    return path


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A checkpoint file as the dict it stores (weights-only), or one line naming the file.

    `.safetensors` files give {"state_dict": ..., "model_config"/"meta" from their metadata}.
    """
    path = check_file(path)
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        msg = str(err)
        if "Weights only load failed" in msg and ("GLOBAL" in msg or "global" in msg):
            raise UserError(f"{path}: checkpoint contains pickled Python objects, which are not loaded for "
                            "safety; re-save it with plain tensors (state_dict) only") from None
        raise UserError(f"{path}: checkpoint is corrupt or not a PyTorch file; re-download or re-train it") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError, IndexError) as err:
        kind = "truncated or corrupt" if path.stat().st_size else "empty"
        raise UserError(f"{path}: checkpoint is {kind} ({type(err).__name__}); re-download or re-train it") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: checkpoint holds a {type(data).__name__}, not a dict of weights")
    return data


def _load_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        state_dict = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{path}: not a readable safetensors file ({str(err).splitlines()[0]})") from None
    out = {"state_dict": state_dict}
    for key in ("model_config", "meta"):
        if key in metadata:
            out[key] = json.loads(metadata[key])
    return out


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Any checkpoint (native, seed, safetensors) as a `Checkpoint`; exported graphs are refused."""
    path = check_file(path)
    kind = exported_kind(path)
    if kind:
        raise UserError(f"{path}: is an exported {kind} model, not a checkpoint; pass the .pth it came from")
    data = load_checkpoint(path)
    weights_key, state_dict = _weights_of(data, path)
    config = data.get("model_config") if isinstance(data.get("model_config"), dict) else None
    if path.suffix == ".safetensors":
        fmt = "safetensors"
    else:
        fmt = "native" if config is not None or data.get("format") == CHECKPOINT_FORMAT else "seed"
    stored = (weights_key, "model_config", "meta", "format", "format_version")
    extra = {k: v for k, v in data.items() if k not in stored} if weights_key else {}
    return Checkpoint(path, fmt, strip_wrappers(state_dict), dict(config) if config else None,
                      dict(data.get("meta") or {}), extra)


def _weights_of(data: dict, path: Path) -> tuple[str | None, dict]:
    """(key, weights) inside a checkpoint dict: ours, the original pipeline's, or a bare state dict (key None)."""
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(data.get(key), dict):
            return key, data[key]
    if data and all(isinstance(v, torch.Tensor) for v in data.values()):
        return None, data
    raise UserError(f"{path}: no model weights found (expected a 'state_dict' entry)")


def strip_wrappers(state_dict: dict) -> dict:
    """Drop DataParallel/DDP (`module.`) and torch.compile (`_orig_mod.`) prefixes from parameter names."""
    out = {}
    for k, v in state_dict.items():
        for prefix in WRAPPER_PREFIXES:
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside DDP/DataParallel and torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            return model


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def save_checkpoint(path: str | os.PathLike, model: nn.Module, **extra) -> None:
    """Write a native checkpoint atomically: format marker, the model's `.config`, weights, metadata.

    `extra` (optimizer/scheduler/scaler state, rng, step, epoch, metrics, train_config, meta, ...) is
    stored alongside; `meta` is merged over the code version and time stamp. The file loads with
    `torch.load(weights_only=True)`: nothing in it needs unpickling code.
    """
    net = unwrap(model)
    meta = {"version": VERSION, "torch": torch.__version__,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    meta.update(extra.pop("meta", None) or {})
    payload = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "model_config": dict(net.config),
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "meta": meta,
    }
    for key, value in extra.items():
        if key in payload:
            raise TypeError(f"save_checkpoint(): '{key}' is reserved")
        payload[key] = value
    payload = plain(payload)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def update_meta(path: str | os.PathLike, changes: dict) -> dict:
    """Merge `changes` into a checkpoint's stored `meta` and rewrite the file atomically; returns the new meta.

    Everything else (weights, config, training state; a safetensors file's tensors and other header
    entries) is written back exactly as read, so the network and a resumed run are unchanged. A bare
    state dict has no place for metadata and is refused, as are exported graphs.
    """
    path = check_file(path)
    if exported_kind(path):
        raise UserError(f"{path}: an exported model cannot store metadata; pass the .pth it came from")
    if path.suffix == ".safetensors":
        return _update_safetensors_meta(path, changes)
    data = load_checkpoint(path)
    if _weights_of(data, path)[0] is None:
        raise UserError(f"{path}: a bare state dict has no place for metadata; re-save it with save_checkpoint")
    data["meta"] = {**(data.get("meta") or {}), **plain(dict(changes), "meta")}
    with atomic_path(path) as tmp:
        torch.save(data, tmp)
    return data["meta"]


def _update_safetensors_meta(path: Path, changes: dict) -> dict:
    from safetensors import safe_open
    from safetensors.torch import save_file

    data = _load_safetensors(path)  # refuses an unreadable file in one line
    with safe_open(str(path), framework="pt") as f:
        header = dict(f.metadata() or {})
    meta = {**(data.get("meta") or {}), **changes}
    header["meta"] = json.dumps(meta)
    with atomic_path(path) as tmp:
        save_file(data["state_dict"], str(tmp), metadata=header)
    return meta


def plain(obj, where: str = "checkpoint"):
    """Convert to what `torch.load(weights_only=True)` accepts: tensors, numbers, strings, containers.

    numpy arrays become tensors and numpy scalars Python numbers (e.g. `np.random.get_state()`),
    OmegaConf configs plain dicts, paths strings; anything else is a bug in the caller.
    """
    import numpy as np

    if obj is None or isinstance(obj, (torch.Tensor, torch.dtype, torch.device)):
        return obj
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.astype(np.int64) if obj.dtype.kind == "u" else obj.copy())
    if isinstance(obj, np.generic):
        return obj.item()
    for kind in (bool, int, float, str, bytes):  # exact types: subclasses (TorchVersion, ...) pickle as objects
        if isinstance(obj, kind):
            return kind(obj)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, dict):
        return {k: plain(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(obj, (DictConfig, ListConfig)):
            return OmegaConf.to_container(obj, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    raise TypeError(f"{where}: cannot store {type(obj).__name__} in a weights-only checkpoint")


# ----------------------------------------------------------------------------------------------
# The original pipeline's parameter names (plain renaming of state dicts; model.py re-exports these)
# ----------------------------------------------------------------------------------------------

# (original prefix, our prefix); matched longest first. Encoder keys keep efficientnet-pytorch's names.
SEED_PREFIXES = [
    ("_conv_stem.", "encoder._conv_stem."),
    ("_bn0.", "encoder._bn0."),
    ("_blocks.", "encoder._blocks."),
    ("_conv_head.", "encoder._conv_head."),
    ("_bn1.", "encoder._bn1."),
    ("lateral0.", "decoder.lateral.0."),
    ("lateral1.", "decoder.lateral.1."),
    ("lateral2.", "decoder.lateral.2."),
    ("lateral3.", "decoder.lateral.3."),
    ("top1.", "decoder.branches.0."),
    ("top2.", "decoder.branches.1."),
    ("top3.0.", "decoder.branches.2."),
    ("ctx.", "decoder.context."),
    ("aspp.atrous0.", "decoder.aspp.convs.0."),
    ("aspp.atrous1.module.", "decoder.aspp.convs.1."),
    ("aspp.atrous2.module.", "decoder.aspp.convs.2."),
    ("aspp.atrous3.module.", "decoder.aspp.convs.3."),
    ("aspp.atrous4.module.", "decoder.aspp.pool."),
    ("aspp.combine.", "decoder.aspp.project."),
    ("top4.", "decoder.fuse."),
    ("conv_att.", "decoder.attention."),
    ("bce_logit.", "seg_head."),
    ("dice.", "dice_head."),
    ("_fc.", "image_heads.cls."),
    ("_fc2.", "image_heads.scale."),
]
_SEED_ORDER = sorted(SEED_PREFIXES, key=lambda p: -len(p[0]))
_OURS_ORDER = sorted(SEED_PREFIXES, key=lambda p: -len(p[1]))


def _rename(key: str, table) -> str | None:
    for old, new in table:
        if key.startswith(old):
            return new + key[len(old):]
    return None


def from_seed_names(state_dict: dict) -> dict:
    """Original pipeline parameter names -> ours (unknown keys kept, so a strict load reports them)."""
    return {(_rename(k, _SEED_ORDER) or k): v for k, v in state_dict.items()}


def to_seed_names(state_dict: dict) -> dict:
    """Our parameter names -> the original pipeline's (to hand weights back to its code).

    Parameters the original network does not have (the instance head's `instance_head.*`) keep their
    names: from_seed_names round-trips them, the original code's strict load reports them as unexpected
    (load with strict=False there, or export a model without the head).
    """
    swapped = [(new, old) for old, new in _OURS_ORDER]
    return {(_rename(k, swapped) or k): v for k, v in state_dict.items()}

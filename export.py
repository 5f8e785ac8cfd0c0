"""Export a model or a TTA ensemble to TorchScript and ONNX files that run without this toolkit.

    python export.py model=models/m40000.pth width=672
    python export.py model=[b1.pth,b2.pth] tta=[none,hflip,vflip,hvflip,transpose] width=672 output=exports/ens
    python export.py model=[circlenet1.pth,circlenet2.pth] tta=[none,hflip] width=512

The task is the checkpoints' own (all must be of one task). Segmentation: the graph takes normalised
images [N, C, H, W] (any batch, H and W multiples of 32) and returns `(seg_prob [N, 1, H/4, W/4],
cls_prob [N, 1])` averaged over every model x TTA transform, plus `instance_prob [N, 2, H/4, W/4]`
(border, contact) when every checkpoint has the instance head (read back as its INSTANCE logits). Points (CircleNet checkpoints): the graph
takes SAR windows / 255 and returns the five point heads at stride 2, averaged likewise
(lib/point_export.py). Each file carries its provenance as `buildings.json` (see lib/exported.py,
which builds, checks and reads them). Every format is exported and checked against eager PyTorch
before anything is written. `inference.py model=<file>.onnx` (or `.torchscript`; `task=points` for a
point graph) runs the result like a checkpoint.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

import circlenet  # noqa: F401  (registers CircleNet checkpoints with model.load_models)
import model as model_lib
from lib.checkpoints import TORCHSCRIPT_SUFFIXES, exported_kind
from lib.cli import cli
from lib.errors import UserError
from lib.exported import FORMATS, MIN_OPSET, SUFFIXES, EnsembleTTA, export_checked, write_exported
from lib.point_export import PointEnsembleTTA
from lib.tta import parse_tta

ENSEMBLES = {EnsembleTTA.task: EnsembleTTA, PointEnsembleTTA.task: PointEnsembleTTA}


def _as_list(value) -> list:
    from omegaconf import OmegaConf

    if value is None:
        return []
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value)
    return [value] if isinstance(value, (str, os.PathLike)) else list(value)


def output_stem(output, checkpoints: list[Path], tta: list[str]) -> Path:
    """Where the files go: `<stem>.onnx` / `<stem>.torchscript`.

    `output` may be a stem (a known suffix is dropped), a directory (existing, or written with a
    trailing slash), or null (beside the first checkpoint). Default names say what is inside:
    `<first checkpoint stem>[-ens<models>][-tta<transforms>]`.
    """
    name = checkpoints[0].stem + (f"-ens{len(checkpoints)}" if len(checkpoints) > 1 else "") + \
        (f"-tta{len(tta)}" if len(tta) > 1 else "")
    if output is None or str(output) == "":
        return checkpoints[0].parent / name
    text = str(output)
    out = Path(text)
    if text.endswith(("/", os.sep)) or out.is_dir():
        return out / name
    if out.suffix.lower() in (".onnx", *TORCHSCRIPT_SUFFIXES):
        out = out.with_suffix("")
    return out


def _options(cfg) -> dict:
    """Validated command options, checked before any model is loaded (bad input fails fast)."""
    checkpoints = [Path(p) for p in _as_list(cfg.model)]
    if not checkpoints:
        raise UserError("model=<checkpoint.pth> is required (a list [a.pth,b.pth] exports an averaged ensemble)")
    for path in checkpoints:
        if exported_kind(path):
            raise UserError(f"{path}: is already an exported model; pass the .pth checkpoint(s) it came from")
    formats = list(dict.fromkeys(str(f).lower() for f in _as_list(cfg.formats)))
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise UserError(f"formats={bad or '[]'}: choose one or both of {', '.join(FORMATS)}")
    width = int(cfg.width)
    if width <= 0 or width % model_lib.STRIDE:
        raise UserError(f"width={cfg.width}: must be a positive multiple of {model_lib.STRIDE} (e.g. 512, 672)")
    opset = int(cfg.opset)
    if "onnx" in formats and opset < MIN_OPSET:
        raise UserError(f"opset={opset}: must be at least {MIN_OPSET}")
    missing = [m for m in ("onnx", "onnxruntime") if "onnx" in formats and importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"formats=[...,onnx] needs the {' and '.join(missing)} package(s); install them or give "
                        "formats=[torchscript]")
    return {"checkpoints": checkpoints, "formats": formats, "width": width, "opset": opset,
            "tta": parse_tta(_as_list(cfg.tta) or None)}


def task_of(models: list, checkpoints: list[Path]) -> str:
    """The one task of the loaded checkpoints (their config's "task"; segmentation when unset)."""
    tasks = [(getattr(m, "config", None) or {}).get("task", EnsembleTTA.task) for m in models]
    if len(set(tasks)) > 1:
        other = next(i for i, t in enumerate(tasks) if t != tasks[0])
        raise UserError(f"model=[...]: {checkpoints[0].name} is a {tasks[0]} checkpoint but {checkpoints[other].name} "
                        f"is a {tasks[other]} one; export each task's checkpoints separately")
    if tasks[0] not in ENSEMBLES:
        raise UserError(f"{checkpoints[0]}: a task={tasks[0]} checkpoint, which export.py cannot export")
    return tasks[0]


def run(cfg) -> dict:
    """Load the checkpoints, build the ensemble, export and check every format, then write them.

    Returns {"torchscript": path, "onnx": path, "check": {format: max abs difference}}.
    """
    opts = _options(cfg)
    if cfg.num_threads:
        torch.set_num_threads(int(cfg.num_threads))
    models = model_lib.load_models(opts["checkpoints"], **{k: cfg[k] for k in model_lib.ARCH_OVERRIDES})
    ensemble = ENSEMBLES[task_of(models, opts["checkpoints"])](models, opts["tta"], batch_tta=bool(cfg.batch_tta))
    graphs = export_checked(ensemble, opts["formats"], opts["checkpoints"], opts["width"],
                            batch_size=int(cfg.batch_size), opset=opts["opset"], check=bool(cfg.check))
    result: dict = {"check": {k: meta["check"]["max_abs_diff"] for k, (_, meta) in graphs.items() if "check" in meta}}
    stem = output_stem(cfg.output, opts["checkpoints"], list(ensemble.tta))
    for kind, (artefact, meta) in graphs.items():
        path = Path(str(stem) + SUFFIXES[kind])
        write_exported(path, kind, artefact, meta)
        result[kind] = path
        check = f", max |exported - eager| = {meta['check']['max_abs_diff']:.1e}" if "check" in meta else ""
        print(f"wrote {path} ({kind}, {ensemble.task}, {len(models)} model(s) x {len(ensemble.tta)} TTA{check})")
    return result


@cli("export")
def main(cfg):
    run(cfg)


if __name__ == "__main__":
    main()

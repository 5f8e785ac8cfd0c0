"""What every inference output records about how it was made, per image, and always true.

An image's `settings` are everything that changes its outputs: the input file (path, size, mtime), the
models (sha256 and configuration), the backend each model ran on, the precision asked for, each
pass's TTA (an exported graph's built-in TTA included) and width, an int8 graph's calibration inputs, the resize factor of each pass
(which holds scale_factor, match_gsd and both GSDs), the image and model GSDs, and every output,
footprint and reading option of the config (all keys but those in `RUN_ONLY_KEYS`, so a new option
counts without anyone listing it). Their fingerprint (lib.run_folder.fingerprint) decides whether a
re-run may keep an image. What is only known once the image is done -- the precision actually used
-- is recorded beside them. The GeoTIFF tags, the run.json entry and the STAC item of an image are
all made from this one record, so they cannot disagree.

Post-processing (threshold, seed_threshold, seed_min_area, min_area) is recorded as resolved by
lib.postprocess -- the value given, else the first model's tuned one, else the default -- with
`postprocess_source` saying which it was per setting, and `instances` (on/off) whether footprints
came from seeds + watershed on the instance maps or from the mask's connected components.
"""

from __future__ import annotations

import os
from pathlib import Path

from lib.cli import VERSION
from lib.postprocess import DEFAULTS, PostProcess, resolve

# config keys that change how or where a run goes, not an image's outputs (the passes, factors,
# resolved backend and model hashes stand for the keys that do: width/widths/tta/flip/model/...)
RUN_ONLY_KEYS = frozenset({
    "data_dir", "model", "output_dir", "width", "widths", "tta", "flip", "transpose", "scale_factor",
    "match_gsd", "backend", "onnx_cache", "batch_size", "num_workers", "finish_workers", "num_threads", "progress",
    "debug", "overwrite", "device", "mine_empty", "output_dir_empty", "empty_threshold", "split_windows",
})


def plain(value):
    """OmegaConf containers (possibly nested) -> plain Python values."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def backend_of(model) -> str:
    """Where a model runs: onnxruntime, openvino, torchscript (an exported TorchScript file) or torch."""
    fmt = getattr(model, "format", "")
    return fmt if fmt in ("torchscript", "openvino") else "onnxruntime" if fmt == "onnx" else "torch"


def export_tta(config: dict | None) -> list[str] | None:
    """The TTA an exported graph averages inside itself (None for a checkpoint)."""
    config = config or {}
    return list(config.get("tta") or ["none"]) if config.get("exported") else None


def effective_tta(pass_tta, built_in: list[str] | None) -> list[str]:
    """The transforms a pass really averages: the engine's, composed with an export's built-in ones
    (`hflip+vflip`: the engine flips the input of a graph that averages its own vflip)."""
    pass_tta = list(pass_tta)
    if not built_in or built_in == ["none"]:
        return pass_tta
    if pass_tta == ["none"]:
        return list(built_in)
    return [f"{e}+{b}" for e in pass_tta for b in built_in]


def input_identity(path: str | os.PathLike) -> dict:
    """The input file as the settings see it: a replaced or edited image is a different input."""
    path = Path(path).resolve()
    stat = path.stat()
    return {"path": str(path), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def postprocess_of(cfg, meta: dict | None) -> tuple[PostProcess, dict[str, str]]:
    """The resolved post-processing settings and, per setting, where it came from: given | tuned | default."""
    meta = meta if isinstance(meta, dict) else None
    tuned = (meta or {}).get("postprocess") or {}
    source = {k: "given" if cfg[k] is not None else "tuned" if tuned.get(k) is not None else "default"
              for k in DEFAULTS}
    return resolve(cfg, meta), source


_WITH_POSTPROCESS: dict = {}  # (id(cfg), values) -> (cfg, copy): one copy per run, not one per image


def with_postprocess(cfg, values: dict):
    """A copy of `cfg` whose post-processing keys hold `values` (resolved), for the writers that read them
    (the same copy for every image with the same values: copying a run's whole config costs ~15 ms)."""
    key = (id(cfg), tuple(float(values[k]) for k in DEFAULTS))
    held = _WITH_POSTPROCESS.get(key)
    if held is None or held[0] is not cfg:
        out = cfg.copy()
        for name in DEFAULTS:
            out[name] = float(values[name])
        _WITH_POSTPROCESS.clear()  # a new run's config: the old copies are not needed
        held = _WITH_POSTPROCESS[key] = (cfg, out)
    return held[1]


def instances_on(eng) -> bool:
    """Whether the engine decodes the instance maps (border, contact)."""
    return bool(getattr(eng.decoder, "instance", False))


def image_settings(cfg, eng, models: list[dict], image_path, image_gsd: float | None) -> dict:
    """Everything that changes one image's outputs (see the module docstring); JSON-ready."""
    options = {k: plain(cfg[k]) for k in cfg if k not in RUN_ONLY_KEYS}
    options["overlap"] = eng.overlap  # null in the config means tile_size / 4
    post, source = postprocess_of(cfg, models[0].get("meta") if models else None)
    options.update(post.as_dict(), postprocess_source=source, instances="on" if instances_on(eng) else "off")
    # an int8 graph's outputs depend on the inputs it was calibrated on (lib.int8)
    calibrated = [(m.get("quantization") or {}).get("calibration_digest") for m in models]
    if any(calibrated):
        options["int8_calibration"] = calibrated
    return {
        **options,
        "toolkit_version": VERSION,
        "input": input_identity(image_path),
        "models": [{"sha256": m["sha256"], "config": m["config"]} for m in models],
        "backend": [m["backend"] for m in models],
        "tta": [effective_tta(p.tta, models[p.model]["export_tta"]) for p in eng.passes],
        "widths": [p.width for p in eng.passes],
        "factor": [round(eng.factor(p, image_gsd), 6) for p in eng.passes],
        "image_gsd": round(image_gsd, 6) if image_gsd else None,
        "model_gsd": [m["model_gsd"] for m in models],
    }


def _unique(values) -> list:
    return list(dict.fromkeys(values))


def geotiff_tags(record: dict) -> dict:
    """Short provenance tags stored inside an image's output rasters, from its run.json record."""
    s = record["settings"]
    return {
        "BUILDINGS_TOOLKIT_VERSION": s["toolkit_version"],
        "BUILDINGS_MODELS": ";".join(f"{Path(m['path']).name}:sha256={m['sha256'][:16]}" for m in record["models"]),
        "BUILDINGS_BACKEND": ",".join(_unique(s["backend"])),
        "BUILDINGS_PRECISION": record["precision"],
        "BUILDINGS_TTA": ",".join(_unique(t for tta in s["tta"] for t in tta)),
        "BUILDINGS_WIDTHS": ",".join(str(w) for w in _unique(s["widths"])),
        "BUILDINGS_FACTOR": ",".join(f"{f:.6g}" for f in s["factor"]),
        "BUILDINGS_IMAGE_GSD": s["image_gsd"] if s["image_gsd"] else "unknown",
        "BUILDINGS_MODEL_GSD": ",".join(str(g) if g else "unknown" for g in s["model_gsd"]),
        "BUILDINGS_TILE_SIZE": s["tile_size"], "BUILDINGS_OVERLAP": s["overlap"],
        "BUILDINGS_THRESHOLD": s["threshold"], "BUILDINGS_MIN_AREA": s["min_area"],
        "BUILDINGS_INSTANCES": s["instances"], "BUILDINGS_SEED_THRESHOLD": s["seed_threshold"],
        "BUILDINGS_SEED_MIN_AREA": s["seed_min_area"],
        "BUILDINGS_POSTPROCESS_SOURCE": ",".join(f"{k}={v}" for k, v in s["postprocess_source"].items()),
        "BUILDINGS_SETTINGS_FINGERPRINT": record["fingerprint"],
    }


def stac_properties(record: dict) -> dict:
    """The provenance an image's STAC item carries (as `buildings:*` properties)."""
    s = record["settings"]
    return {
        "toolkit_version": s["toolkit_version"],
        "models": [{"name": Path(m["path"]).name, "sha256": m["sha256"]} for m in record["models"]],
        "backend": s["backend"], "precision": record["precision"], "tta": s["tta"], "widths": s["widths"],
        "factor": s["factor"], "image_gsd": s["image_gsd"], "model_gsd": s["model_gsd"],
        "threshold": s["threshold"], "tile_size": s["tile_size"], "overlap": s["overlap"],
        "postprocess": {k: s[k] for k in DEFAULTS}, "postprocess_source": s["postprocess_source"],
        "instances": s["instances"], "fingerprint": record["fingerprint"],
    }


def describe_scale(eng, models: list[dict], gsd: float | None) -> str:
    """How the first pass's resize factor came about, for the per-image log line."""
    p = eng.passes[0]
    factors = ", ".join(f"{eng.factor(q, gsd):.4g}" for q in eng.passes)
    base = f"{p.width}/{eng.tile_size}" + (f" x {eng.scale_factor:g}" if eng.scale_factor != 1 else "")
    ref, source = models[p.model]["model_gsd"], models[p.model]["model_gsd_source"]
    if eng.gsd_matched(p, gsd):
        why = f"{base} x image {gsd:.4g} / model {ref:.4g} m/px ({source})"
    elif not eng.match_gsd:
        why = f"{base}; match_gsd=false"
    elif not gsd:
        why = f"{base}; image GSD unknown"
    else:
        why = f"{base}; model GSD unknown"
    return f"factor {factors} ({why})"

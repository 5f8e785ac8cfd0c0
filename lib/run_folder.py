"""The layout of a run folder, written by inference.py and combine_images.py and read by evaluate.py.

    <run>/probabilities/<stem>.tif    uint8 building probability 0-255
    <run>/masks/<stem>.tif            0/255 building mask
    <run>/instances/<stem>.tif        border, contact probabilities 0-255 (models with the instance head only)
    <run>/footprints/<stem>.geojson   footprints in EPSG:4326 (+ .gpkg in the image CRS)
    <run>/stac/<stem>.json            STAC item of each output scene (inference), stac/catalog.json links them
    <run>/run.json                    the last run's settings, and one record per image (its own provenance)
    <run>/.run.rank<N>.json           progress of rank N of a torchrun job, merged into run.json
    <run>/.bands/<stem>/              bands of a scene split among torchrun ranks (lib.scene_bands), until merged

Every script finds these files through this module, so the layout is spelt out once.

The re-run rule (inference): every image record holds `settings` -- everything that changes that
image's outputs (input file, model hashes, backend, precision asked for, TTA, widths, resize factors,
GSDs, tiling, threshold, footprint and reading options, toolkit version) -- and their `fingerprint`.
An image is skipped only when its outputs all exist and its recorded fingerprint equals the one of
the current settings; otherwise `rerun_reason` says why it is computed again.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from lib.files import write_json
from lib.footprints import VECTOR_FORMATS

PROBABILITIES = "probabilities"
MASKS = "masks"
INSTANCES = "instances"
FOOTPRINTS = "footprints"
STAC = "stac"
RUN_FILE = "run.json"
STATUS_DONE, STATUS_FAILED = "done", "failed"
NEW = "new"  # rerun_reason of an image this folder has never seen
MAP_SUFFIX = ".tif"


def output_paths(run_dir: str | os.PathLike, stem: str, vector_format: str | None,
                 instances: bool = False) -> dict[str, Path]:
    """Every file an image gives: probability, mask, (with `instances`) border/contact maps, GeoJSON and,
    with `vector_format`, its vector copy."""
    run_dir = Path(run_dir)
    paths = {
        "probability": run_dir / PROBABILITIES / f"{stem}{MAP_SUFFIX}",
        "mask": run_dir / MASKS / f"{stem}{MAP_SUFFIX}",
        **({"instance": instance_map(run_dir, stem)} if instances else {}),
        "geojson": run_dir / FOOTPRINTS / f"{stem}.geojson",
    }
    fmt = VECTOR_FORMATS.get(str(vector_format).lower() if vector_format else "none")
    if fmt is not None and fmt[1] != ".geojson":
        paths["vector"] = run_dir / FOOTPRINTS / f"{stem}{fmt[1]}"
    return paths


def image_outputs(run_dir: str | os.PathLike, stem: str, vector_format: str | None,
                  settings: dict | None = None) -> list[Path]:
    """Every file a finished image has: rasters, footprints and its STAC item. `settings` (the image's
    record's) None: every file it may have (instance maps included)."""
    instance = settings is None or settings.get("instances") == "on"
    return [*output_paths(run_dir, stem, vector_format, instance).values(), stac_item_path(run_dir, stem)]


def instance_map(run_dir: str | os.PathLike, stem: str) -> Path:
    """An image's border/contact raster (written when the models have the instance head)."""
    return Path(run_dir) / INSTANCES / f"{stem}{MAP_SUFFIX}"


def stac_item_path(run_dir: str | os.PathLike, stem: str) -> Path:
    return Path(run_dir) / STAC / f"{stem}.json"


def stac_catalog_path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / STAC / "catalog.json"


def is_run(folder: str | os.PathLike) -> bool:
    """A run folder holds probability maps (the one output every run, and every ensemble, writes)."""
    return (Path(folder) / PROBABILITIES).is_dir()


def probability_maps(run_dir: str | os.PathLike) -> dict[str, Path]:
    """stem -> probability map of a run, in name order."""
    return {p.stem: p for p in sorted((Path(run_dir) / PROBABILITIES).glob(f"*{MAP_SUFFIX}"))}


def run_file(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / RUN_FILE


def rank_file(run_dir: str | os.PathLike, rank: int) -> Path:
    """Per-rank progress record of a multi-process run, merged into run.json when every rank is done."""
    return Path(run_dir) / f".run.rank{rank}.json"


def rank_files(run_dir: str | os.PathLike) -> list[Path]:
    return sorted(Path(run_dir).glob(".run.rank*.json"))


def read_record(path: str | os.PathLike) -> dict:
    """A run record (run.json or a rank's); {} when it is missing or unreadable (an interrupted write)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def read_run(run_dir: str | os.PathLike) -> dict:
    return read_record(run_file(run_dir))


def previous_records(run_dir: str | os.PathLike) -> dict:
    """Image records of earlier runs: run.json plus progress left by ranks of an interrupted torchrun job."""
    done = dict(read_run(run_dir).get("images", {}))
    for part in rank_files(run_dir):
        done.update(read_record(part).get("images", {}))
    return done


def write_record(path: str | os.PathLike, record: dict) -> None:
    write_json(path, record)


# --------------------------------------------------------------------------------------------------
# The re-run rule
# --------------------------------------------------------------------------------------------------

def fingerprint(settings: dict) -> str:
    """Short hash of an image's settings (key order and number formatting do not matter)."""
    text = json.dumps(settings, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def rerun_reason(record: dict | None, settings: dict, outputs: list[Path]) -> str | None:
    """None when an image is finished with exactly these settings; else why it must be computed.

    `record` is the image's entry in run.json (None: none), `outputs` every file it should have;
    `NEW` for an image never predicted into this folder.
    """
    if not record:
        return "no record of its settings in run.json" if any(p.exists() for p in outputs) else NEW
    if record.get("status") == STATUS_FAILED:
        return "it failed last time"
    missing = [p.name for p in outputs if not p.exists()]
    if missing:
        return f"{missing[0]} missing"
    if record.get("fingerprint") != fingerprint(settings):
        old = record.get("settings")
        return changes(old, settings) if isinstance(old, dict) else "made before settings were recorded"
    return None


def changes(old: dict, new: dict) -> str:
    """`threshold changed (0.5 -> 0.6), models changed`: the settings that differ, for the log."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        scalar = all(v is None or isinstance(v, (str, int, float, bool)) for v in (a, b))
        out.append(f"{key} changed ({a} -> {b})" if scalar else f"{key} changed")
    return ", ".join(out) or "settings changed"

"""The layout of a run folder, written by inference.py and combine_images.py and read by evaluate.py.

    <run>/probabilities/<stem>.tif    uint8 building probability 0-255
    <run>/masks/<stem>.tif            0/255 building mask
    <run>/footprints/<stem>.geojson   footprints in EPSG:4326 (+ .gpkg in the image CRS)
    <run>/run.json                    provenance: models, passes, threshold, and one record per image
    <run>/.run.rank<N>.json           progress of rank N of a torchrun job, merged into run.json

Every script finds these files through this module, so the layout is spelt out once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lib.files import write_json
from lib.footprints import VECTOR_FORMATS

PROBABILITIES = "probabilities"
MASKS = "masks"
FOOTPRINTS = "footprints"
RUN_FILE = "run.json"
MAP_SUFFIX = ".tif"


def output_paths(run_dir: str | os.PathLike, stem: str, vector_format: str | None) -> dict[str, Path]:
    """Every file an image gives: probability, mask, GeoJSON and, with `vector_format`, its vector copy."""
    run_dir = Path(run_dir)
    paths = {
        "probability": run_dir / PROBABILITIES / f"{stem}{MAP_SUFFIX}",
        "mask": run_dir / MASKS / f"{stem}{MAP_SUFFIX}",
        "geojson": run_dir / FOOTPRINTS / f"{stem}.geojson",
    }
    fmt = VECTOR_FORMATS.get(str(vector_format).lower() if vector_format else "none")
    if fmt is not None and fmt[1] != ".geojson":
        paths["vector"] = run_dir / FOOTPRINTS / f"{stem}{fmt[1]}"
    return paths


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


def write_record(path: str | os.PathLike, record: dict) -> None:
    write_json(path, record)

"""Where training scenes come from: a STAC catalog, a CSV index, or image/label file pairs.

Data preparation accepts the layouts the original pipeline and the usual public sets use -- an Open
Cities `train_tier_N` STAC catalog, a `train_metadata.csv` (img_uri,label_uri) index, or a folder of
images and label files matched by tile id (plain same-stem pairs or SpaceNet naming). Each becomes a
list of `Scene`s; every unreadable or missing input is a one-line `UserError` naming the file. Given a
`failures` list, a problem with one scene (missing asset or label file) goes there and the scene is
left out, so the other scenes are still prepared; problems with the catalog or index itself still stop.
Folders are searched through symlinked subfolders (each real folder once).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from lib.errors import UserError, one_line
from lib.files import walk_files

SOURCES = ("auto", "stac", "csv", "pairs")
RASTER_SUFFIXES = (".tif", ".tiff", ".jp2", ".img", ".vrt")
LABEL_SUFFIXES = (".geojson", ".json", ".gpkg", ".shp")


class DataWarning(UserWarning):
    """Input accepted with a caveat (empty labels, repaired or dropped geometries, one-scene folds, ...)."""


def warn(message: str) -> None:
    warnings.warn(message, DataWarning, stacklevel=2)


# SpaceNet-style name parts that are not part of the tile id shared by an image and its labels.
_TILE_PREFIXES = ("3band_", "8band_", "RGB-PanSharpen_", "MUL-PanSharpen_", "PS-RGB_", "PS-MS_", "MUL_", "PAN_",
                  "buildings_", "labels_")
_TILE_SUFFIXES = ("_Geo", "_labels", "-labels", "_buildings")


@dataclass(frozen=True)
class Scene:
    """One image with its label file; chips go to `<out_dir>/<collection>/<name>/`."""
    collection: str
    name: str
    image: Path
    labels: Path

    @property
    def key(self) -> str:
        return f"{self.collection}/{self.name}"


def detect_source(base_dir: Path, source: str = "auto", process_tier=1) -> tuple[str, Path]:
    """Which kind of input `base_dir` is, and the file (catalog / csv) or folder to read it from."""
    if source not in SOURCES:
        raise UserError(f"source={source}: use one of {', '.join(SOURCES)}")
    if not base_dir.exists():
        raise UserError(f"{base_dir}: base_dir does not exist")
    candidates = {
        "stac": [base_dir] if base_dir.name.endswith(".json") else
                [base_dir / "catalog.json", base_dir / f"train_tier_{process_tier}" / "catalog.json"],
        "csv": [base_dir] if base_dir.suffix == ".csv" else [base_dir / "train_metadata.csv"],
    }
    for kind in ("stac", "csv"):
        if source in (kind, "auto"):
            found = next((p for p in candidates[kind] if p.is_file()), None)
            if found:
                return kind, found
            if source == kind:
                raise UserError(f"{base_dir}: no {' or '.join(str(p) for p in candidates[kind])} for source={kind}")
    if not base_dir.is_dir():
        raise UserError(f"{base_dir}: expected a folder of images and labels, a catalog.json or a .csv index")
    return "pairs", base_dir


def stac_scenes(catalog_path: Path, failures: list[str] | None = None) -> list[Scene]:
    """Label items and the image items their `source` link points to (Open Cities layout)."""
    import pystac

    try:
        catalog = pystac.Catalog.from_file(str(catalog_path))
        items = list(catalog.get_items(recursive=True))
    except Exception as err:  # noqa: BLE001 - any failure here means unreadable input
        raise UserError(f"{catalog_path}: unreadable STAC catalog ({one_line(err)})") from None
    scenes = []
    for item in items:
        if item.get_links("source"):  # image items are reached through their label item
            _collect(failures, lambda item=item: scenes.append(_stac_scene(item, catalog, catalog_path)))
    if not scenes and not failures:
        raise UserError(f"{catalog_path}: no label items (items with a 'source' link) in this catalog")
    return sorted(scenes, key=lambda s: s.key)


def _collect(failures: list[str] | None, step) -> None:
    """Run one scene's `step`; with a `failures` list its UserError is recorded there instead of raised."""
    try:
        step()
    except UserError as err:
        if failures is None:
            raise
        failures.append(str(err))


def _stac_scene(item, catalog, catalog_path: Path) -> Scene:
    source = item.get_links("source")[0]
    item_file = item.get_self_href() or catalog_path
    labels = _asset_path(item, ("labels",), LABEL_SUFFIXES, item_file)
    try:
        image_item = source.resolve_stac_object(root=catalog).target
    except Exception as err:  # noqa: BLE001 - any failure here means unreadable input
        raise UserError(f"{item_file}: its source link {source.href} cannot be read ({one_line(err)})") from None
    image = _asset_path(image_item, ("image", "data", "visual"), RASTER_SUFFIXES,
                        image_item.get_self_href() or item_file)
    collection = item.collection_id or (item.get_parent().id if item.get_parent() else catalog.id)
    return Scene(collection, image_item.id, image, labels)


def _asset_path(item, keys: tuple[str, ...], suffixes: tuple[str, ...], item_file) -> Path:
    assets = item.assets
    asset = next((assets[k] for k in keys if k in assets), None)
    if asset is None:
        asset = next((a for a in assets.values() if Path(a.href.split("?")[0]).suffix.lower() in suffixes), None)
    if asset is None:
        raise UserError(f"{item_file}: item {item.id} has no {'/'.join(keys)} asset")
    href = asset.get_absolute_href() or asset.href
    path = Path(href.removeprefix("file://"))
    if not path.exists():
        raise UserError(f"{item_file}: asset href {asset.href} does not exist ({path}); fix the href or the file")
    return path



def csv_scenes(csv_path: Path) -> list[Scene]:
    """`img_uri,label_uri` rows (paths relative to the csv's folder), as the original pipeline read them."""
    import pandas as pd

    try:
        table = pd.read_csv(csv_path)
    except Exception as err:  # noqa: BLE001 - any failure here means unreadable input
        raise UserError(f"{csv_path}: unreadable CSV ({one_line(err)})") from None
    missing = {"img_uri", "label_uri"} - set(table.columns)
    if missing:
        raise UserError(f"{csv_path}: missing column(s) {', '.join(sorted(missing))}; expected img_uri,label_uri")
    base = csv_path.parent
    scenes = []
    for img_uri, label_uri in zip(table["img_uri"], table["label_uri"]):
        image, labels = base / str(img_uri), base / str(label_uri)
        parts = Path(str(img_uri)).parts
        collection = parts[0] if len(parts) > 1 else base.name
        scenes.append(Scene(collection, image.stem, image, labels))
    if not scenes:
        raise UserError(f"{csv_path}: the index has no rows")
    return scenes


def tile_id(stem: str) -> str:
    """Shared id of an image and its labels: `3band_X`/`RGB-PanSharpen_X` <-> `X_Geo`/`buildings_X` -> `X`."""
    for prefix in _TILE_PREFIXES:
        if stem.startswith(prefix):
            stem = stem[len(prefix):]
            break
    for suffix in _TILE_SUFFIXES:
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return stem


def pair_scenes(base_dir: Path, exclude: Path | None = None, failures: list[str] | None = None) -> list[Scene]:
    """Images matched to label files by tile id (plain same-stem pairs or SpaceNet naming)."""
    files = [p for p in walk_files(base_dir) if not p.name.startswith(".")]
    if exclude is not None:
        files = [p for p in files if exclude not in p.parents and exclude not in p.resolve().parents]
    labels: dict[str, list[Path]] = {}
    for p in files:
        if p.suffix.lower() in (".geojson", ".gpkg", ".shp"):
            labels.setdefault(tile_id(p.stem), []).append(p)
    scenes = []
    for image in sorted(p for p in files if p.suffix.lower() in RASTER_SUFFIXES):
        _collect(failures, lambda image=image: scenes.append(_pair(image, labels, base_dir)))
    if not scenes and not failures:
        raise UserError(f"{base_dir}: no images (.tif) found to pair with labels")
    return scenes


def _pair(image: Path, labels: dict[str, list[Path]], base_dir: Path) -> Scene:
    matches = labels.get(tile_id(image.stem), [])
    if not matches:
        raise UserError(f"{image}: label file missing (no .geojson/.gpkg with tile id {tile_id(image.stem)!r} "
                        f"under {base_dir})")
    if len(matches) > 1:
        raise UserError(f"{image}: several label files match it: {', '.join(str(m) for m in matches)}")
    return Scene(base_dir.resolve().name, image.stem, image, matches[0])


def find_scenes(cfg, failures: list[str] | None = None) -> list[Scene]:
    """The scenes under `cfg.base_dir` (`source`, `process_tier`); pairs never come from inside `out_dir`.

    With a `failures` list, scenes whose files are missing are reported there and left out.
    """
    base_dir = Path(cfg.base_dir)
    kind, path = detect_source(base_dir, cfg.source, cfg.process_tier)
    if kind == "stac":
        return stac_scenes(path, failures)
    if kind == "csv":
        return csv_scenes(path)
    return pair_scenes(path, exclude=Path(cfg.out_dir).resolve() if cfg.out_dir else None, failures=failures)

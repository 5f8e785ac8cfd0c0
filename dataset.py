"""Training chips: preparing them from georeferenced scenes, and serving them to training.

Data preparation (`python dataset.py base_dir=... out_dir=...`) turns scenes -- a STAC catalog laid out
like Open Cities `train_tier_1`, a `train_metadata.csv` index, or image/label file pairs (plain or
SpaceNet naming) -- into chips on disk:

    <out_dir>/<collection>/<scene>/<scale>_<index>.<jpg|png|tif>   image (RGB uint8)
    <out_dir>/<collection>/<scene>/<scale>_<index>_mask.png        0/255 building mask
    <out_dir>/<collection>/<scene>/<scale>_<index>_ignore.png      255 = nodata (only when present)
    <out_dir>/resolutions.json                                     {"<collection>/<scene>": m/px}

`mode=buildings` (the original pipeline's behaviour) writes one chip centred on every building with
`pad` pixels around it; `mode=grid` tiles the scene. Unlike the original pipeline, which burned every
footprint of the scene once per building chip (quadratic in the number of buildings), footprints are
looked up with a spatial index and burned once per chip window, so the cost is linear.

Training (`train.py`) uses `list_chips`, `split_folds`, `train_transform`/`val_transform` and
`ChipDataset`, which yields normalised tensors plus the mask, the ignore region and the chip's GSD.
"""

from __future__ import annotations

import json
import os
import random
import re
import time
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from lib.cli import cli, progress_bar
from lib.errors import UserError
from lib.files import atomic_path, write_json
from lib.model_contract import normalize

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
MASK_SUFFIX = "_mask.png"
IGNORE_SUFFIX = "_ignore.png"
RESOLUTIONS_FILE = "resolutions.json"
RASTER_SUFFIXES = (".tif", ".tiff", ".jp2", ".img", ".vrt")
LABEL_SUFFIXES = (".geojson", ".json", ".gpkg", ".shp")



class DataWarning(UserWarning):
    """Input accepted with a caveat (empty labels, repaired or dropped geometries, ...)."""


def warn(message: str) -> None:
    warnings.warn(message, DataWarning, stacklevel=2)


# ---------------------------------------------------------------------------------------------------
# Training side: chips on disk -> tensors
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Chip:
    """One training sample on disk. `mask`/`ignore` are None when absent (no mask = negative sample)."""
    image: Path
    mask: Path | None
    ignore: Path | None
    scene: str  # "<collection>/<scene>" relative to the chips root: the unit of the fold split
    gsd: float | None = None  # metres per pixel of the chip (scene GSD x chip scale), None if unknown


_SCALE_PREFIX = re.compile(r"^(\d+(?:\.\d+)?)_")


def chip_scale(name: str) -> float:
    """Scale encoded in a chip name `<scale>_<index>` (1 when the name does not follow the convention)."""
    m = _SCALE_PREFIX.match(name)
    return float(m.group(1)) if m else 1.0


def is_chip_image(path: Path) -> bool:
    name = path.name
    return (path.suffix.lower() in IMAGE_SUFFIXES and not name.startswith(".")
            and not name.endswith(MASK_SUFFIX) and not name.endswith(IGNORE_SUFFIX))


def list_chips(data_dir: str | os.PathLike) -> list[Chip]:
    """Every chip image under `data_dir` (recursively) with its mask, ignore region, scene and GSD.

    The scene is the chip's folder relative to `data_dir`; the GSD comes from `resolutions.json`
    (scene GSD times the scale in the chip name) when the folder has one.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise UserError(f"{root}: chips folder does not exist; prepare chips with `python dataset.py`")
    resolutions = {}
    if (root / RESOLUTIONS_FILE).exists():
        try:
            resolutions = json.loads((root / RESOLUTIONS_FILE).read_text())
        except json.JSONDecodeError:
            raise UserError(f"{root / RESOLUTIONS_FILE}: not valid JSON; delete it and re-run dataset.py") from None
    chips = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and is_chip_image(p)):
        stem = path.with_suffix("")
        mask = stem.parent / (stem.name + MASK_SUFFIX)
        ignore = stem.parent / (stem.name + IGNORE_SUFFIX)
        scene = path.parent.relative_to(root).as_posix()
        scene_gsd = resolutions.get(scene)
        gsd = float(scene_gsd) * chip_scale(path.name) if scene_gsd else None
        chips.append(Chip(path, mask if mask.exists() else None, ignore if ignore.exists() else None, scene, gsd))
    return chips


def split_folds(chips: list[Chip], fold: int, num_folds: int = 7, by: str = "scene",
                seed: int = 0) -> tuple[list[Chip], list[Chip]]:
    """Split chips into (train, val) for fold `fold` of `num_folds`.

    `by="scene"` (default) keeps every scene whole, so neighbouring, overlapping chips never sit on
    both sides: scenes are shuffled with `seed` and dealt, largest first, to the fold with the fewest
    chips. With fewer scenes than folds the higher folds are empty (fold 0 always has a scene).
    With a single scene it falls back to the original pipeline's chip-level KFold, with a warning.
    `by="chip"` is that chip-level KFold (shuffled with `seed`).
    """
    if not 0 <= fold < num_folds:
        raise UserError(f"fold={fold}: must be in 0..{num_folds - 1} (num_folds={num_folds})")
    if by not in ("scene", "chip"):
        raise UserError(f"split_by={by}: use 'scene' or 'chip'")
    scenes = sorted({c.scene for c in chips})
    if by == "scene" and len(scenes) < 2:
        if chips:
            warn(f"all {len(chips)} chips come from one scene ({scenes[0]!r}); splitting folds by chip, "
                 "so validation chips may overlap training chips")
        by = "chip"
    if by == "chip":
        order = list(range(len(chips)))
        random.Random(seed).shuffle(order)
        val_idx = {i for k, i in enumerate(order) if k % num_folds == fold}
        return ([c for i, c in enumerate(chips) if i not in val_idx], [c for i, c in enumerate(chips) if i in val_idx])
    counts = {s: 0 for s in scenes}
    for c in chips:
        counts[c.scene] += 1
    random.Random(seed).shuffle(scenes)
    scenes.sort(key=lambda s: -counts[s])  # stable: ties keep the shuffled order
    load = [0] * num_folds
    fold_of = {}
    for s in scenes:
        k = min(range(num_folds), key=lambda i: (load[i], i))
        fold_of[s] = k
        load[k] += counts[s]
    return [c for c in chips if fold_of[c.scene] != fold], [c for c in chips if fold_of[c.scene] == fold]


def train_transform(width: int, level: str = "seed", transpose: bool = False):
    """The original pipeline's augmentations, in albumentations 2.x names.

    Pad/crop at 1.5 x `width`, flips, coarse dropout, shift-scale-rotate (`Affine`), grid and optical
    distortion, RGB shift, blur, motion blur, and a final centre crop to `width`. `level="light"` keeps
    flips, a mild affine and colour jitter only (faster learning on tiny CPU budgets). Masks and the
    ignore region move with the image: the transform must be called with `mask=` and `valid=`
    (255 = imagery), whose fill of 0 makes padded or rotated-in borders ignored, never "background".
    """
    import albumentations as A

    big = round(width * 1.5)
    border = {"border_mode": cv2.BORDER_CONSTANT, "fill": 0, "fill_mask": 0}
    ops = [
        A.PadIfNeeded(min_height=big, min_width=big, **border),
        A.RandomCrop(height=big, width=big),
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
    ]
    if transpose:
        ops.append(A.Transpose(p=0.5))
    if level == "seed":
        ops += [
            A.CoarseDropout(num_holes_range=(1, 8), hole_height_range=(0.03, 0.1), hole_width_range=(0.03, 0.1),
                            fill=0, p=0.3),
            A.Affine(scale=(0.75, 1.25), translate_percent=(-0.1, 0.1), rotate=(-45, 45), p=0.7, **border),
            A.GridDistortion(p=0.2, **border),
            A.OpticalDistortion(distort_limit=(-0.3, 0.3), p=0.2, **border),
            A.RGBShift(r_shift_limit=20, g_shift_limit=20, b_shift_limit=20, p=0.3),
            A.Blur(blur_limit=(3, 5), p=0.1),
            A.MotionBlur(blur_limit=(3, 5), p=0.1),
        ]
    elif level == "light":
        ops += [
            A.Affine(scale=(0.9, 1.1), rotate=(-15, 15), p=0.5, **border),
            A.RGBShift(r_shift_limit=10, g_shift_limit=10, b_shift_limit=10, p=0.3),
        ]
    else:
        raise UserError(f"augment={level}: use 'seed' or 'light'")
    ops.append(A.CenterCrop(height=width, width=width))
    return A.Compose(ops, additional_targets={"valid": "mask"})


def val_transform(width: int):
    """Centre `width` x `width` crop (padded with ignored pixels when the chip is smaller)."""
    import albumentations as A

    return A.Compose([
        A.PadIfNeeded(min_height=width, min_width=width, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0),
        A.CenterCrop(height=width, width=width),
    ], additional_targets={"valid": "mask"})


def read_chip_image(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(RGB uint8 [H, W, 3], valid bool [H, W]) for a chip image; GeoTIFF alpha/nodata -> invalid."""
    if path.suffix.lower() in (".tif", ".tiff"):
        from lib.geo_io import check_readable, open_raster, read_window

        with open_raster(path) as ds:
            check_readable(ds, path)
            return read_window(ds)
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise UserError(f"{path}: not a readable image; delete it and re-run dataset.py")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB), np.ones(img.shape[:2], dtype=bool)


def read_gray(path: Path, shape: tuple[int, int]) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise UserError(f"{path}: not a readable mask; delete it and re-run dataset.py")
    if img.ndim == 3:
        img = img[..., 0]
    if img.shape != shape:
        raise UserError(f"{path}: mask is {img.shape[1]}x{img.shape[0]} but its image is {shape[1]}x{shape[0]}")
    if img.dtype != np.uint8:
        img = np.clip(img, 0, 255).astype(np.uint8)
    return img


class ChipDataset:
    """Map-style dataset of chips for `torch.utils.data.DataLoader`.

    Each item is a dict: "image" float32 [3, H, W] (ImageNet-normalised), "mask" float32 [H, W] in 0..1
    (soft masks kept soft), "ignore" float32 [H, W] (1 = nodata / padding), "has_building" float32
    scalar, "gsd" float32 scalar (m/px after rescaling, NaN unknown), "path" str.
    With `ref_scale` (m/px), chips whose GSD is known are first resized to that GSD, so a model sees
    buildings at one size whatever the source resolution.
    """
    def __init__(self, chips: list[Chip], transform=None, ref_scale: float | None = None):
        self.chips = list(chips)
        self.transform = transform
        self.ref_scale = float(ref_scale) if ref_scale else None

    def __len__(self) -> int:
        return len(self.chips)

    def load(self, i: int) -> dict:
        """Raw arrays of chip `i` (uint8 image, mask 0..255, valid 0/255) after GSD rescaling."""
        chip = self.chips[i]
        image, valid = read_chip_image(chip.image)
        shape = image.shape[:2]
        mask = read_gray(chip.mask, shape) if chip.mask else np.zeros(shape, np.uint8)
        valid = valid.astype(np.uint8) * 255
        if chip.ignore:
            valid[read_gray(chip.ignore, shape) > 127] = 0
        gsd = chip.gsd
        if self.ref_scale and gsd:
            factor = gsd / self.ref_scale
            if abs(factor - 1) > 1e-3:
                size = (max(1, round(shape[1] * factor)), max(1, round(shape[0] * factor)))
                image = cv2.resize(image, size, interpolation=cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR)
                mask = cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST)
                valid = cv2.resize(valid, size, interpolation=cv2.INTER_NEAREST)
            gsd = self.ref_scale
        return {"image": image, "mask": mask, "valid": valid, "gsd": gsd, "path": str(chip.image)}

    def __getitem__(self, i: int) -> dict:
        import torch

        raw = self.load(i)
        image, mask, valid = raw["image"], raw["mask"], raw["valid"]
        if self.transform is not None:
            out = self.transform(image=image, mask=mask, valid=valid)
            image, mask, valid = out["image"], out["mask"], out["valid"]
        x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None]
        ignore = valid < 128
        mask = mask.astype(np.float32) / 255.0
        mask[ignore] = 0.0
        return {
            "image": normalize(x)[0].float().contiguous(),
            "mask": torch.from_numpy(mask),
            "ignore": torch.from_numpy(ignore.astype(np.float32)),
            "has_building": torch.tensor(float((mask >= 0.5).any()), dtype=torch.float32),
            "gsd": torch.tensor(raw["gsd"] if raw["gsd"] else float("nan"), dtype=torch.float32),
            "path": raw["path"],
        }


def demo_chips_dir() -> Path:
    """Chips of the built-in demo scene, prepared with default settings on first use."""
    from lib.demo_scene import ensure_demo_scene

    root = ensure_demo_scene()
    chips = root / "chips"
    if not (chips / ".complete").exists():
        run(default_config(progress=False))  # no base_dir: the demo, into <demo>/chips
        (chips / ".complete").write_text("prepared with default dataset.py settings\n")
    return chips


# ---------------------------------------------------------------------------------------------------
# Data preparation: scenes -> chips on disk
# ---------------------------------------------------------------------------------------------------

SOURCES = ("auto", "stac", "csv", "pairs")
MODES = ("buildings", "grid")
IMAGE_FORMATS = ("jpg", "png", "tif")
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


@dataclass
class ScenePlan:
    """A validated scene, its footprints in the image CRS, and the chip windows to write."""
    scene: Scene
    geoms: np.ndarray  # shapely geometries in the image CRS
    stretch: np.ndarray | None
    zero_is_nodata: bool
    gsd: float | None
    chips: list[tuple] = field(default_factory=list)  # (name, col_off, row_off, width, height, scale)


def default_config(**overrides):
    """`config/dataset.yaml` as a plain OmegaConf object (usable inside another Hydra app)."""
    from omegaconf import OmegaConf

    from lib.cli import CONFIG_DIR

    cfg = OmegaConf.load(CONFIG_DIR / "dataset.yaml")
    for key in ("defaults", "hydra"):
        cfg.pop(key, None)
    return OmegaConf.merge(cfg, overrides)


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


def stac_scenes(catalog_path: Path) -> list[Scene]:
    """Label items and the image items their `source` link points to (Open Cities layout)."""
    import pystac

    try:
        catalog = pystac.Catalog.from_file(str(catalog_path))
        items = list(catalog.get_items(recursive=True))
    except Exception as err:  # noqa: BLE001 - any failure here means unreadable input
        raise UserError(f"{catalog_path}: unreadable STAC catalog ({_first_line(err)})") from None
    scenes = []
    for item in items:
        sources = item.get_links("source")
        if not sources:
            continue  # an image item; reached through its label item
        item_file = item.get_self_href() or catalog_path
        labels = _asset_path(item, ("labels",), LABEL_SUFFIXES, item_file)
        try:
            image_item = sources[0].resolve_stac_object(root=catalog).target
        except Exception as err:  # noqa: BLE001 - any failure here means unreadable input
            raise UserError(f"{item_file}: its source link {sources[0].href} cannot be read "
                            f"({_first_line(err)})") from None
        image = _asset_path(image_item, ("image", "data", "visual"), RASTER_SUFFIXES,
                            image_item.get_self_href() or item_file)
        collection = item.collection_id or (item.get_parent().id if item.get_parent() else catalog.id)
        scenes.append(Scene(collection, image_item.id, image, labels))
    if not scenes:
        raise UserError(f"{catalog_path}: no label items (items with a 'source' link) in this catalog")
    return sorted(scenes, key=lambda s: s.key)


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


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def csv_scenes(csv_path: Path) -> list[Scene]:
    """`img_uri,label_uri` rows (paths relative to the csv's folder), as the original pipeline read them."""
    import pandas as pd

    try:
        table = pd.read_csv(csv_path)
    except Exception as err:  # noqa: BLE001 - any failure here means unreadable input
        raise UserError(f"{csv_path}: unreadable CSV ({_first_line(err)})") from None
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


def pair_scenes(base_dir: Path, exclude: Path | None = None) -> list[Scene]:
    """Images matched to label files by tile id (plain same-stem pairs or SpaceNet naming)."""
    files = [p for p in base_dir.rglob("*") if p.is_file() and not p.name.startswith(".")]
    if exclude is not None:
        files = [p for p in files if exclude not in p.parents]
    labels: dict[str, list[Path]] = {}
    for p in files:
        if p.suffix.lower() in (".geojson", ".gpkg", ".shp"):
            labels.setdefault(tile_id(p.stem), []).append(p)
    scenes = []
    for image in sorted(p for p in files if p.suffix.lower() in RASTER_SUFFIXES):
        matches = labels.get(tile_id(image.stem), [])
        if not matches:
            raise UserError(f"{image}: label file missing (no .geojson/.gpkg with tile id {tile_id(image.stem)!r} "
                            f"under {base_dir})")
        if len(matches) > 1:
            raise UserError(f"{image}: several label files match it: {', '.join(str(m) for m in matches)}")
        scenes.append(Scene(base_dir.resolve().name, image.stem, image, matches[0]))
    if not scenes:
        raise UserError(f"{base_dir}: no images (.tif) found to pair with labels")
    return scenes


def find_scenes(cfg) -> list[Scene]:
    base_dir = Path(cfg.base_dir)
    kind, path = detect_source(base_dir, cfg.source, cfg.process_tier)
    if kind == "stac":
        return stac_scenes(path)
    if kind == "csv":
        return csv_scenes(path)
    return pair_scenes(path, exclude=Path(cfg.out_dir).resolve() if cfg.out_dir else None)


# --- planning: validate every scene and decide every chip window before writing anything ------------


def _scales(cfg) -> list[float]:
    from omegaconf import ListConfig

    values = list(cfg.scale) if isinstance(cfg.scale, (list, tuple, ListConfig)) else [cfg.scale]
    scales = [float(s) for s in values]
    if not scales or any(s <= 0 for s in scales):
        raise UserError(f"scale={cfg.scale}: must be positive (1 = native, 2 = half resolution, 0.5 = double)")
    return scales


def _scene_plan(scene: Scene, cfg, scales: list[float]) -> ScenePlan:
    import shapely
    from rasterio.enums import Resampling

    from lib.geo_io import (
        check_readable,
        load_footprints_report,
        open_raster,
        raster_gsd,
        resolve_zero_is_nodata,
        stretch_range,
    )

    with open_raster(scene.image) as ds:
        check_readable(ds, scene.image)
        try:  # a decimated read touches every block, so truncated files fail here, not mid-run
            ds.read(1, out_shape=(min(ds.height, 256), min(ds.width, 256)), resampling=Resampling.nearest)
        except Exception as err:  # noqa: BLE001 - any failure here means unreadable input
            raise UserError(f"{scene.image}: corrupt or truncated raster ({_first_line(err)})") from None
        if ds.crs is None or ds.transform.is_identity:
            raise UserError(f"{scene.image}: image has no CRS/georeferencing, so its labels cannot be placed; "
                            "use a GeoTIFF with a CRS")
        gdf, report = load_footprints_report(scene.labels, ds.crs)
        if report["repaired"]:
            warn(f"{scene.labels}: repaired {report['repaired']} invalid geometr{'y' if report['repaired'] == 1 else 'ies'}")
        if report["dropped"]:
            warn(f"{scene.labels}: dropped {report['dropped']} empty, zero-area or non-polygon geometr"
                 f"{'y' if report['dropped'] == 1 else 'ies'}")
        geoms = np.asarray(gdf.geometry.values, dtype=object)
        # Degenerate rings (collinear points) survive reprojection with a rounding-error area; anything
        # under 1 % of a pixel is not a building at this resolution.
        tiny = shapely.area(geoms) < 0.01 * abs(ds.transform.a * ds.transform.e - ds.transform.b * ds.transform.d)
        if tiny.any():
            warn(f"{scene.labels}: dropped {int(tiny.sum())} zero-area geometr{'y' if tiny.sum() == 1 else 'ies'}")
            geoms = geoms[~tiny]
        bounds = shapely.box(*ds.bounds)
        if len(geoms) and not shapely.intersects(geoms, bounds).any():
            raise UserError(f"{scene.labels}: no footprint overlaps the image {scene.image} "
                            "(wrong label file or CRS?)")
        stretch = stretch_range(ds, _rgb_bands(ds), cfg.stretch, *cfg.stretch_percentiles,
                                value_range=tuple(cfg.stretch_range) if cfg.stretch_range else None)
        plan = ScenePlan(scene, geoms, stretch, resolve_zero_is_nodata(cfg.zero_is_nodata, ds), raster_gsd(ds))
        if not len(geoms):
            warn(f"{scene.labels}: no building footprints; {scene.key} yields negative chips only")
        for scale in scales:
            if cfg.mode == "buildings" and len(geoms):
                plan.chips += _building_windows(geoms, ds, scale, cfg.pad, cfg.crop1024)
            else:
                plan.chips += _grid_windows(geoms, ds, scale, cfg, scene.key)
    return plan


def _rgb_bands(ds) -> list[int]:
    from lib.geo_io import band_layout

    return band_layout(ds)[0]


def _building_windows(geoms, ds, scale: float, pad: int, crop1024: bool) -> list[tuple]:
    """One window per building: its bounding box plus `pad` chip pixels on each side (vectorised)."""
    import shapely

    b = shapely.bounds(geoms)  # minx, miny, maxx, maxy in the image CRS
    inv = ~ds.transform  # applied by hand: Affine works on scalars, these are arrays

    def to_pixels(x, y):
        return inv.a * x + inv.b * y + inv.c, inv.d * x + inv.e * y + inv.f

    c_a, r_a = to_pixels(b[:, 0], b[:, 3])
    c_b, r_b = to_pixels(b[:, 2], b[:, 1])
    c0, c1 = np.minimum(c_a, c_b), np.maximum(c_a, c_b)
    r0, r1 = np.minimum(r_a, r_b), np.maximum(r_a, r_b)
    inside = (c1 > 0) & (c0 < ds.width) & (r1 > 0) & (r0 < ds.height)
    p = round(pad * scale)
    col0, col1 = np.floor(c0).astype(int) - p, np.ceil(c1).astype(int) + p
    row0, row1 = np.floor(r0).astype(int) - p, np.ceil(r1).astype(int) + p
    if crop1024:  # cap at 1024 chip pixels, centred on the building
        cap = round(1024 * scale)
        for lo, hi in ((col0, col1), (row0, row1)):
            big = hi - lo > cap
            centre = (lo + hi) // 2
            lo[big] = centre[big] - cap // 2
            hi[big] = lo[big] + cap
    # whole output pixels of exactly `scale` source pixels, so the chip grid is the source grid resampled
    width = np.ceil(np.ceil((col1 - col0) / scale - 1e-9) * scale - 1e-9).astype(int)
    height = np.ceil(np.ceil((row1 - row0) / scale - 1e-9) * scale - 1e-9).astype(int)
    return [(f"{scale:g}_{i}", int(col0[i]), int(row0[i]), int(width[i]), int(height[i]), scale)
            for i in np.flatnonzero(inside)]


def _grid_starts(n: int, tile: int, stride: int) -> list[int]:
    if n <= tile:
        return [0]
    starts = list(range(0, n - tile, stride))
    return starts + [n - tile] if not starts or starts[-1] != n - tile else starts


def _grid_windows(geoms, ds, scale: float, cfg, key: str) -> list[tuple]:
    """Regular tiles covering the scene; tiles without footprints are kept at `negative_ratio`."""
    import shapely
    from rasterio.windows import Window
    from rasterio.windows import bounds as window_bounds

    tile = round(cfg.tile_size * scale)
    stride = max(1, round((cfg.tile_size - cfg.overlap) * scale))
    if cfg.overlap < 0 or cfg.overlap >= cfg.tile_size:
        raise UserError(f"overlap={cfg.overlap}: must be in 0..tile_size-1 ({cfg.tile_size - 1})")
    tree = shapely.STRtree(geoms) if len(geoms) else None
    rng = np.random.default_rng([int(cfg.seed), zlib.crc32(f"{key}@{scale:g}".encode())])
    out = []
    index = 0
    for row in _grid_starts(ds.height, tile, stride):
        for col in _grid_starts(ds.width, tile, stride):
            window = Window(col, row, tile, tile)
            has = tree is not None and len(tree.query(shapely.box(*window_bounds(window, ds.transform)),
                                                       predicate="intersects")) > 0
            if has or rng.random() < cfg.negative_ratio:
                out.append((f"{scale:g}_{index}", col, row, tile, tile, scale))
            index += 1
    if not out and index and cfg.negative_ratio > 0:  # a scene always contributes at least one negative
        pick = int(rng.integers(index))
        ncols = len(_grid_starts(ds.width, tile, stride))
        row, col = _grid_starts(ds.height, tile, stride)[pick // ncols], _grid_starts(ds.width, tile, stride)[pick % ncols]
        out.append((f"{scale:g}_{pick}", col, row, tile, tile, scale))
    return out


# --- writing chips -----------------------------------------------------------------------------------

_WORKER: dict = {}


def _init_worker(plans: list[ScenePlan], opts: dict) -> None:
    cv2.setNumThreads(1)
    _WORKER.clear()
    _WORKER.update(plans=plans, opts=opts, datasets={}, trees={})


def _process_batch(batch: tuple[int, list[tuple]]) -> dict:
    """Write the chips of one batch (neighbouring chips of one scene); returns counts.

    When the chips overlap (dense buildings), the batch's bounding window is read and its footprints
    rasterised once, and every chip is a slice of it; sparse chips are read one by one. Both give the
    same pixels: the grids are aligned.
    """
    from rasterio.windows import Window

    from lib.geo_io import open_raster, read_window

    started = time.process_time()
    plan_idx, specs = batch
    plan = _WORKER["plans"][plan_idx]
    opts = _WORKER["opts"]
    if plan_idx not in _WORKER["datasets"]:
        _WORKER["datasets"][plan_idx] = open_raster(plan.scene.image)
        _WORKER["trees"][plan_idx] = ChipMasks(plan.geoms, opts["all_touched"])
    ds, masks = _WORKER["datasets"][plan_idx], _WORKER["trees"][plan_idx]
    folder = Path(opts["out_dir"]) / plan.scene.collection / plan.scene.name
    ext = opts["image_format"]
    todo = [s for s in specs if not ((folder / f"{s[0]}.{ext}").exists() and (folder / f"{s[0]}{MASK_SUFFIX}").exists())]
    counts = {"written": 0, "skipped": len(specs) - len(todo), "positive": 0, "cpu_s": 0.0}
    if not todo:
        return counts
    c0, r0 = min(s[1] for s in todo), min(s[2] for s in todo)
    c1, r1 = max(s[1] + s[3] for s in todo), max(s[2] + s[4] for s in todo)
    shared = len(todo) > 1 and (c1 - c0) * (r1 - r0) <= sum(s[3] * s[4] for s in todo)
    if shared:
        union = Window(c0, r0, c1 - c0, r1 - r0)
        rgb_all, valid_all = read_window(ds, union, plan.stretch, plan.zero_is_nodata)
        mask_all = masks.burn(ds, union, 1.0) if all(s[5] == 1 for s in todo) else None
    for name, col, row, width, height, scale in todo:
        window = Window(col, row, width, height)
        if shared:
            rows, cols = slice(row - r0, row - r0 + height), slice(col - c0, col - c0 + width)
            rgb, valid = rgb_all[rows, cols], valid_all[rows, cols]
            mask = mask_all[rows, cols].copy() if mask_all is not None else None
        else:
            rgb, valid = read_window(ds, window, plan.stretch, plan.zero_is_nodata)
            mask = None
        positive = _write_chip(ds, masks, window, scale, rgb, valid, mask, folder / name, opts)
        counts["written"] += 1
        counts["positive"] += positive
    counts["cpu_s"] = time.process_time() - started
    return counts


class ChipMasks:
    """Burns the footprints that intersect a window (found with an STRtree) onto that window's grid."""
    def __init__(self, geoms: np.ndarray, all_touched: bool):
        import shapely

        self.geoms = geoms
        self.all_touched = all_touched
        self.tree = shapely.STRtree(geoms) if len(geoms) else None

    def burn(self, ds, window, scale: float = 1.0) -> np.ndarray:
        """uint8 0/1 mask of `window` resampled by 1/scale (rasterised directly on the output grid)."""
        import shapely
        from affine import Affine
        from rasterio.windows import bounds as window_bounds

        from lib.geo_io import rasterize_footprints

        out_w, out_h = max(1, round(window.width / scale)), max(1, round(window.height / scale))
        transform = ds.window_transform(window) * Affine.scale(window.width / out_w, window.height / out_h)
        geoms = []
        if self.tree is not None:
            hits = self.tree.query(shapely.box(*window_bounds(window, ds.transform)), predicate="intersects")
            geoms = self.geoms[np.sort(hits)]
        return rasterize_footprints(geoms, (out_h, out_w), transform, all_touched=self.all_touched)


def _write_chip(ds, masks: ChipMasks, window, scale: float, rgb: np.ndarray, valid: np.ndarray,
                mask: np.ndarray | None, stem: Path, opts: dict) -> bool:
    """Resample one chip to 1/scale, burn its mask if not given, and write it; True if it has buildings.

    The image is written last: its presence marks a complete chip, which is what resuming checks.
    """
    from affine import Affine

    from lib.geo_io import write_raster

    width, height = int(window.width), int(window.height)
    out_w, out_h = max(1, round(width / scale)), max(1, round(height / scale))
    if (out_w, out_h) != (width, height):
        interp = cv2.INTER_AREA if scale > 1 else cv2.INTER_LINEAR
        rgb = cv2.resize(rgb, (out_w, out_h), interpolation=interp)
        valid = cv2.resize(valid.astype(np.uint8), (out_w, out_h), interpolation=cv2.INTER_NEAREST) > 0
    if mask is None:
        mask = masks.burn(ds, window, scale)
    mask[~valid] = 0  # nodata is never "building"; the ignore file tells training to skip it
    stem.parent.mkdir(parents=True, exist_ok=True)
    _imwrite(stem.with_name(stem.name + MASK_SUFFIX), mask * 255)
    ignore_path = stem.with_name(stem.name + IGNORE_SUFFIX)
    if not valid.all():
        _imwrite(ignore_path, (~valid).astype(np.uint8) * 255)
    elif ignore_path.exists():
        ignore_path.unlink()
    image_path = stem.with_name(f"{stem.name}.{opts['image_format']}")
    if opts["image_format"] == "tif":
        transform = ds.window_transform(window) * Affine.scale(width / out_w, height / out_h)
        profile = {"driver": "GTiff", "crs": ds.crs, "transform": transform, "compress": "deflate",
                   "photometric": "RGB"}
        write_raster(image_path, np.moveaxis(rgb, -1, 0), profile)
    else:
        _imwrite(image_path, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), opts.get("jpeg_quality", 95))
    return bool(mask.any())


def _imwrite(path: Path, array: np.ndarray, jpeg_quality: int = 95) -> None:
    params = [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)] if path.suffix == ".jpg" else []
    with atomic_path(path) as tmp:
        if not cv2.imwrite(str(tmp), array, params):
            raise UserError(f"{path}: could not write the chip (disk full or folder not writable?)")


def _batches(plans: list[ScenePlan], cfg) -> list[tuple[int, list[tuple]]]:
    """All chips, optionally shuffled and capped at `max_samples`, grouped into batches of neighbours.

    Chips are ordered along 512-pixel strips of their scene so that a batch covers a compact area
    (overlapping chips are then read and rasterised once per batch).
    """
    chips = [(i, spec) for i, plan in enumerate(plans) for spec in plan.chips]
    if cfg.shuffle:
        random.Random(int(cfg.seed)).shuffle(chips)
    if cfg.max_samples:
        chips = chips[: int(cfg.max_samples)]
    by_scene: dict[int, list[tuple]] = {}
    for i, spec in chips:
        by_scene.setdefault(i, []).append(spec)
    size = max(1, int(cfg.batch_chips))
    out = []
    for i, specs in by_scene.items():
        specs.sort(key=lambda s: (s[5], (s[2] + s[4] // 2) // 512, s[1] + s[3] // 2))
        out += [(i, specs[k:k + size]) for k in range(0, len(specs), size)]
    return out


def _validate(cfg) -> None:
    if cfg.mode not in MODES:
        raise UserError(f"mode={cfg.mode}: use one of {', '.join(MODES)}")
    if cfg.image_format not in IMAGE_FORMATS:
        raise UserError(f"image_format={cfg.image_format}: use one of {', '.join(IMAGE_FORMATS)}")
    if cfg.mode == "grid" and int(cfg.tile_size) < 1:
        raise UserError(f"tile_size={cfg.tile_size}: must be a positive number of pixels")


def run(cfg) -> dict:
    """Prepare chips as configured; returns counts and the output folder.

    Every scene is validated and planned before the first chip is written, so bad input stops the run
    with nothing written. Chips that already exist are skipped (resume after an interruption).
    """
    _validate(cfg)
    if cfg.base_dir in (None, ""):
        from lib.demo_scene import ensure_demo_scene

        base_dir = ensure_demo_scene()
        out_dir = Path(cfg.out_dir) if cfg.out_dir else base_dir / "chips"
        cfg = default_config(**{**_plain(cfg), "base_dir": str(base_dir), "out_dir": str(out_dir)})
    if not cfg.out_dir:
        raise UserError("out_dir is not set; add out_dir=<folder for the chips>")
    out_dir = Path(cfg.out_dir)
    scales = _scales(cfg)
    scenes = find_scenes(cfg)
    plans = [_scene_plan(scene, cfg, scales) for scene in scenes]
    batches = _batches(plans, cfg)
    total = sum(len(specs) for _, specs in batches)
    _update_resolutions(out_dir, {p.scene.key: p.gsd for p in plans if p.gsd})
    opts = {"out_dir": str(out_dir), "image_format": cfg.image_format, "all_touched": bool(cfg.all_touched),
            "jpeg_quality": int(cfg.jpeg_quality)}
    counts = {"written": 0, "skipped": 0, "positive": 0, "cpu_s": 0.0}
    workers = min(int(cfg.num_workers or 0), len(batches))
    with progress_bar(total=total, unit="chip", desc="chips", disable=not cfg.progress) as bar:
        for result in _map(batches, plans, opts, workers):
            for k in counts:
                counts[k] += result[k]
            bar.update(result["written"] + result["skipped"])
    return {"out_dir": out_dir, "scenes": len(plans), "chips": total, **counts}


def _map(batches, plans, opts, workers: int):
    """Batches in worker processes (`num_workers` > 1) or inline; results as they complete."""
    if workers <= 1:
        _init_worker(plans, opts)
        try:
            yield from map(_process_batch, batches)
        finally:
            _close_worker()
        return
    import multiprocessing as mp

    # forkserver: workers start from a clean process, never from a copy of this one with OpenCV or GDAL
    # threads holding locks (forking those deadlocks); the server preloads the libraries once so each
    # worker starts in milliseconds. Plans are pickled to each worker once.
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["dataset", "geo_io", "rasterio", "shapely"])
    else:
        ctx = mp.get_context("spawn")
    import dataset as this  # by module name, so workers resolve the functions even when run as a script

    # Contiguous runs of neighbouring batches per worker keep each process's GDAL block cache useful.
    chunk = max(1, len(batches) // (workers * 8))
    with ctx.Pool(workers, initializer=this._init_worker, initargs=(plans, opts)) as pool:
        yield from pool.imap_unordered(this._process_batch, batches, chunksize=chunk)


def _close_worker() -> None:
    for ds in _WORKER.get("datasets", {}).values():
        ds.close()
    _WORKER.clear()


def _update_resolutions(out_dir: Path, gsds: dict) -> None:
    path = out_dir / RESOLUTIONS_FILE
    current = {}
    if path.exists():
        try:
            current = json.loads(path.read_text())
        except json.JSONDecodeError:
            current = {}
    merged = {**current, **{k: round(float(v), 6) for k, v in gsds.items()}}
    if merged != current:
        write_json(path, dict(sorted(merged.items())))


def _plain(cfg) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)


def _format_warning(message, category, filename, lineno, line=None):
    return f"warning: {message}\n" if issubclass(category, DataWarning) else _default_format(
        message, category, filename, lineno, line)


_default_format = warnings.formatwarning


@cli("dataset")
def main(cfg) -> None:
    warnings.formatwarning = _format_warning
    if cfg.base_dir in (None, ""):
        print("no base_dir given: using the built-in demo scene (generated on first use)")
    summary = run(cfg)
    print(f"{summary['written']} chips written ({summary['positive']} with buildings), {summary['skipped']} "
          f"already there, from {summary['scenes']} scene(s) -> {summary['out_dir']}")


if __name__ == "__main__":
    main()

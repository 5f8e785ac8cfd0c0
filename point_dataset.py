"""Data for the point task (`task=points`): prepared scenes on disk, their split, and training chips.

Preparation (`python dataset.py task=points base_dir=<xView3 scenes> labels=<labels.csv> out_dir=<dir>`,
or `image=<GeoTIFF> points=<GeoJSON/GPKG> [from_polygons=true]`; no input: the built-in synthetic SAR
demo) turns each scene into one normalised uint8 GeoTIFF on the scene's own grid, with the labels as
pixel positions:

    <out_dir>/scenes/<scene_id>.tif   C bands uint8 (lib.sar.normalize_db for SAR dB input; other
                                      imagery by the segmentation reading rules), 0 = nodata,
                                      tiled, the input's CRS and transform, tags: channels, sar_scale,
                                      sar_offset, source
    <out_dir>/points.csv              lib.point_labels.POINT_COLUMNS (row, col in scene pixels)
    <out_dir>/scenes.csv              scene_id, path, height, width, gsd, channels, source, points

Each scene is written atomically and a scene already prepared from the same source with the same
normalisation is kept, so a rerun resumes; a scene that cannot be read is reported in one line and
left out while the others are prepared (exit status 1 at the end). Both tables are written last.

Training (`PointChips`): chips of `tile_size` px read from the prepared scenes -- with probability
`OBJECT_PROB` (0.9, the seed's share) around an object drawn with `balanced_weights`, otherwise at a
random place -- augmented (flips, rotation <= 5 degrees, scale +-10 %, brightness/contrast, noise;
keypoints move with the pixels) and encoded with lib.point_targets. The chip's place is drawn from the
augmentation pipeline's own generator, so through `dataset.SeededItems` (which re-seeds the pipeline
from (seed, stream, epoch, index) before every item) and `dataset.EpochBatches` (with `weights`) a
chip is a pure function of its key and a resumed run sees exactly the data of an uninterrupted one.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from lib.errors import UserError
from lib.files import atomic_path
from lib.point_contract import HEATMAP_RADIUS, OUTPUT_STRIDE
from lib.point_labels import POINT_COLUMNS, empty_labels, read_vector_points, read_xview3_csv
from lib.sar import SarSource, channel_normalization, is_scene_dir
from lib.xview3_metric import SHORE_TOLERANCE_KM

SCENES_DIR, POINTS_FILE, SCENES_FILE = "scenes", "points.csv", "scenes.csv"
SCENE_COLUMNS = ("scene_id", "path", "height", "width", "gsd", "channels", "source", "points")
STRIP_ROWS = 256  # rows read and written at a time: memory follows the scene width, never its height
OBJECT_PROB = 0.9  # share of chips placed around an object (the rest: anywhere in a scene)
CROWD_RADIUS_PX = 64  # objects closer than this count as neighbours (crowded regions are drawn less)
EDGE_MARGIN = 1 / 16  # an object-centred chip keeps its object this share of the chip away from the edges
# Objects this close outside a chip still reach into it with their heatmap tails (lib.point_targets):
# they are kept, so a chip's targets are a crop of the scene's.
TAIL_PX = OUTPUT_STRIDE * (HEATMAP_RADIUS + 1)


# ---------------------------------------------------------------------------------------------------
# Preparation CLI: scenes + labels -> prepared GeoTIFFs, points.csv, scenes.csv
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceScene:
    scene_id: str
    path: Path  # an xView3 scene folder, a dB GeoTIFF or any other GeoTIFF


def find_sar_scenes(base_dir: Path, channels) -> list[SourceScene]:
    """`base_dir` itself when it is one scene folder, else every sub-folder holding a channel file."""
    if not base_dir.is_dir():
        raise UserError(f"{base_dir}: base_dir does not exist or is not a folder of SAR scenes")
    if is_scene_dir(base_dir, channels):
        return [SourceScene(base_dir.name, base_dir)]
    scenes = [SourceScene(p.name, p) for p in sorted(base_dir.iterdir()) if is_scene_dir(p, channels)]
    if not scenes:
        names = ", ".join(f"{c}_dB.tif" for c in channels)
        raise UserError(f"{base_dir}: no SAR scene folders found (<scene_id>/{names})")
    return scenes


def _inputs(cfg) -> tuple[list[SourceScene], pd.DataFrame, Path]:
    """The scenes, their labels (PointLabels) and the output folder the configuration names."""
    if cfg.image:
        if cfg.base_dir:
            raise UserError("task=points: give base_dir=<scenes> labels=<csv>, or image=<GeoTIFF> points=<file>, "
                            "not both")
        image = Path(cfg.image)
        scene = SourceScene(image.stem if image.is_file() else image.name, image)
        labels = (read_vector_points(cfg.points, image if image.is_file() else _first_channel(image, cfg),
                                     scene.scene_id, bool(cfg.from_polygons)) if cfg.points else None)
        scenes, out_dir = [scene], cfg.out_dir
    else:
        base_dir, label_path, out_dir = cfg.base_dir, cfg.labels, cfg.out_dir
        if not base_dir:
            from lib.sar_demo import ensure_sar_demo

            demo = ensure_sar_demo()
            base_dir, label_path = demo.root, label_path or demo.labels
            out_dir = out_dir or demo.root / "prepared"
        scenes = find_sar_scenes(Path(base_dir), list(cfg.channels))
        if cfg.points:
            raise UserError("points= goes with image=<GeoTIFF>; with base_dir give labels=<xView3 CSV>")
        labels = read_xview3_csv(label_path, [s.scene_id for s in scenes]) if label_path else None
    if labels is None:
        warnings.warn("task=points: no labels given (labels= or points=); scenes are prepared without points",
                      stacklevel=2)
        labels = empty_labels()
    if not out_dir:
        raise UserError("out_dir is not set; add out_dir=<folder for the prepared scenes>")
    return scenes, labels, Path(out_dir)


def _first_channel(scene_dir: Path, cfg) -> Path:
    from lib.sar import channel_file

    return channel_file(scene_dir, next(iter(cfg.channels)))


def open_scene(path: Path, cfg):
    """A window source for one scene: SAR dB (folder or float GeoTIFF) via SarSource, else RasterSource."""
    from lib import geo_io

    if path.is_file():
        with geo_io.open_raster(path) as ds:
            kind = np.dtype(ds.dtypes[0]).kind if not ds.dtypes[0].startswith("complex") else "c"
        if kind not in "fc":
            from lib.image_sources import RasterSource

            with geo_io.open_raster(path) as ds:
                zero = geo_io.resolve_zero_is_nodata(cfg.zero_is_nodata, ds, geo_io.band_layout(ds, cfg.bands))
            return RasterSource(path, cfg.stretch, *cfg.stretch_percentiles, stretch_range=cfg.stretch_range,
                                zero_is_nodata=zero, bands=cfg.bands)
    scale, offset = channel_normalization(list(cfg.channels), cfg.sar_scale, cfg.sar_offset)
    return SarSource(path, list(cfg.channels), scale, offset)


def _grid(src):
    """What a source's output must copy: size, CRS and transform (RasterSource keeps them on its dataset)."""
    return getattr(src, "ds", src)


def _tags(src, scene: SourceScene) -> dict[str, str]:
    if isinstance(src, SarSource):
        return {"channels": ",".join(src.channels), "sar_scale": ",".join(f"{v:g}" for v in src.scale),
                "sar_offset": ",".join(f"{v:g}" for v in src.offset), "source": str(scene.path.resolve())}
    return {"channels": ",".join(f"band{b}" for b in src.layout[0]), "sar_scale": "", "sar_offset": "",
            "source": str(scene.path.resolve())}


def write_prepared(src, path: Path, tags: dict[str, str]) -> None:
    """The scene as a tiled uint8 GeoTIFF on the source grid, strip by strip, atomically; 0 = nodata."""
    import rasterio
    from rasterio.windows import Window

    from lib.geo_io import GDAL_LOCK, output_profile

    grid = _grid(src)
    first, _ = src.read(0, 0, 1, 1)
    profile = output_profile(grid, count=first.shape[-1], dtype="uint8", nodata=0, BIGTIFF="IF_SAFER")
    with atomic_path(path) as tmp, rasterio.open(tmp, "w", **profile) as dst:
        for row in range(0, grid.height, STRIP_ROWS):
            h = min(STRIP_ROWS, grid.height - row)
            data, valid = src.read(row, 0, h, grid.width)
            data = np.where(valid[..., None], np.maximum(data, 1), 0).astype(np.uint8)  # 0 only on nodata
            with GDAL_LOCK:
                dst.write(np.moveaxis(data, -1, 0), window=Window(0, row, grid.width, h))
        dst.update_tags(**tags)
        dst.descriptions = tuple(tags["channels"].split(","))


def _already_prepared(path: Path, tags: dict[str, str], grid) -> bool:
    """A previous run's output for the same source, normalisation and grid (kept on a rerun)."""
    from lib.geo_io import open_raster

    if not path.is_file():
        return False
    try:
        with open_raster(path) as ds:
            same = {k: ds.tags().get(k, "") for k in tags} == tags
            return same and (ds.height, ds.width) == (grid.height, grid.width) and ds.crs == grid.crs
    except UserError:
        return False


def prepare_scene(scene: SourceScene, cfg, out_dir: Path) -> tuple[dict, bool]:
    """Prepare one scene: (its scenes.csv row, whether it was written now rather than kept)."""
    from lib.geo_io import raster_gsd

    src = open_scene(scene.path, cfg)
    try:
        grid = _grid(src)
        tags = _tags(src, scene)
        out = out_dir / SCENES_DIR / f"{scene.scene_id}.tif"
        written = not _already_prepared(out, tags, grid)
        if written:
            write_prepared(src, out, tags)
        gsd = src.gsd if isinstance(src, SarSource) else raster_gsd(grid)
        row = {"scene_id": scene.scene_id, "path": out.relative_to(out_dir).as_posix(), "height": grid.height,
               "width": grid.width, "gsd": gsd, "channels": tags["channels"], "source": tags["source"]}
        return row, written
    finally:
        src.close()


def _inside(points: pd.DataFrame, row: dict) -> pd.DataFrame:
    ok = points["row"].between(-0.5, row["height"] - 0.5, inclusive="left") & points["col"].between(
        -0.5, row["width"] - 0.5, inclusive="left")
    if (~ok).any():
        warnings.warn(f"{row['scene_id']}: {int((~ok).sum())} label(s) lie outside the scene and are left out",
                      stacklevel=2)
    return points[ok]


def prepare(cfg) -> dict:
    """Prepare every scene (module docstring); returns counts, the failures and the output folder."""
    scenes, labels, out_dir = _inputs(cfg)
    from lib.cli import progress_bar

    rows, kept, failures = [], [], []
    written = 0
    bar = progress_bar(scenes, desc="scenes", unit="scene", disable=not cfg.progress)
    for scene in bar:
        try:
            row, new = prepare_scene(scene, cfg, out_dir)
        except UserError as err:
            print(f"error: {err} (scene skipped)", file=sys.stderr, flush=True)
            failures.append(str(err))
            continue
        written += new
        pts = _inside(labels[labels["scene_id"] == scene.scene_id], row)
        rows.append({**row, "points": len(pts)})
        kept.append(pts)
    points = pd.concat(kept, ignore_index=True) if kept else empty_labels()
    with atomic_path(out_dir / POINTS_FILE) as tmp:
        points.to_csv(tmp, index=False, columns=list(POINT_COLUMNS))
    with atomic_path(out_dir / SCENES_FILE) as tmp:
        pd.DataFrame(rows, columns=list(SCENE_COLUMNS)).to_csv(tmp, index=False)
    return {"out_dir": out_dir, "scenes": len(rows), "written": written, "skipped": len(rows) - written,
            "points": len(points), "failed": failures}


def main(cfg) -> None:
    """`dataset.py task=points`: prepare, print the summary, exit 1 when some scene failed."""
    if not cfg.base_dir and not cfg.image:
        print("no base_dir or image given: using the built-in synthetic SAR demo (generated on first use)")
    summary = prepare(cfg)
    print(f"{summary['scenes']} scene(s) prepared ({summary['written']} written, {summary['skipped']} already "
          f"there), {summary['points']} points -> {summary['out_dir']}")
    if summary["failed"]:
        print(f"error: {len(summary['failed'])} scene(s) could not be read and were skipped (listed above); "
              "fix them and rerun: scenes already prepared are kept", file=sys.stderr)
        sys.exit(1)


# ---------------------------------------------------------------------------------------------------
# Prepared data: scenes, points, the validation split
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreparedScene:
    scene_id: str
    path: Path
    height: int
    width: int
    gsd: float | None  # metres per pixel (lengths in metres -> pixels), None when unknown


def load_prepared(data_dir) -> tuple[list[PreparedScene], pd.DataFrame]:
    """The prepared scenes and their points (PointLabels) of a `dataset.py task=points` output folder."""
    root = Path(data_dir)
    if not (root / SCENES_FILE).is_file() or not (root / POINTS_FILE).is_file():
        raise UserError(f"{root}: no {SCENES_FILE}/{POINTS_FILE}; prepare the scenes with "
                        "`python dataset.py task=points base_dir=<scenes> labels=<csv> out_dir=<dir>`")
    table = pd.read_csv(root / SCENES_FILE, dtype={"scene_id": str})
    scenes = [PreparedScene(r.scene_id, root / r.path, int(r.height), int(r.width),
                            float(r.gsd) if pd.notna(r.gsd) else None) for r in table.itertuples()]
    points = pd.read_csv(root / POINTS_FILE, dtype={"scene_id": str, "confidence": str}, keep_default_na=False,
                         na_values={c: [""] for c in POINT_COLUMNS if c not in ("scene_id", "confidence")})
    return scenes, points


def split_scenes(scenes: list, fold: int, num_folds: int, seed: int = 0,
                 points: pd.DataFrame | None = None) -> tuple[list, list]:
    """(train, val) scenes for `fold` of `num_folds`: whole scenes are held out, never parts of one.

    With `points`, scenes are stratified as the seed split its data: ordered by their number of fishing
    vessels, then near-shore objects, then objects (ties broken by a `seed`ed shuffle), and dealt to the
    folds in snake order, so every fold gets a share of the rare kinds. With fewer scenes than folds,
    the higher folds are empty.
    """
    if not 0 <= fold < num_folds:
        raise UserError(f"fold={fold}: must be in 0..{num_folds - 1} (num_folds={num_folds})")
    order = list(range(len(scenes)))
    np.random.default_rng(seed).shuffle(order)
    if points is not None:
        ids = [getattr(s, "scene_id", s) for s in scenes]
        fishing = points[(points["is_vessel"] == 1) & (points["is_fishing"] == 1)]["scene_id"].value_counts()
        near = points[points["distance_from_shore_km"] <= SHORE_TOLERANCE_KM]["scene_id"].value_counts()
        total = points["scene_id"].value_counts()
        key = {i: (-fishing.get(ids[i], 0), -near.get(ids[i], 0), -total.get(ids[i], 0)) for i in order}
        order.sort(key=key.__getitem__)  # stable: ties keep the shuffled order
    fold_of = {}
    for k, i in enumerate(order):
        lap, pos = divmod(k, num_folds)
        fold_of[i] = pos if lap % 2 == 0 else num_folds - 1 - pos
    return ([s for i, s in enumerate(scenes) if fold_of[i] != fold],
            [s for i, s in enumerate(scenes) if fold_of[i] == fold])


# ---------------------------------------------------------------------------------------------------
# Balanced sampling
# ---------------------------------------------------------------------------------------------------


def crowd_factor(points: pd.DataFrame, radius_px: float = CROWD_RADIUS_PX) -> np.ndarray:
    """1 / (objects of the same scene within `radius_px`, itself included): a crowd of k close objects
    is drawn about as often as one lone object, so a wind farm or a harbour does not dominate."""
    from scipy.spatial import cKDTree

    out = np.ones(len(points))
    for idx in points.groupby("scene_id", sort=False).indices.values():
        rc = points[["row", "col"]].to_numpy(dtype=float)[idx]
        counts = np.array([len(n) for n in cKDTree(rc).query_ball_point(rc, radius_px)])
        out[idx] = 1.0 / counts
    return out


def attribute_classes(points: pd.DataFrame, near_shore_km: float = SHORE_TOLERANCE_KM) -> dict[str, np.ndarray]:
    """Per balanced attribute, each object's class (0/1) or -1 where it does not apply or is unknown:
    vessel / non-vessel, fishing / non-fishing (vessels only), near-shore / off-shore."""
    def classes(known, positive):
        return np.where(known, positive.astype(int), -1)

    vessel = points["is_vessel"].to_numpy(dtype=float)
    fishing = points["is_fishing"].to_numpy(dtype=float)
    shore = points["distance_from_shore_km"].to_numpy(dtype=float)
    return {"vessel": classes(~np.isnan(vessel), vessel == 1),
            "fishing": classes((vessel == 1) & ~np.isnan(fishing), fishing == 1),
            "near_shore": classes(~np.isnan(shore), shore <= near_shore_km)}


def balanced_weights(points: pd.DataFrame, radius_px: float = CROWD_RADIUS_PX,
                     near_shore_km: float = SHORE_TOLERANCE_KM, iterations: int = 200) -> np.ndarray:
    """Object sampling weights (sum 1): each attribute's two classes drawn equally often, crowds less.

    Starting from `crowd_factor`, the weights are raked (iterative proportional fitting): for each
    attribute of `attribute_classes` in turn, the objects of each class are scaled so that both classes
    hold the same share of the weight of the objects where the attribute is known. The result is the
    weighting closest to the crowd prior (in relative entropy) whose vessel/non-vessel,
    fishing/non-fishing and near/off-shore draws are balanced; an attribute with one class only is left
    alone, and objects where it is unknown keep their weight.
    """
    w = crowd_factor(points, radius_px)
    if len(w) == 0:
        return w
    groups = [c for c in attribute_classes(points, near_shore_km).values() if len(np.unique(c[c >= 0])) == 2]
    for _ in range(iterations):
        before = w.copy()
        for cls in groups:
            known = cls >= 0
            sums = np.bincount(cls[known], weights=w[known], minlength=2)
            w[known] *= (sums.sum() / 2) / sums[cls[known]]
        if np.max(np.abs(w - before)) <= 1e-12 * np.max(w):
            break
    return w / w.sum()


# ---------------------------------------------------------------------------------------------------
# Training chips
# ---------------------------------------------------------------------------------------------------


def point_transform(augment: bool = True):
    """The seed's SAR augmentations (albumentations 2.x) with keypoints in `xys` (x = column, y = row,
    s = length in px): flips, rotation <= 5 degrees and scale +-10 % (lengths scale with it),
    brightness/contrast and Gaussian noise. `valid` (a mask target) is 0 where rotation brings in
    border; keypoints are kept wherever they go (`PointChips` keeps those within TAIL_PX of the chip). `augment=False`: the identity, with the same
    interface (and generator, which places the chip)."""
    import albumentations as A
    import cv2

    ops = [A.NoOp()]
    if augment:
        ops = [
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
            A.Affine(rotate=(-5, 5), scale=(0.9, 1.1), keep_ratio=True, p=0.5, interpolation=cv2.INTER_LINEAR,
                     border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0),
            A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=0.5),
            A.GaussNoise(std_range=(0.01, 0.03), p=0.3),
        ]
    return A.Compose(ops, keypoint_params=A.KeypointParams(format="xys", label_fields=["index"],
                                                           remove_invisible=False),
                     additional_targets={"valid": "mask"})


class PointChips:
    """Map-style training set of chips over prepared scenes (module docstring).

    Indexes 0..n_objects-1 are chips around that object, the rest chips at random places (scenes drawn
    by area); `weights` gives the objects `OBJECT_PROB` of the draws, balanced (`balanced_weights`),
    and the random places the rest -- hand them to `dataset.EpochBatches`. Each item is a dict:
    "image" float32 [C, T, T] in 0..1 (0 = nodata, as the model sees `uint8 / 255`) and the target maps
    of lib.point_targets.encode_targets as float32 tensors.
    """

    def __init__(self, scenes: list[PreparedScene], points: pd.DataFrame, tile_size: int, augment: bool = True,
                 object_prob: float = OBJECT_PROB, crowd_radius_px: float = CROWD_RADIUS_PX):
        if tile_size < 32 or tile_size % 32:
            raise UserError(f"tile_size={tile_size}: point chips must be a positive multiple of 32 px")
        self.scenes, self.tile = list(scenes), int(tile_size)
        index = {s.scene_id: k for k, s in enumerate(self.scenes)}
        pts = points[points["scene_id"].isin(index)].reset_index(drop=True)
        self.points = pts
        self.scene_of = pts["scene_id"].map(index).to_numpy(dtype=int)
        self.transform = point_transform(augment)
        n = len(pts)
        self.n_objects = n
        self.n_random = max(len(self.scenes), round(n * (1 - object_prob) / object_prob)) if n else len(self.scenes)
        share = object_prob if n else 0.0
        self.weights = np.concatenate([share * balanced_weights(pts, crowd_radius_px),
                                       np.full(self.n_random, (1 - share) / self.n_random)])
        areas = np.array([s.height * s.width for s in self.scenes], dtype=float)
        self.scene_p = areas / areas.sum()
        self._sources: dict = {}

    def __len__(self) -> int:
        return self.n_objects + self.n_random

    def source(self, k: int) -> SarSource:
        """A handle on scene k, opened in this process (DataLoader workers each open their own)."""
        import os

        key = (os.getpid(), k)
        if key not in self._sources:
            if len(self._sources) >= 16:
                self._sources.pop(next(iter(self._sources))).close()
            self._sources[key] = SarSource(self.scenes[k].path)
        return self._sources[key]

    def place(self, i: int, rng: np.random.Generator) -> tuple[int, int, int]:
        """(scene index, top row, left column) of chip i."""
        t = self.tile
        if i < self.n_objects:
            k = int(self.scene_of[i])
            m = max(1, int(t * EDGE_MARGIN))
            r = round(float(self.points.at[i, "row"])) - int(rng.integers(m, t - m))
            c = round(float(self.points.at[i, "col"])) - int(rng.integers(m, t - m))
        else:
            k = int(rng.choice(len(self.scenes), p=self.scene_p))
            r = int(rng.integers(0, max(self.scenes[k].height - t, 0) + 1))
            c = int(rng.integers(0, max(self.scenes[k].width - t, 0) + 1))
        s = self.scenes[k]
        r = min(max(r, 0), s.height - t) if s.height >= t else -((t - s.height) // 2)
        c = min(max(c, 0), s.width - t) if s.width >= t else -((t - s.width) // 2)
        return k, r, c

    def chip(self, i: int) -> dict:
        """Chip i before target encoding: image uint8 [T, T, C], valid bool, and its objects in chip pixels."""
        k, r0, c0 = self.place(i, self.transform.random_generator)
        image, valid = self.source(k).read(r0, c0, self.tile, self.tile)
        pts = self.points[self.scene_of == k]
        rows, cols = pts["row"].to_numpy() - r0, pts["col"].to_numpy() - c0
        near = _within(rows, cols, self.tile, TAIL_PX)
        pts, rows, cols = pts[near], rows[near], cols[near]
        gsd = self.scenes[k].gsd or 1.0
        length_px = pts["length_m"].to_numpy(dtype=float) / gsd
        keypoints = np.column_stack([cols, rows, np.where(np.isnan(length_px), 1.0, length_px)]).reshape(-1, 3)
        out = self.transform(image=image, valid=valid.astype(np.uint8), keypoints=keypoints, index=np.arange(len(pts)))
        kp = np.asarray(out["keypoints"], dtype=float).reshape(-1, 3)
        kept = np.asarray(out["index"], dtype=int)
        near = _within(kp[:, 1], kp[:, 0], self.tile, TAIL_PX)
        kp, kept = kp[near], kept[near]
        valid = np.asarray(out["valid"]) > 0
        image = np.where(valid[..., None], out["image"], 0).astype(np.uint8)
        length = np.where(np.isnan(length_px[kept]), np.nan, kp[:, 2])
        return {"image": image, "valid": valid, "rows": kp[:, 1], "cols": kp[:, 0], "length_px": length,
                "is_vessel": pts["is_vessel"].to_numpy(dtype=float)[kept],
                "is_fishing": pts["is_fishing"].to_numpy(dtype=float)[kept],
                "scene": k, "origin": (r0, c0)}

    def __getitem__(self, i: int) -> dict:
        import torch

        from lib.point_targets import encode_targets

        c = self.chip(int(i))
        targets = encode_targets(c["rows"], c["cols"], c["is_vessel"], c["is_fishing"], c["length_px"],
                                 shape=(self.tile, self.tile), valid=c["valid"])
        image = torch.from_numpy(np.ascontiguousarray(c["image"].transpose(2, 0, 1))).float() / 255.0
        return {"image": image, **{k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in targets.items()}}

    def __getstate__(self) -> dict:
        """Open handles stay in their process: a worker started by spawn opens its own."""
        return {**self.__dict__, "_sources": {}}

    def close(self) -> None:
        for src in self._sources.values():
            src.close()
        self._sources.clear()


def _within(rows: np.ndarray, cols: np.ndarray, tile: int, margin: float) -> np.ndarray:
    """Positions (pixel centres at integers) inside a tile x tile chip grown by `margin` px on every side."""
    lo, hi = -0.5 - margin, tile - 0.5 + margin
    return (rows >= lo) & (rows < hi) & (cols >= lo) & (cols < hi)

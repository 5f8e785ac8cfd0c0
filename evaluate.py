"""Score predictions against ground truth: pixel Jaccard and SpaceNet polygon precision/recall/F1.

    python evaluate.py gt=../shared/data/solaris/gt.geojson pred=../shared/data/solaris/pred.geojson min_area=0
    python evaluate.py gt=<labels folder> pred=<inference output_dir> images=<images> output=scores.json
    python evaluate.py gt=truth.csv pred=proposals.csv                  # SpaceNet CSVs (PolygonWKT_Pix)
    python evaluate.py task=points gt=labels.csv pred=detections.csv shore_root=<shorelines> output=x.json  # xView3
    python evaluate.py task=points gt=centroids.geojson pred=points.geojson distance_m=3   # building points

`gt`/`pred` may be a file or folder of GeoJSON/GPKG footprints, a SpaceNet CSV, a folder of mask
rasters, or an inference output folder (its masks/ and footprints/ are used). Files pair up by name
(stem). Pixel Jaccard needs predicted masks and either true masks or footprints, which are rasterised
on the prediction's grid. Polygons are compared in pixel coordinates of the image grid when one is
known, otherwise in the footprints' own projected CRS (a local UTM zone for longitude/latitude);
either way `min_area` is ground area in m^2 (px^2 only for plain pixel footprints), so two GeoJSON
files score the same as on their image grid. Overlapping ground-truth polygons (common in OSM) are
each scored as a building, with a warning. Vertices per polygon and the share of right-angle corners
of both sides are printed and recorded under `outlines`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import rasterio
import shapely

from lib import footprints, geo_io, metrics, run_folder, xview3_metric
from lib.cli import cli
from lib.errors import UserError
from lib.files import write_json

RASTER_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
TASKS = ("segmentation", "points")
MIN_AREA_M2, MIN_AREA_PX = 4.0, 20.0  # min_area=null: ground area with a CRS, SpaceNet's pixel rule without
XVIEW3_HEADLINE = ("aggregate", "loc_fscore", "loc_fscore_shore", "vessel_fscore", "fishing_fscore", "length_acc")
POINT_TOLERANCE_M = 3.0  # building centroids: a few metres, about half a small house
CONFIDENCE_COLUMNS = ("confidence", "Confidence", "conf", "score", "mean_prob")


@dataclass
class Sources:
    """What one side (gt or pred) offers: vector footprints and/or mask rasters by image id."""

    vectors: dict[str, object] = field(default_factory=dict)  # id -> path, or GeoDataFrame (CSV)
    rasters: dict[str, Path] = field(default_factory=dict)
    single: bool = False  # given as one file: pairs with the other side's single file


def _by_stem(folder: Path, suffixes) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.suffix.lower() in suffixes and not p.name.startswith("."):
            out.setdefault(p.stem, p)  # .geojson sorts before .gpkg: GeoJSON wins when both exist
    return out


def resolve(path, masks=None, name: str = "pred") -> Sources:
    """Find footprints and masks for one side from a file, a folder or an inference output folder."""
    src = Sources()
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise UserError(f"{p}: {name} does not exist")
        if p.is_file():
            suffix = p.suffix.lower()
            src.single = True
            if suffix == ".csv":
                src.vectors, src.single = read_spacenet_csv(p), False
            elif suffix in geo_io.VECTOR_SUFFIXES:
                src.vectors[p.stem] = p
            elif suffix in RASTER_SUFFIXES:
                src.rasters[p.stem] = p
            else:
                raise UserError(f"{p}: {name} must be GeoJSON/GPKG, a SpaceNet CSV, a raster or a folder")
        elif (p / run_folder.MASKS).is_dir() or (p / run_folder.FOOTPRINTS).is_dir():  # an inference run
            if (p / run_folder.FOOTPRINTS).is_dir():
                src.vectors = _by_stem(p / run_folder.FOOTPRINTS, geo_io.VECTOR_SUFFIXES)
            if (p / run_folder.MASKS).is_dir() and masks is None:
                src.rasters = _by_stem(p / run_folder.MASKS, RASTER_SUFFIXES)
        else:
            src.vectors = _by_stem(p, geo_io.VECTOR_SUFFIXES)
            src.rasters = _by_stem(p, RASTER_SUFFIXES)
            csvs = sorted(p.glob("*.csv"))
            if not src.vectors and not src.rasters and csvs:
                src.vectors = read_spacenet_csv(csvs[0])
            if not src.vectors and not src.rasters:
                raise UserError(f"{p}: no footprints (GeoJSON/GPKG/CSV) or mask rasters found for {name}")
    if masks is not None:
        m = Path(masks)
        if not m.exists():
            raise UserError(f"{m}: {name}_masks does not exist")
        src.rasters = {m.stem: m} if m.is_file() else _by_stem(m, RASTER_SUFFIXES)
        src.single = m.is_file() and (path is None or src.single)
    return src


def read_spacenet_csv(path: Path) -> dict:
    """SpaceNet CSV (ImageId, BuildingId, PolygonWKT_Pix[, Confidence]) -> id -> GeoDataFrame (pixels)."""
    import geopandas as gpd
    import pandas as pd

    try:
        df = pd.read_csv(path)
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: not a readable CSV ({err})") from None
    cols = {c.lower(): c for c in df.columns}
    if "imageid" not in cols or "polygonwkt_pix" not in cols:
        raise UserError(f"{path}: SpaceNet CSV needs columns ImageId, BuildingId, PolygonWKT_Pix[, Confidence]")
    try:
        geoms = shapely.from_wkt(df[cols["polygonwkt_pix"]].astype(str).values)
    except shapely.errors.GEOSException as err:
        raise UserError(f"{path}: bad PolygonWKT_Pix ({err})") from None
    conf = df[cols["confidence"]].astype(float).values if "confidence" in cols else np.ones(len(df))
    out = {}
    for image_id, idx in df.groupby(cols["imageid"], sort=True).indices.items():
        keep = [i for i in idx if not geoms[i].is_empty]
        out[str(image_id)] = gpd.GeoDataFrame({"confidence": conf[keep]}, geometry=list(geoms[keep]), crs=None)
    return out


def load_vectors(value):
    """A footprints file (or an already-read GeoDataFrame) with its CRS, repaired."""
    import geopandas as gpd

    if isinstance(value, gpd.GeoDataFrame):
        return value
    return geo_io.load_footprints(value)


def _grid(path: Path | None):
    """(transform, crs, shape) of a raster, or None."""
    if path is None:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        ds = geo_io.open_raster(path)
        with ds:
            georef = geo_io.is_georeferenced(ds)
            return (ds.transform, ds.crs, (ds.height, ds.width)) if georef else (None, None, (ds.height, ds.width))


def to_pixels(gdf, grid):
    """Geometries in pixel coordinates of `grid` (unchanged when the footprints have no CRS)."""

    transform, crs, _ = grid
    geoms = gdf.geometry.values
    if gdf.crs is None or transform is None:
        return np.asarray(geoms, dtype=object)
    geoms = gdf.to_crs(crs).geometry.values
    inv = ~transform
    a, b, c, d, e, f = tuple(inv)[:6]
    return shapely.transform(np.asarray(geoms, dtype=object),
                             lambda xy: np.column_stack([a * xy[:, 0] + b * xy[:, 1] + c,
                                                         d * xy[:, 0] + e * xy[:, 1] + f]))


def common_projected(gt, pred):
    """Both sides in one projected CRS when no image grid is known (UTM for longitude/latitude).

    Returns (gt geometries, pred geometries, their CRS or None for pixel coordinates).
    """
    if gt.crs is None or pred.crs is None:
        if (gt.crs is None) != (pred.crs is None) and len(gt) and len(pred):
            raise UserError("one side has georeferenced footprints and the other pixel coordinates; pass "
                            "images=<folder> so they can be put on the image grid")
        return gt.geometry.values, pred.geometry.values, gt.crs or pred.crs
    crs = gt.crs
    if crs.is_geographic:
        crs = gt.estimate_utm_crs() if len(gt) else pred.estimate_utm_crs()
    return gt.to_crs(crs).geometry.values, pred.to_crs(crs).geometry.values, crs


def overlapping(geoms) -> int:
    """How many polygons overlap another one (share area, not only a boundary)."""
    geoms = np.asarray(geoms, dtype=object)
    if len(geoms) < 2:
        return 0
    i, j = shapely.STRtree(geoms).query(geoms, predicate="intersects")
    pair = i < j
    i, j = i[pair], j[pair]
    shared = shapely.area(shapely.intersection(geoms[i], geoms[j])) > 0
    return len(np.unique(np.concatenate([i[shared], j[shared]])))


def confidence_of(gdf) -> np.ndarray | None:
    for col in CONFIDENCE_COLUMNS:
        if col in gdf.columns:
            return gdf[col].astype(float).values
    return None


def pair_ids(gt: dict, pred: dict, gt_single: bool, pred_single: bool) -> list[tuple[str, object, object]]:
    """(id, gt item, pred item) for every ground-truth id; single files pair with each other."""
    if gt_single and pred_single and len(gt) == 1 and len(pred) == 1:
        (gid, g), (_, p) = next(iter(gt.items())), next(iter(pred.items()))
        return [(gid, g, p)]
    return [(k, gt[k], pred.get(k)) for k in sorted(gt)]


def score_pixels(gt: Sources, pred: Sources, images: dict[str, Path], cfg) -> metrics.JaccardSum | None:
    """Global and per-image pixel Jaccard of predicted masks against true masks or footprints."""
    truth = gt.rasters or gt.vectors
    if not pred.rasters or not truth:
        return None
    total = metrics.JaccardSum()
    if pred.single and gt.single:
        pairs = [(next(iter(pred.rasters)), next(iter(pred.rasters.values())), next(iter(truth.values())))]
    else:
        pairs = [(k, v, truth[k]) for k, v in sorted(pred.rasters.items()) if k in truth]
        missing = sorted(set(truth) - set(pred.rasters))
        if missing:
            print(f"warning: {len(missing)} ground-truth images have no predicted mask (e.g. {missing[0]}); "
                  "left out of the pixel score")
    for image_id, pred_path, gt_item in pairs:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            with geo_io.open_raster(pred_path) as ds:
                p = ds.read(1) >= max(float(cfg.mask_threshold) * 255.0, 1)
                transform, crs = ds.transform, ds.crs
            if crs is None:  # a plain mask: take the grid of its image
                image = images.get(image_id) or (next(iter(images.values())) if len(images) == 1 else None)
                grid = _grid(image)
                if grid is not None and grid[0] is not None:
                    if grid[2] != p.shape:
                        raise UserError(f"{pred_path}: size {p.shape[::-1]} differs from its image {image} "
                                        f"{grid[2][::-1]}")
                    transform, crs = grid[0], grid[1]
            if gt.rasters:
                with geo_io.open_raster(gt_item) as ds:
                    g = ds.read(1) > 0
                if g.shape != p.shape:
                    raise UserError(f"{gt_item}: size {g.shape[::-1]} differs from the prediction {pred_path} "
                                    f"{p.shape[::-1]}")
            else:
                gdf = load_vectors(gt_item)
                georef = gdf.crs is not None and crs is not None
                if georef:
                    gdf = gdf.to_crs(crs)
                tr = transform if georef else rasterio.Affine.identity()
                g = geo_io.rasterize_footprints(gdf.geometry.values, p.shape, tr, all_touched=cfg.all_touched) > 0
        total.add(image_id, p, g)
    return total if total.per_image else None


def min_area_for(value, crs) -> float:
    """`min_area=null`: 4 m^2 on the ground (as inference drops) when a CRS is known, SpaceNet's 20 px^2
    for plain pixel footprints; a number is used as given (m^2 with a CRS, px^2 without)."""
    if value is not None:
        return float(value)
    return MIN_AREA_PX if crs is None else MIN_AREA_M2


def score_vectors(gt: Sources, pred: Sources, images: dict[str, Path], cfg) -> tuple[dict, dict, dict] | None:
    """SpaceNet polygon counts, total and per image, and outline_stats of both sides (on the ground)."""
    import geopandas as gpd

    if not gt.vectors or not pred.vectors:
        return None
    per_image = {}
    shapes: dict[str, list] = {"pred": [], "gt": []}
    tp = fp = fn = 0
    for image_id, g_item, p_item in pair_ids(gt.vectors, pred.vectors, gt.single, pred.single):
        g = load_vectors(g_item)
        p = load_vectors(p_item) if p_item is not None else gpd.GeoDataFrame(geometry=[], crs=g.crs)
        grid_path = images.get(image_id) or pred.rasters.get(image_id) or gt.rasters.get(image_id)
        grid = _grid(grid_path)
        if grid is not None and (grid[0] is not None or (g.crs is None and p.crs is None)):
            g_geoms, p_geoms = to_pixels(g, grid), to_pixels(p, grid)
            transform, crs = grid[0], grid[1]
        else:
            (g_geoms, p_geoms, crs), transform = common_projected(g, p), None
        # min_area is in m^2 on the ground whatever the frame of comparison (px^2 for plain pixels)
        g_ground = footprints.ground_geometries(g_geoms, transform, crs)
        p_ground = footprints.ground_geometries(p_geoms, transform, crs)
        shapes["gt"].extend(g_ground)
        shapes["pred"].extend(p_ground)
        n = overlapping(g_ground)
        if n:
            print(f"warning: {image_id}: {n} ground-truth polygons overlap another; each is scored as a building")
        r = metrics.score_polygons(g_geoms, p_geoms, confidence_of(p), min_area=min_area_for(cfg.min_area, crs),
                                   iou_threshold=cfg.iou_threshold, gt_areas=shapely.area(g_ground),
                                   pred_areas=shapely.area(p_ground))
        r.pop("matches")
        per_image[image_id] = r
        tp, fp, fn = tp + r["tp"], fp + r["fp"], fn + r["fn"]
    outlines = {side: metrics.outline_stats(v) for side, v in shapes.items()}
    return metrics.prf(tp, fp, fn), per_image, outlines


def run(cfg) -> dict:
    if cfg.task not in TASKS:
        raise UserError(f"task={cfg.task}: choose one of {', '.join(TASKS)}")
    if cfg.task == "points":
        return run_points(cfg)
    if cfg.gt is None and cfg.gt_masks is None:
        raise UserError("pass gt=<ground-truth footprints, masks or CSV>")
    if cfg.pred is None and cfg.pred_masks is None:
        raise UserError("pass pred=<predicted footprints, masks, CSV or inference output folder>")
    gt = resolve(cfg.gt, cfg.gt_masks, "gt")
    pred = resolve(cfg.pred, cfg.pred_masks, "pred")
    images: dict[str, Path] = {}
    if cfg.images is not None:
        ip = Path(cfg.images)
        if not ip.exists():
            raise UserError(f"{ip}: images does not exist")
        images = {ip.stem: ip} if ip.is_file() else _by_stem(ip, RASTER_SUFFIXES)
    result: dict = {}
    per_image: dict = {}
    pixel = score_pixels(gt, pred, images, cfg)
    if pixel is not None:
        result["pixel"] = pixel.summary()
        for k, v in pixel.per_image.items():
            per_image.setdefault(k, {}).update(v)
    poly = score_vectors(gt, pred, images, cfg)
    if poly is not None:
        result["polygon"] = poly[0]
        for k, v in poly[1].items():
            per_image.setdefault(k, {}).update(v)
        result["outlines"] = poly[2]
    if not result:
        raise UserError("nothing to score: give footprints on both sides (polygon F1) or predicted masks with "
                        "true masks/footprints (pixel Jaccard)")
    result["per_image"] = per_image
    print(format_table(result))
    for side, o in result.get("outlines", {}).items():
        if o["polygons"]:
            print(f"outlines {side}: {o['polygons']} polygons, {o['vertices_per_polygon']:.1f} vertices per polygon, "
                  + ("no corners" if o["right_angle_share"] is None else f"{100 * o['right_angle_share']:.1f} % right-angle corners"))
    if cfg.output:
        write_json(cfg.output, result)
    return result


def run_points(cfg) -> dict:
    """Point detection: the xView3 aggregate metric for detection CSVs, point F1 within `distance_m` for
    point files (building centroids); both match one-to-one with the Hungarian algorithm."""
    if cfg.gt is None or cfg.pred is None:
        raise UserError("task=points: pass gt=<labels CSV or points file> and pred=<detections CSV or points file>")
    gt, pred = Path(cfg.gt), Path(cfg.pred)
    if gt.suffix.lower() == ".csv":
        options = {"score_all": bool(cfg.score_all)}
        if cfg.distance_m is not None:
            options["distance_tolerance_m"] = float(cfg.distance_m)
        result = xview3_metric.score_files(gt, pred, cfg.shore_root, **options)
        print("  ".join(f"{k} {result[k]:.6f}" for k in XVIEW3_HEADLINE))
    else:
        tolerance = POINT_TOLERANCE_M if cfg.distance_m is None else float(cfg.distance_m)
        result = xview3_metric.score_point_files(gt, pred, tolerance)
        print(f"points within {tolerance:g} m: " + "  ".join(f"{k} {_fmt(result[k])}" for k in
                                                             ("tp", "fp", "fn", "precision", "recall", "f1")))
    if cfg.output:
        write_json(cfg.output, result)
    return result


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.6f}"
    return str(v)


def format_table(result: dict, max_rows: int = 50) -> str:
    cols = [c for c in ("jaccard", "intersection", "union", "tp", "fp", "fn", "precision", "recall", "f1")
            if any(c in r for r in result["per_image"].values())]
    rows = [["image", *cols]]
    items = sorted(result["per_image"].items())
    for k, r in items[:max_rows]:
        rows.append([k, *(_fmt(r.get(c)) for c in cols)])
    if len(items) > max_rows:
        rows.append([f"... {len(items) - max_rows} more", *[""] * len(cols)])
    total = {**result.get("pixel", {}), **result.get("polygon", {})}
    rows.append(["TOTAL", *(_fmt(total.get(c)) for c in cols)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(len(lines) - 1, "-" * len(lines[0]))
    return "\n".join(lines)


@cli("evaluate")
def main(cfg):
    run(cfg)


if __name__ == "__main__":
    main()

"""Building masks -> footprint polygons, streamed band by band so whole scenes never sit in memory.

Each band of mask rows is labelled into 4-connected components (the connectivity of
`rasterio.features.shapes`), vectorised in pixel coordinates, and measured (pixel count, sum of
probability). Components that touch a band edge may continue in the next band: they are kept aside
and merged by polygon union at the end, their measures summed. Finished polygons are filtered by
ground area (m^2; pixels for plain images), simplified or squared (lib.regularize) in pixel units,
moved to the image CRS with its affine transform, optionally compared with buildings already
mapped (lib.existing_buildings), and written as GeoJSON (EPSG:4326, as the format requires) and
GeoPackage (image CRS).
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import shapely
from affine import Affine
from pyproj.exceptions import CRSError
from rasterio.features import shapes

from lib import existing_buildings
from lib.errors import UserError
from lib.files import atomic_path
from lib.regularize import square_polygons

logging.getLogger("pyogrio").setLevel(logging.WARNING)  # not "Created N records" for every file

VECTOR_FORMATS = {"gpkg": ("GPKG", ".gpkg"), "geojson": ("GeoJSON", ".geojson"), "none": None}
SQUARE_TOLERANCE = 1.5  # px: the least simplification used to find walls when squaring outlines


@dataclass
class Piece:
    """A polygon in pixel coordinates with its pixel count and probability sum (0..255 units)."""

    geom: object
    pixels: int
    prob_sum: float


class Polygonizer:
    """Collect the footprints of a scene from blocks handed over in order (rows top to bottom).

    A component touching an inner block edge (not the scene border) may continue in the next block;
    it is kept aside and merged by union at the end, so blocks can be any size.
    """

    def __init__(self, height: int, width: int):
        self.height, self.width = height, width
        self.done: list[Piece] = []
        self.open: list[Piece] = []

    def add(self, row_off: int, mask: np.ndarray, prob_u8: np.ndarray | None = None, col_off: int = 0) -> None:
        h, w = mask.shape
        if h == 0 or w == 0 or not mask.any():
            return
        n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=4,
                                                                ltype=cv2.CV_32S)
        counts = stats[:, cv2.CC_STAT_AREA]
        sums = (np.bincount(labels.ravel(), weights=prob_u8.ravel(), minlength=n) if prob_u8 is not None
                else counts * 255.0)
        top, left = stats[:, cv2.CC_STAT_TOP], stats[:, cv2.CC_STAT_LEFT]
        bottom, right = top + stats[:, cv2.CC_STAT_HEIGHT], left + stats[:, cv2.CC_STAT_WIDTH]
        touches = (((top == 0) & (row_off > 0)) | ((bottom == h) & (row_off + h < self.height))
                   | ((left == 0) & (col_off > 0)) | ((right == w) & (col_off + w < self.width)))
        for geom, label in shapes(labels, mask=labels > 0, connectivity=4,
                                  transform=Affine.translation(col_off, row_off)):
            label = int(label)
            piece = Piece(shapely.geometry.shape(geom), int(counts[label]), float(sums[label]))
            (self.open if touches[label] else self.done).append(piece)

    def finish(self) -> list[Piece]:
        """All footprints: finished pieces plus band-crossing pieces merged by union."""
        pieces = list(self.done)
        if self.open:
            merged = shapely.get_parts(shapely.union_all([p.geom for p in self.open]))
            tree = shapely.STRtree(merged)
            acc = [[0, 0.0] for _ in merged]
            points = shapely.point_on_surface([p.geom for p in self.open])
            for i, j in zip(*tree.query(points, predicate="within")):
                acc[j][0] += self.open[i].pixels
                acc[j][1] += self.open[i].prob_sum
            pieces += [Piece(g, a[0], a[1]) for g, a in zip(merged, acc)]
        return pieces


def footprints_frame(pieces: list[Piece], transform, crs, *, min_area: float = 0.0, simplify: float = 0.0,
                     regularize: bool = False, angles: int = 90):
    """GeoDataFrame of footprints in the image CRS (pixel coordinates when there is no CRS).

    `min_area` drops small blobs: m^2 of ground when there is a CRS (measured in the local UTM zone,
    so degrees and metres agree), pixels for plain images. `simplify` is a tolerance in pixels.
    `regularize` squares outlines (lib.regularize, `angles` 90 or 45); the unsquared outline stays
    in the `raw_geometry` column. Columns: `area_px` (mask pixels), `area_m2` (of the written
    outline; None without georeferencing), `mean_prob` (0..1), `confidence` (= mean_prob, for
    scoring), `squared`.
    """
    import geopandas as gpd

    raw = np.array([p.geom for p in pieces], dtype=object)
    pixels = np.array([p.pixels for p in pieces], dtype=float)
    georef = crs is not None and transform is not None
    scale = _m2_per_px2(raw, transform, crs) if georef and len(raw) else np.ones(len(raw))
    keep = (pixels * scale >= min_area) & (pixels >= 1)
    pieces, raw, scale = [p for p, k in zip(pieces, keep) if k], raw[keep], scale[keep]
    simple = shapely.simplify(raw, simplify, preserve_topology=True) if simplify and len(raw) else raw
    geoms, squared = simple, np.zeros(len(raw), bool)
    if regularize and len(raw):
        geoms, squared = square_polygons(raw, angles, max(simplify, SQUARE_TOLERANCE))
        geoms = np.where(squared, geoms, simple)
    area_m2 = [round(float(a), 3) for a in shapely.area(geoms) * scale] if georef else None
    mean_prob = [round(p.prob_sum / max(p.pixels, 1) / 255.0, 4) for p in pieces]
    gdf = gpd.GeoDataFrame({"id": np.arange(len(pieces)), "area_px": [p.pixels for p in pieces],
                            "mean_prob": mean_prob, "confidence": mean_prob, "squared": squared,
                            "area_m2": area_m2},
                           geometry=list(_to_crs_coords(geoms, transform if georef else None)), crs=crs)
    gdf["raw_geometry"] = gpd.GeoSeries(_to_crs_coords(simple, transform if georef else None), crs=crs)
    return gdf


def _to_crs_coords(geoms: np.ndarray, transform) -> np.ndarray:
    """Pixel (column, row) geometries -> image CRS coordinates through the affine `transform`."""
    if transform is None or len(geoms) == 0:
        return geoms
    a, b, c, d, e, f = tuple(transform)[:6]
    return shapely.transform(geoms, lambda xy: np.column_stack([a * xy[:, 0] + b * xy[:, 1] + c,
                                                                 d * xy[:, 0] + e * xy[:, 1] + f]))


def _m2_per_px2(geoms: np.ndarray, transform, crs) -> np.ndarray:
    """Ground m^2 per pixel^2 at each polygon."""
    px_area = shapely.area(geoms)
    return np.where(px_area > 0, shapely.area(ground_geometries(geoms, transform, crs)) / np.maximum(px_area, 1e-12),
                    0.0)


def ground_geometries(geoms, transform, crs) -> np.ndarray:
    """Geometries in metres on the ground: through `transform` (pixels -> CRS), then the local UTM zone.

    Areas and angles measured there are true ones for geographic and Web Mercator CRSs too. Without a
    CRS, or for a CRS without a geographic datum, the geometries stay in their own units.
    """
    import geopandas as gpd

    geoms = _to_crs_coords(np.asarray(geoms, dtype=object), transform)
    if crs is None or len(geoms) == 0:
        return geoms
    world = gpd.GeoSeries(geoms, crs=crs)
    try:
        return world.to_crs(world.estimate_utm_crs()).values
    except (RuntimeError, ValueError, CRSError):
        return geoms


def check_inputs(cfg) -> None:
    """Fail before any prediction on footprint options that cannot be used (e.g. the `existing` file)."""
    if cfg.regularize_angles not in (45, 90):
        raise UserError(f"regularize_angles must be 90 or 45, not {cfg.regularize_angles}")
    existing_buildings.load(cfg.existing)


def save_footprints(pieces: list[Piece], transform, crs, geojson_path, cfg):
    """One scene's footprints with the output options (`config/shared/outputs.yaml`), written; returned.

    With `existing`, each footprint gets a `status` (`new` / `mapped`, lib.existing_buildings) and
    the new ones also go to `<stem>_new.geojson`.
    """
    gdf = footprints_frame(pieces, transform, crs, min_area=cfg.min_area, simplify=cfg.simplify,
                           regularize=cfg.regularize, angles=cfg.regularize_angles)
    existing = existing_buildings.load(cfg.existing)
    if existing is not None and gdf.crs is not None:
        gdf["status"] = existing_buildings.status(gdf, existing)
    elif existing is not None:
        print(f"warning: {Path(geojson_path).stem}: not georeferenced, so not compared with existing buildings")
    write_footprints(gdf, geojson_path, cfg.vector_format)
    return gdf


def write_footprints(gdf, geojson_path: str | os.PathLike, vector_format: str | None = "gpkg") -> list[Path]:
    """GeoJSON in EPSG:4326 (RFC 7946) and, with `vector_format`, a copy in the image CRS.

    When some outlines were squared, the unsquared ones go to `<stem>_raw.geojson` (a separate file,
    not a second GPKG layer, so readers that take "the" layer of a file get the footprints). A
    `status` column adds `<stem>_new.geojson`: the `new` footprints, tag building=yes, for an OSM import.
    """
    geojson_path = Path(geojson_path)
    raw = gdf.set_geometry("raw_geometry").drop(columns="geometry") if "raw_geometry" in gdf else None
    main = gdf.drop(columns="raw_geometry") if raw is not None else gdf
    written = [_write(main, geojson_path, "GeoJSON")]
    fmt = VECTOR_FORMATS.get(str(vector_format).lower() if vector_format else "none")
    if fmt is not None and fmt[1] != ".geojson":
        written.append(_write(main, geojson_path.with_suffix(fmt[1]), fmt[0], layer="footprints"))
    if raw is not None and bool(main["squared"].any()):
        written.append(_write(raw, geojson_path.with_name(f"{geojson_path.stem}_raw.geojson"), "GeoJSON"))
    if "status" in main:
        new = existing_buildings.new_buildings(main)
        written.append(_write(new, geojson_path.with_name(f"{geojson_path.stem}_new.geojson"), "GeoJSON"))
    return written


def _write(frame, path: Path, driver: str, layer: str | None = None) -> Path:
    """Write one frame atomically; GeoJSON is reprojected to EPSG:4326 (plain images stay in pixels)."""
    if driver == "GeoJSON" and frame.crs is not None:
        frame = frame.to_crs("EPSG:4326")
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*crs.*was not provided")
        frame.to_file(tmp, driver=driver, engine="pyogrio", **({"layer": layer} if layer else {}))
    return path

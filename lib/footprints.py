"""Building masks -> footprint polygons, streamed band by band so whole scenes never sit in memory.

Each band of mask rows is labelled into 4-connected components (the connectivity of
`rasterio.features.shapes`), vectorised in pixel coordinates, and measured (pixel count, sum of
probability). Components that touch a band edge may continue in the next band: they are kept aside
and merged by polygon union at the end, their measures summed. Finished polygons are simplified in
pixel units, filtered by area, moved to the image CRS with its affine transform, and written as
GeoJSON (EPSG:4326, as the format requires) and GeoPackage (image CRS).
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

from lib.files import atomic_path

logging.getLogger("pyogrio").setLevel(logging.WARNING)  # not "Created N records" for every file

VECTOR_FORMATS = {"gpkg": ("GPKG", ".gpkg"), "geojson": ("GeoJSON", ".geojson"), "none": None}


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


def polygonize(mask: np.ndarray, prob_u8: np.ndarray | None = None) -> list[Piece]:
    """Footprints of a whole in-memory mask (convenience for small images and tests)."""
    p = Polygonizer(*mask.shape)
    p.add(0, mask, prob_u8)
    return p.finish()


def footprints_frame(pieces: list[Piece], transform, crs, *, min_area: float = 0.0, simplify: float = 0.0,
                     pixel_area_m2: float | None = None):
    """GeoDataFrame of footprints in the image CRS (pixel coordinates when there is no CRS).

    `min_area` (pixels) drops small blobs; `simplify` is a tolerance in pixels. Columns: `area_px`,
    `area_m2` (None without georeferencing), `mean_prob` (0..1), `confidence` (= mean_prob, for scoring).
    """
    import geopandas as gpd

    pieces = [p for p in pieces if p.pixels >= max(min_area, 1)]
    geoms = np.array([p.geom for p in pieces], dtype=object)
    if simplify and len(geoms):
        geoms = shapely.simplify(geoms, simplify, preserve_topology=True)
    if crs is not None and transform is not None and len(geoms):
        a, b, c, d, e, f = tuple(transform)[:6]
        geoms = shapely.transform(geoms, lambda xy: np.column_stack([a * xy[:, 0] + b * xy[:, 1] + c,
                                                                       d * xy[:, 0] + e * xy[:, 1] + f]))
    mean_prob = [round(p.prob_sum / max(p.pixels, 1) / 255.0, 4) for p in pieces]
    gdf = gpd.GeoDataFrame({"area_px": [p.pixels for p in pieces], "mean_prob": mean_prob,
                            "confidence": mean_prob}, geometry=list(geoms), crs=crs)
    gdf["area_m2"] = _areas_m2(gdf) if crs is not None else None
    gdf.insert(0, "id", np.arange(len(gdf)))
    return gdf


def _areas_m2(gdf) -> list[float]:
    """Ground areas in m^2, measured in the local UTM zone (correct for geographic and Web Mercator too)."""
    if len(gdf) == 0:
        return []
    try:
        utm = gdf.estimate_utm_crs()
        return [round(float(a), 3) for a in gdf.to_crs(utm).area]
    except (RuntimeError, ValueError, CRSError):  # CRS without a geographic datum: report CRS units
        return [round(float(a), 3) for a in gdf.area]


def write_footprints(gdf, geojson_path: str | os.PathLike, vector_format: str | None = "gpkg") -> list[Path]:
    """GeoJSON in EPSG:4326 (RFC 7946) and, with `vector_format`, a copy in the image CRS."""
    geojson_path = Path(geojson_path)
    written = []
    out = gdf.to_crs("EPSG:4326") if gdf.crs is not None else gdf  # plain images: pixel (column, row)
    with atomic_path(geojson_path) as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*crs.*was not provided")
        out.to_file(tmp, driver="GeoJSON", engine="pyogrio")
    written.append(geojson_path)
    fmt = VECTOR_FORMATS.get(str(vector_format).lower() if vector_format else "none")
    if fmt is not None and fmt[1] != ".geojson":
        path = geojson_path.with_suffix(fmt[1])
        with atomic_path(path) as tmp, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*crs.*was not provided")
            gdf.to_file(tmp, driver=fmt[0], engine="pyogrio", layer="footprints")
        written.append(path)
    return written

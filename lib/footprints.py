"""Building masks -> footprint polygons, streamed band by band so neither a scene nor its buildings sit in memory.

Each block of mask rows is labelled into 4-connected components (the connectivity of
`rasterio.features.shapes`), vectorised in pixel coordinates, and measured (pixel count, sum of
probability). Components that touch a block edge may continue in the next block: they are kept
aside, and when the next band of rows begins they are merged by polygon union, their measures
summed; those that end above it are finished, so only pieces on the open seam wait. Finished
polygons are filtered by ground area (m^2; pixels for plain images), simplified or squared
(lib.regularize) in pixel units, moved to the image CRS with its affine transform, optionally
compared with buildings already mapped (lib.existing_buildings), and written as GeoJSON (EPSG:4326,
as the format requires) and GeoPackage (image CRS) -- by `FootprintWriter` as they are found, in
chunks of `STREAM_CHUNK` (a scene with fewer is written in one go, as `save_footprints` does).
A building is the same polygon whatever the blocks; where it crosses block seams, the vertex its
ring starts at may depend on them.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
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
from lib.files import AbortOnError, atomic_path
from lib.postprocess import resolve
from lib.regularize import MIN_IOU, square_polygons

logging.getLogger("pyogrio").setLevel(logging.WARNING)  # not "Created N records" for every file

VECTOR_FORMATS = {"gpkg": ("GPKG", ".gpkg"), "geojson": ("GeoJSON", ".geojson"), "none": None}
SQUARE_TOLERANCE = 1.5  # px: the least simplification used to find walls when squaring outlines
# default outline tolerance (`simplify: null`): at 7.5 cm a 1 px tolerance keeps the mask edge's wobble
# as walls, so most outlines failed the squaring's IoU gate (Kampala holdout, benchmarks/RESULTS.md)
OUTLINE_TOLERANCE_M = 0.15
# outlines that are not squared are simplified at this fraction of their size (sqrt of the area): a
# 20 m wide yard the model took for a building gets a handful of vertices instead of dozens
IRREGULAR_TOLERANCE = 0.05


@dataclass
class Piece:
    """A polygon in pixel coordinates with its pixel count and probability sum (0..255 units)."""

    geom: object
    pixels: int
    prob_sum: float


class Polygonizer:
    """Collect the footprints of a scene from blocks handed over in order (bands of rows top to bottom,
    the column blocks of a band before the next band).

    A component touching an inner block edge (not the scene border) may continue in the next block;
    it is kept aside. When the first block of a new band arrives, every row above it is complete:
    the pieces kept aside are merged by union, and those that cannot reach the new band (they end
    above it) are finished; only pieces touching the open seam stay in memory. Finished pieces go to
    `sink.add(pieces)` (e.g. a `FootprintWriter`) as they are found, or are kept for `finish()`.
    """

    def __init__(self, height: int, width: int, sink=None):
        self.height, self.width = height, width
        self.sink = sink
        self.done: list[Piece] = []
        self.open: list[Piece] = []
        self._band = 0  # first row of the band being handed over: every row above it is complete

    def add(self, row_off: int, mask: np.ndarray, prob_u8: np.ndarray | None = None, col_off: int = 0) -> None:
        self._next_block(row_off)
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
        finished = []
        for geom, label in shapes(labels, mask=labels > 0, connectivity=4,
                                  transform=Affine.translation(col_off, row_off)):
            label = int(label)
            piece = Piece(polygon_of(geom), int(counts[label]), float(sums[label]))
            (self.open if touches[label] else finished).append(piece)
        self._emit(finished)

    def _next_block(self, row_off: int) -> None:
        """A block at `row_off` arrives: the first of a new band closes the seams above it."""
        if row_off < self._band:
            raise ValueError(f"block at row {row_off} after the band at row {self._band}: blocks must come in "
                             "row order")
        if row_off > self._band:
            self._close_seams(row_off)
            self._band = row_off

    def finish(self) -> list[Piece]:
        """Merge the pieces still kept aside; return every footprint not already handed to the sink."""
        self._close_seams(self.height + 1)
        pieces, self.done = self.done, []
        return pieces

    def _emit(self, pieces: list[Piece]) -> None:
        if not pieces:
            return
        if self.sink is None:
            self.done.extend(pieces)
        else:
            self.sink.add(pieces)

    def _close_seams(self, row: int) -> None:
        """Merge the pieces kept aside; finish those that end above `row` (no later block reaches them)."""
        if not self.open:
            return
        merged = _merge_pieces(self.open)
        self.open = [p for p in merged if shapely.bounds(p.geom)[3] >= row]
        self._emit([p for p in merged if shapely.bounds(p.geom)[3] < row])


def polygon_of(geom: dict):
    """The shapely Polygon of one of `rasterio.features.shapes`' GeoJSON-like polygons: its rings as arrays,
    not the vertex-by-vertex tuples `shapely.geometry.shape` walks (a tenth of a 1024^2 tile's polygonizing)."""
    rings = geom["coordinates"]
    return shapely.Polygon(np.asarray(rings[0], dtype=float), [np.asarray(r, dtype=float) for r in rings[1:]])


def _merge_pieces(pieces: list[Piece]) -> list[Piece]:
    """Pieces of the same components (meeting along block edges) merged by union, their measures summed."""
    merged = shapely.get_parts(shapely.union_all([p.geom for p in pieces]))
    tree = shapely.STRtree(merged)
    acc = [[0, 0.0] for _ in merged]
    points = shapely.point_on_surface([p.geom for p in pieces])
    for i, j in zip(*tree.query(points, predicate="within")):
        acc[j][0] += pieces[i].pixels
        acc[j][1] += pieces[i].prob_sum
    return [Piece(g, a[0], a[1]) for g, a in zip(merged, acc)]


def outline_tolerance_px(simplify: float | None, m_per_px: np.ndarray | None, n: int) -> np.ndarray:
    """Per-footprint outline tolerance in pixels: `simplify` metres on the ground where the ground scale
    is known (`m_per_px`), pixels otherwise; None = OUTLINE_TOLERANCE_M, at least 1 px (1 px without a
    scale). In metres, one setting gives the same outlines from 5 cm drone and 50 cm satellite pixels."""
    if m_per_px is None:
        return np.full(n, 1.0 if simplify is None else float(simplify))
    m = np.asarray(m_per_px, dtype=float)
    safe = np.where(m > 0, m, 1.0)
    if simplify is None:
        return np.where(m > 0, np.maximum(OUTLINE_TOLERANCE_M / safe, 1.0), 1.0)
    return np.where(m > 0, float(simplify) / safe, float(simplify))


def irregular_outlines(raw: np.ndarray, simple: np.ndarray, tolerance: np.ndarray) -> np.ndarray:
    """Outlines that are not squared (round or irregular shapes) with few vertices too: simplified at
    IRREGULAR_TOLERANCE of their size (at least `tolerance` px), kept only where they still overlap the
    mask outline with IoU >= MIN_IOU (else `simple`, the outline at `tolerance`). A tolerance of 0 (exact
    pixel outlines asked for) keeps `simple`."""
    coarse = shapely.simplify(raw, np.maximum(tolerance, IRREGULAR_TOLERANCE * np.sqrt(shapely.area(raw))),
                              preserve_topology=True)
    inter = shapely.area(shapely.intersection(coarse, raw))
    iou = inter / np.maximum(shapely.area(coarse) + shapely.area(raw) - inter, 1e-12)
    return np.where(shapely.is_valid(coarse) & (iou >= MIN_IOU) & (tolerance > 0), coarse, simple)


def footprints_frame(pieces: list[Piece], transform, crs, *, min_area: float = 0.0, simplify: float | None = None,
                     regularize: bool = False, angles: int = 90, first_id: int = 0, metric=None,
                     gsd: float | None = None):
    """GeoDataFrame of footprints in the image CRS (pixel coordinates when there is no CRS).

    `min_area` drops small blobs: m^2 of ground when there is a CRS (measured in the local UTM zone,
    so degrees and metres agree), pixels for plain images. `simplify` is the outline tolerance
    (`outline_tolerance_px`): metres when there is a CRS or a `gsd` (m/px, for callers working on a
    pixel grid of known resolution), pixels otherwise.
    `regularize` squares outlines (lib.regularize, `angles` 90 or 45); the unsquared outline stays
    in the `raw_geometry` column. Columns: `area_px` (mask pixels), `area_m2` (of the written
    outline; None without georeferencing), `mean_prob` (0..1), `confidence` (= mean_prob, for
    scoring), `squared`. `id`s count from `first_id`; `metric` (default: the local UTM zone of these
    footprints, `metric_crs`) is the CRS ground areas are measured in, fixed by callers that make
    one scene's footprints chunk by chunk.
    """
    import geopandas as gpd

    raw = np.array([p.geom for p in pieces], dtype=object)
    pixels = np.array([p.pixels for p in pieces], dtype=float)
    georef = crs is not None and transform is not None
    scale = _m2_per_px2(raw, transform, crs, metric) if georef and len(raw) else np.ones(len(raw))
    keep = (pixels * scale >= min_area) & (pixels >= 1)
    pieces, raw, scale = [p for p, k in zip(pieces, keep) if k], raw[keep], scale[keep]
    m_per_px = np.sqrt(scale) if georef else (np.full(len(raw), float(gsd)) if gsd else None)
    tolerance = outline_tolerance_px(simplify, m_per_px, len(raw))
    simple = shapely.simplify(raw, tolerance, preserve_topology=True) if len(raw) and tolerance.any() else raw
    geoms, squared = simple, np.zeros(len(raw), bool)
    if regularize and len(raw):
        geoms, squared = square_polygons(raw, angles, np.maximum(tolerance, SQUARE_TOLERANCE))
        rest = ~squared  # only the outlines that stay unsquared need the coarse form
        geoms[rest] = irregular_outlines(raw[rest], simple[rest], tolerance[rest])
    area_m2 = [round(float(a), 3) for a in shapely.area(geoms) * scale] if georef else None
    mean_prob = [round(p.prob_sum / max(p.pixels, 1) / 255.0, 4) for p in pieces]
    gdf = gpd.GeoDataFrame({"id": np.arange(first_id, first_id + len(pieces)), "area_px": [p.pixels for p in pieces],
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


def _m2_per_px2(geoms: np.ndarray, transform, crs, metric=None) -> np.ndarray:
    """Ground m^2 per pixel^2 at each polygon."""
    px_area = shapely.area(geoms)
    ground = ground_geometries(geoms, transform, crs, metric)
    return np.where(px_area > 0, shapely.area(ground) / np.maximum(px_area, 1e-12), 0.0)


def ground_geometries(geoms, transform, crs, metric=None) -> np.ndarray:
    """Geometries in metres on the ground: through `transform` (pixels -> CRS), then `metric` (default:
    the local UTM zone of these geometries).

    Areas and angles measured there are true ones for geographic and Web Mercator CRSs too. Without a
    CRS, or for a CRS without a geographic datum, the geometries stay in their own units.
    """
    import geopandas as gpd

    geoms = _to_crs_coords(np.asarray(geoms, dtype=object), transform)
    if crs is None or len(geoms) == 0:
        return geoms
    if metric is None and _is_utm(crs):
        return geoms  # already the local metric CRS: skip estimating and reprojecting (per image, it adds up)
    world = gpd.GeoSeries(geoms, crs=crs)
    try:
        return world.to_crs(metric or world.estimate_utm_crs()).values
    except (RuntimeError, ValueError, CRSError):
        return geoms


@functools.lru_cache(maxsize=64)
def _utm_crs(wkt: str) -> bool:
    from pyproj import CRS

    try:
        return CRS.from_user_input(wkt).utm_zone is not None
    except CRSError:
        return False


def _is_utm(crs) -> bool:
    """Whether `crs` is a UTM zone (its metres are the local ground metres this module measures in)."""
    return _utm_crs(crs.to_wkt() if hasattr(crs, "to_wkt") else str(crs))


def metric_crs(geoms, transform, crs):
    """The local UTM zone of pixel-coordinate `geoms` (None: no CRS, or one without a geographic datum)."""
    import geopandas as gpd

    if crs is None or transform is None or len(geoms) == 0:
        return None
    try:
        return gpd.GeoSeries(_to_crs_coords(np.asarray(geoms, dtype=object), transform), crs=crs).estimate_utm_crs()
    except (RuntimeError, ValueError, CRSError):
        return None


def check_inputs(cfg) -> None:
    """Fail before any prediction on footprint options that cannot be used (e.g. the `existing` file)."""
    if cfg.regularize_angles not in (45, 90):
        raise UserError(f"regularize_angles must be 90 or 45, not {cfg.regularize_angles}")
    existing_buildings.load(cfg.existing)


def save_footprints(pieces: list[Piece], transform, crs, geojson_path, cfg):
    """One scene's footprints with the output options (`config/shared/outputs.yaml`), written; returned.

    With `existing`, each footprint gets a `status` (`new` / `mapped`, lib.existing_buildings) and
    the new ones also go to `<stem>_new.geojson`. Whole scenes at once: `FootprintWriter` streams.
    """
    gdf = _footprints(pieces, transform, crs, cfg)
    if existing_buildings.load(cfg.existing) is not None and gdf.crs is None:
        print(f"warning: {Path(geojson_path).stem}: not georeferenced, so not compared with existing buildings")
    write_footprints(gdf, geojson_path, cfg.vector_format)
    return gdf


def _footprints(pieces: list[Piece], transform, crs, cfg, first_id: int = 0, metric=None):
    """`footprints_frame` with the output options, plus `status` against `existing` when there is a CRS."""
    gdf = footprints_frame(pieces, transform, crs, min_area=resolve(cfg).min_area, simplify=cfg.simplify,
                           regularize=cfg.regularize, angles=cfg.regularize_angles, first_id=first_id,
                           metric=metric)
    existing = existing_buildings.load(cfg.existing)
    if existing is not None and gdf.crs is not None:
        gdf["status"] = existing_buildings.status(gdf, existing)
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


# --------------------------------------------------------------------------------------------------
# Streaming: a city's footprints, chunk by chunk
# --------------------------------------------------------------------------------------------------

STREAM_CHUNK = 20_000  # finished footprints held before a scene's files are written chunk by chunk


class FootprintWriter(AbortOnError):
    """A scene's footprints written as they are finished, so a city's never sit in memory together.

    The `Polygonizer`'s sink. Until `chunk` footprints have arrived nothing is written, and `close()`
    writes them as `save_footprints` does (a small scene's files are exactly those of one write).
    Past that, each chunk becomes footprints on its own -- filtering, simplification, squaring and
    the `existing` comparison are per footprint; the ground CRS found for the first chunk is kept for
    the rest, and ids go on counting -- and is appended to every output (`_Streams`). Everything is
    written to temporary names that `close()` renames; `abort()` (an exception in `with`) drops them.
    """

    def __init__(self, geojson_path, transform, crs, cfg, chunk: int | None = None):
        self.path = Path(geojson_path)
        self.transform, self.crs, self.cfg = transform, crs, cfg
        self.chunk = max(1, int(chunk or STREAM_CHUNK))
        self.pending: list[Piece] = []
        self.count = 0  # footprints written so far
        self.metric = None
        self._streams: _Streams | None = None
        if existing_buildings.load(cfg.existing) is not None and crs is None:
            print(f"warning: {self.path.stem}: not georeferenced, so not compared with existing buildings")

    def add(self, pieces: list[Piece]) -> None:
        self.pending.extend(pieces)
        if len(self.pending) >= self.chunk:
            self._flush()

    def _flush(self) -> None:
        pieces, self.pending = self.pending, []
        if self._streams is None:
            self.metric = metric_crs([p.geom for p in pieces], self.transform, self.crs)
            self._streams = _Streams(self.path, self.cfg.vector_format, keep_raw=bool(self.cfg.regularize))
        gdf = _footprints(pieces, self.transform, self.crs, self.cfg, self.count, self.metric)
        self._streams.write(gdf)
        self.count += len(gdf)

    def close(self) -> int:
        """Write what is left and put every file in place; returns the number of footprints."""
        if self._streams is None:  # a small scene: one write, as ever
            gdf = _footprints(self.pending, self.transform, self.crs, self.cfg)
            write_footprints(gdf, self.path, self.cfg.vector_format)
            self.pending, self.count = [], len(gdf)
            return self.count
        if self.pending:
            self._flush()
        self._streams.commit()
        return self.count

    def abort(self) -> None:
        if self._streams is not None:
            self._streams.abort()


class _Streams:
    """The files `write_footprints` writes, appended to chunk by chunk: the vector copy in the image CRS
    by pyogrio's append, the GeoJSON files through `_GeoJSONStream`. They grow in a scratch folder
    beside the targets and are moved over them by `commit()`; the folder goes in any case."""

    def __init__(self, geojson_path: Path, vector_format, keep_raw: bool = True):
        geojson_path.parent.mkdir(parents=True, exist_ok=True)
        self._scratch = tempfile.TemporaryDirectory(prefix=f".{geojson_path.stem}.", dir=geojson_path.parent)
        self.dir = Path(self._scratch.name)
        self.main = _GeoJSONStream(geojson_path, self.dir)
        self.raw = _GeoJSONStream(geojson_path.with_name(f"{geojson_path.stem}_raw.geojson"), self.dir) \
            if keep_raw else None  # unsquared outlines, kept where some are squared
        self.new: _GeoJSONStream | None = None
        fmt = VECTOR_FORMATS.get(str(vector_format).lower() if vector_format else "none")
        self.vector = (fmt[0], geojson_path.with_suffix(fmt[1])) if fmt is not None and fmt[1] != ".geojson" else None
        self.vector_rows = self.squared = 0
        self.empty = None  # the columns, for a vector file that would otherwise have no layer

    def write(self, gdf) -> None:
        raw = gdf.set_geometry("raw_geometry").drop(columns="geometry")
        main = gdf.drop(columns="raw_geometry")
        self.main.add(main)
        if self.raw is not None:
            self.raw.add(raw)
        self.squared += int(main["squared"].sum())
        if self.vector is not None and len(main):
            self._append_vector(main)
        self.empty = main.iloc[:0]
        if "status" in main:
            if self.new is None:
                self.new = _GeoJSONStream(self.main.path.with_name(f"{self.main.path.stem}_new.geojson"), self.dir)
            self.new.add(existing_buildings.new_buildings(main))

    def _append_vector(self, frame) -> None:
        import pyogrio

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*crs.*was not provided")
            pyogrio.write_dataframe(frame, self.dir / self.vector[1].name, driver=self.vector[0], layer="footprints",
                                    append=self.vector_rows > 0)
        self.vector_rows += len(frame)

    def commit(self) -> None:
        try:
            if self.vector is not None and not self.vector_rows:
                self._append_vector(self.empty)
            streams = [self.main, self.new, self.raw if self.squared else None]
            for stream in streams:
                if stream is not None:
                    stream.finish()
            if self.vector is not None:
                os.replace(self.dir / self.vector[1].name, self.vector[1])
            for stream in streams:
                if stream is not None:
                    os.replace(stream.tmp, stream.path)
        finally:
            self.abort()

    def abort(self) -> None:
        for stream in (self.main, self.raw, self.new):
            if stream is not None:
                stream.close()
        self._scratch.cleanup()


class _GeoJSONStream:
    """A GeoJSON FeatureCollection (EPSG:4326) written chunk by chunk, in constant memory.

    GDAL's GeoJSON driver rewrites the whole file to append to it (quadratic for a city), so each
    chunk is written by GDAL to a scratch file and its feature lines -- GDAL writes one feature per
    line -- are copied over: the file reads as one GDAL write of every feature.
    """

    HEAD, TAIL = '"features": [\n', "\n]\n}\n"

    def __init__(self, path: Path, scratch: Path):
        self.path = path
        self.tmp = scratch / f"out_{path.name}"
        self.chunk = scratch / f"{path.stem}.geojson"  # GDAL names the collection after the file
        self._out = None
        self._features = False

    def add(self, frame) -> None:
        if len(frame) == 0 and self._out is not None:
            return
        if frame.crs is not None:
            frame = frame.to_crs("EPSG:4326")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*crs.*was not provided")
            frame.to_file(self.chunk, driver="GeoJSON", engine="pyogrio")
        text = self.chunk.read_text()
        start = text.index(self.HEAD) + len(self.HEAD)
        if not text.endswith(self.TAIL):
            raise RuntimeError(f"{self.chunk}: unexpected GeoJSON layout from GDAL")
        if self._out is None:
            self._out = open(self.tmp, "w")  # noqa: SIM115 - closed by finish() or close()
            self._out.write(text[:start])
        body = text[start:len(text) - len(self.TAIL)]
        if body:
            self._out.write((",\n" if self._features else "") + body)
            self._features = True

    def finish(self) -> None:
        self._out.write(self.TAIL)
        self._out.close()

    def close(self) -> None:
        if self._out is not None and not self._out.closed:
            self._out.close()

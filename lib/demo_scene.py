"""The built-in demo: synthetic but realistic aerial scenes with exact building footprints.

A new user's first command needs data. This module draws small drone-like scenes -- an RGBA GeoTIFF in
UTM (EPSG:32636, 10 cm/px) with textured ground (grass and soil patches, fine noise), roads, trees,
rotated rectangular and L-shaped roofs (corrugated grey/blue metal, rusty red, terracotta, white) with
shadows, dense clusters (rows of 2-4 roofs sharing walls, as in informal settlements: one label polygon
per roof, neighbours sharing an edge, so instance separation has something to separate), and a no-data corner (alpha 0) -- together with their footprints as GeoJSON in EPSG:4326, and
writes them in the Open Cities STAC layout plus a held-out labelled test scene:

    <demo_dir>/catalog.json -> demo/collection.json -> demo/<scene>/<scene>.{json,tif}
                                                    -> demo/<scene>-labels/<scene>-labels.json + .geojson
    <demo_dir>/train_metadata.csv                       (the same scenes as an img_uri,label_uri index)
    <demo_dir>/test/images/demo_test.tif + test/labels/demo_test.geojson

Everything is a deterministic function of the seed. `generate_scene` is vectorised enough
(cv2.fillPoly for all roofs and shadows of a colour at once) to draw benchmark scenes with tens of
thousands of buildings in seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from lib.cli import demo_dir

GENERATOR_VERSION = 5  # 5: dense clusters of touching roofs
DEMO_SEED = 20200
DEMO_CRS = "EPSG:32636"  # UTM 36N: Kampala, where the Open Cities training data starts
DEMO_GSD = 0.1
DEMO_ORIGIN = (452_000.0, 40_000.0)  # upper-left corner, metres
TRAIN_SCENES = (("demo_a", 1280), ("demo_b", 1280), ("demo_c", 1280))
TEST_SCENE = ("demo_test", 1024)
CELL_METRES = 11.0  # one building lot; roofs are 3.5-9 m across
CLUSTER_SHARE = 0.25  # lots holding a row of 2-4 touching roofs (shared walls, as in informal settlements)
ROW_SIZES = (2, 3, 4)  # roofs per row, equally likely
DATETIME = "2020-01-01T00:00:00Z"
LABEL_EXTENSION = "https://stac-extensions.github.io/label/v1.0.1/schema.json"

# Roof materials: (name, RGB, probability, corrugated, gabled)
ROOFS = (
    ("metal_grey", (168, 170, 172), 0.30, True, False),
    ("metal_blue", (62, 104, 158), 0.14, True, False),
    ("rusty_red", (138, 68, 44), 0.20, True, False),
    ("terracotta", (192, 98, 62), 0.16, False, True),
    ("white", (228, 228, 222), 0.12, False, False),
    ("concrete", (128, 126, 122), 0.08, False, False),
)
GRASS = np.array([88, 118, 58], np.float32)
SOIL = np.array([156, 124, 92], np.float32)
ROAD = np.array([112, 106, 100], np.float32)
DIRT_ROAD = np.array([172, 120, 84], np.float32)
TREE = np.array([46, 76, 38], np.float32)
GRAVEL = np.array([150, 146, 138], np.float32)


@dataclass
class SyntheticScene:
    """A drawn scene: RGBA [4, H, W] uint8, its georeferencing, and footprints in `crs` metres."""

    rgba: np.ndarray
    transform: object  # affine.Affine
    crs: str
    footprints: list  # shapely Polygons in the CRS
    roofs: list[str]  # roof material of each footprint
    drawn: np.ndarray | None = None  # [H, W] bool: pixels painted as roof (checks label alignment)


def _smooth_noise(rng, shape, cell_px: float) -> np.ndarray:
    """Zero-mean, unit-ish noise varying over about `cell_px` pixels (upsampled random grid)."""
    h, w = shape
    small = rng.standard_normal((max(2, int(h / cell_px) + 2), max(2, int(w / cell_px) + 2)), dtype=np.float32)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def _ground(rng, shape, gsd: float) -> np.ndarray:
    """Grass and bare-soil patches at several scales plus fine grain, as float32 RGB."""
    patches = _smooth_noise(rng, shape, 12 / gsd) + 0.5 * _smooth_noise(rng, shape, 3 / gsd)
    t = 1 / (1 + np.exp(-2.5 * patches))  # 0 = grass, 1 = soil
    light = 1 + 0.06 * _smooth_noise(rng, shape, 1.0 / gsd)
    grain = 7 * rng.standard_normal(shape, dtype=np.float32)
    img = np.stack([(g + (s - g) * t) * light + grain for g, s in zip(GRASS, SOIL)], axis=-1)
    # Irregular gravel / concrete yards: roof-like colours without a roof's straight edges or shadow,
    # so a model has to learn shape, not only colour.
    yards = _smooth_noise(rng, shape, 4 / gsd) > 1.1
    img[yards] = GRAVEL * light[yards][:, None] + grain[yards][:, None]
    return img


def _polygon_px(cx, cy, length, width, angle, l_cut=None) -> np.ndarray:
    """Roof outline in pixel-corner coordinates: a rotated rectangle, or an L when `l_cut`=(fx, fy)."""
    hl, hw = length / 2, width / 2
    if l_cut is None:
        local = np.array([[-hl, -hw], [hl, -hw], [hl, hw], [-hl, hw]])
    else:
        fx, fy = l_cut  # fraction of the length/width removed at one corner
        local = np.array([[-hl, -hw], [hl, -hw], [hl, hw - 2 * hw * fy], [hl - 2 * hl * fx, hw - 2 * hw * fy],
                          [hl - 2 * hl * fx, hw], [-hl, hw]])
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    return local @ rot.T + np.array([cx, cy])


def _layout(rng, shape, cell: float):
    """Lots on a jittered grid; a few grid rows/columns become roads. Returns (lots, road lines)."""
    h, w = shape
    rows, cols = max(1, int(h // cell)), max(1, int(w // cell))
    road_rows = set(rng.choice(rows, size=max(1, rows // 6), replace=False).tolist()) if rows > 3 else set()
    road_cols = set(rng.choice(cols, size=max(1, cols // 7), replace=False).tolist()) if cols > 3 else set()
    oy, ox = (h - rows * cell) / 2, (w - cols * cell) / 2
    lots = [(ox + (c + 0.5) * cell, oy + (r + 0.5) * cell) for r in range(rows) for c in range(cols)
            if r not in road_rows and c not in road_cols]
    roads = [((0, oy + (r + 0.5) * cell), (w, oy + (r + 0.5) * cell)) for r in sorted(road_rows)]
    roads += [((ox + (c + 0.5) * cell, 0), (ox + (c + 0.5) * cell, h)) for c in sorted(road_cols)]
    return lots, roads


def _row(rng, cx, cy, cell: float, angle: float) -> list[np.ndarray]:
    """A row of 2-4 rectangular roofs sharing walls: neighbours have the same two wall vertices exactly."""
    k = int(rng.choice(ROW_SIZES))
    room = cell / 2 - max(2.0, 0.06 * cell)
    length, width = cell * rng.uniform(0.7, 0.85), cell * rng.uniform(0.3, 0.42)
    radius = np.hypot(length, width) / 2
    if radius > room:
        length, width = length * room / radius, width * room / radius
    u, v = np.array([np.cos(angle), np.sin(angle)]), np.array([-np.sin(angle), np.cos(angle)])
    cuts = np.linspace(-length / 2, length / 2, k + 1)[:, None] * u + np.array([cx, cy])
    walls = [(p - width / 2 * v, p + width / 2 * v) for p in cuts]
    return [np.array([walls[i][0], walls[i + 1][0], walls[i + 1][1], walls[i][1]]) for i in range(k)]


def _buildings(rng, lots, cell: float, occupancy: float, clusters: float = CLUSTER_SHARE):
    """Roof polygons (pixel coords), materials and heights for a random subset of lots; a share
    `clusters` of the occupied lots holds a row of touching roofs instead of one building."""
    lots = [lot for lot in lots if rng.random() < occupancy]
    n = len(lots)
    probs = np.array([r[2] for r in ROOFS])
    kinds = rng.choice(len(ROOFS), size=n, p=probs / probs.sum())
    base_angle = rng.uniform(0, np.pi / 2)
    rows = rng.random(n) < clusters
    polys, heights, out_kinds = [], [], []
    for (cx, cy), kind, row in zip(lots, kinds, rows):
        if row:
            units = _row(rng, cx, cy, cell, base_angle + rng.normal(0, 0.05))
            polys += units
            heights += [rng.uniform(0.04, 0.07) * cell] * len(units)
            out_kinds += list(rng.choice(len(ROOFS), size=len(units), p=probs / probs.sum()))
            continue
        out_kinds.append(kind)
        length = cell * rng.uniform(0.42, 0.78)
        width = length * rng.uniform(0.5, 0.85)
        angle = base_angle + rng.normal(0, 0.12) + (np.pi / 2 if rng.random() < 0.3 else 0)
        l_cut = (rng.uniform(0.35, 0.55), rng.uniform(0.35, 0.55)) if rng.random() < 0.3 else None
        radius = np.hypot(length, width) / 2
        room = cell / 2 - max(2.0, 0.06 * cell)
        if radius > room:
            length, width = length * room / radius, width * room / radius
        jitter = max(0.0, room - np.hypot(length, width) / 2)
        cx, cy = cx + rng.uniform(-jitter, jitter), cy + rng.uniform(-jitter, jitter)
        polys.append(_polygon_px(cx, cy, length, width, angle, l_cut))
        heights.append(rng.uniform(0.05, 0.11) * cell)
    return polys, np.asarray(out_kinds, int), np.asarray(heights)


def _fill(image, polys, value) -> None:
    """Draw polygons with sub-pixel vertices (cv2 treats integer coordinates as pixel centres)."""
    shift = 4
    for n in sorted({len(p) for p in polys}):
        group = np.stack([p for p in polys if len(p) == n])
        pts = np.round(group * (1 << shift)).astype(np.int32)
        cv2.fillPoly(image, list(pts), value, lineType=cv2.LINE_8, shift=shift)


def _draw_roof_detail(img, ids, roof_id, poly, colour, corrugated: bool, gabled: bool, angle: float, rng) -> None:
    """Corrugation stripes, a gable ridge and a dark rim inside one roof (demo scenes only)."""
    h, w = img.shape[:2]
    x0, y0 = np.maximum(np.floor(poly.min(0)).astype(int) - 1, 0)
    x1, y1 = np.minimum(np.ceil(poly.max(0)).astype(int) + 1, [w, h])
    if x1 <= x0 or y1 <= y0:
        return
    inside = ids[y0:y1, x0:x1] == roof_id
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5
    cx, cy = poly.mean(0)
    u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
    v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
    shade = np.ones_like(u)
    if corrugated:
        shade *= 1 + 0.07 * np.sin(2 * np.pi * u / rng.uniform(3.0, 5.0))
    if gabled:
        shade *= np.where(v > 0, 1.0, 0.82)  # ridge along the long axis: one face in the sun
    rim = cv2.erode(inside.astype(np.uint8), np.ones((3, 3), np.uint8)) == 0
    shade[rim & inside] *= 0.75
    roof = colour * shade[..., None] + 3 * rng.standard_normal(shade.shape + (3,), dtype=np.float32)
    region = img[y0:y1, x0:x1]
    region[inside] = roof[inside]


def _pixel_polygons(polys: list[np.ndarray]) -> np.ndarray:
    """Shapely polygons from vertex arrays, built in vectorised groups of equal vertex count."""
    import shapely

    out = np.empty(len(polys), dtype=object)
    counts = np.array([len(p) for p in polys])
    for n in np.unique(counts):
        idx = np.flatnonzero(counts == n)
        rings = np.stack([polys[i] for i in idx])
        out[idx] = shapely.polygons(np.concatenate([rings, rings[:, :1]], axis=1))
    return out


def generate_scene(seed: int, size: tuple[int, int] = (1280, 1280), gsd: float = DEMO_GSD,
                   origin: tuple[float, float] = DEMO_ORIGIN, crs: str = DEMO_CRS, cell_m: float = CELL_METRES,
                   occupancy: float = 0.9, detail: bool = True, nodata_corner: bool = True,
                   clusters: float = CLUSTER_SHARE) -> SyntheticScene:
    """Draw one scene of `size` (height, width) pixels. Deterministic in `seed`.

    Roofs are painted from a rasterisation of the footprints themselves (pixel-centre rule), so the
    labels match the painted roofs exactly; `detail=False` skips per-roof texture (benchmark scenes);
    `clusters` is the share of occupied lots holding a row of touching roofs (0 = detached houses only).
    """
    import shapely
    from affine import Affine
    from rasterio.features import rasterize

    rng = np.random.default_rng(seed)
    shape = (int(size[0]), int(size[1]))
    cell = cell_m / gsd
    img = _ground(rng, shape, gsd)
    lots, roads = _layout(rng, shape, cell)
    road_px = max(3, round(0.45 * cell))
    paved = rng.random(len(roads)) < 0.5
    for colour, sel in ((ROAD, paved), (DIRT_ROAD, ~paved)):
        layer = np.zeros(shape, np.uint8)
        for (p, q), on in zip(roads, sel):
            if on:
                cv2.line(layer, tuple(map(int, p)), tuple(map(int, q)), 255, road_px)
        on = layer > 0
        img[on] = colour + 6 * rng.standard_normal((int(on.sum()), 3), dtype=np.float32)
    polys, kinds, heights = _buildings(rng, lots, cell, occupancy, clusters)  # vertices in pixel-corner coordinates
    pixel_geoms = _pixel_polygons(polys) if polys else np.empty(0, dtype=object)
    ids = np.zeros(shape, np.int32)
    if len(pixel_geoms):
        ids = rasterize(zip(pixel_geoms, range(1, len(polys) + 1)), out_shape=shape, dtype="int32")
    roof = ids > 0
    # Shadows (sun from the upper left): roofs and tree crowns offset down-right, darkening the ground.
    n_trees = int(len(lots) * 0.6)
    tx, ty = rng.uniform(0, shape[1], n_trees), rng.uniform(0, shape[0], n_trees)
    tr = rng.uniform(0.12, 0.3, n_trees) * cell
    shadow = np.zeros(shape, np.uint8)
    _fill(shadow, [p - 0.5 + [h, 0.6 * h] for p, h in zip(polys, heights)], 255)
    for x, y, r in zip(tx, ty, tr):
        cv2.circle(shadow, (int(x + 0.5 * r), int(y + 0.4 * r)), int(r), 255, -1)
    shadow = cv2.GaussianBlur(shadow, (5, 5), 0)
    shaded = shadow > 0
    img[shaded] *= (1 - 0.5 / 255 * shadow[shaded].astype(np.float32))[:, None]
    # Trees on free ground only (never over roofs, so the labels match what is visible).
    trees = np.zeros(shape, np.uint8)
    for x, y, r in zip(tx, ty, tr):
        cv2.circle(trees, (int(x), int(y)), int(r), 255, -1)
    trees = (trees > 0) & (cv2.dilate(roof.astype(np.uint8), np.ones((5, 5), np.uint8)) == 0)
    img[trees] = TREE * (1 + 0.18 * rng.standard_normal((int(trees.sum()), 1), dtype=np.float32))
    # Roofs.
    tones = rng.normal(1, 0.07, (len(polys), 1)) * np.array([ROOFS[k][1] for k in kinds]).reshape(-1, 3)
    colours = np.clip(tones + rng.normal(0, 4, (len(polys), 3)), 0, 255).astype(np.float32)
    if detail:
        for i, (poly, kind) in enumerate(zip(polys, kinds)):
            edge = poly[1] - poly[0]
            _draw_roof_detail(img, ids, i + 1, poly, colours[i], ROOFS[kind][3], ROOFS[kind][4],
                              np.arctan2(edge[1], edge[0]), rng)
    elif len(polys):
        img[roof] = colours[ids[roof] - 1] + 4 * rng.standard_normal((int(roof.sum()), 3), dtype=np.float32)
    img = cv2.GaussianBlur(img, (3, 3), 0.6)  # optics: edges are never razor sharp
    rgb = np.clip(img, 0, 255).astype(np.uint8)
    del img
    alpha = np.full(shape, 255, np.uint8)
    if nodata_corner:  # orthophoto edge: a triangle without imagery
        h, w = shape
        a, b = int(w * rng.uniform(0.2, 0.35)), int(h * rng.uniform(0.2, 0.35))
        cv2.fillPoly(alpha, [np.array([[0, h - b], [a, h], [0, h]], np.int32)], 0)
        rgb[alpha == 0] = 0
    transform = Affine(gsd, 0, origin[0], 0, -gsd, origin[1])
    footprints = list(shapely.transform(pixel_geoms, lambda xy: xy * [gsd, -gsd] + origin)) if polys else []
    return SyntheticScene(np.concatenate([np.moveaxis(rgb, -1, 0), alpha[None]]), transform, crs, footprints,
                          [ROOFS[k][0] for k in kinds], roof)


def size_for_buildings(n_buildings: int, cell_px: float, occupancy: float = 0.9,
                       clusters: float = CLUSTER_SHARE) -> int:
    """Side in pixels of a square scene holding about `n_buildings` (roads take about 1/6 of the lots;
    a clustered lot holds a row of ROW_SIZES roofs)."""
    per_lot = 1 + clusters * (float(np.mean(ROW_SIZES)) - 1)
    lots = n_buildings / per_lot / occupancy / (5 / 6 * 6 / 7)
    return int(np.ceil(np.sqrt(lots) * cell_px))


def write_scene(scene: SyntheticScene, image_path: Path, labels_path: Path, compress: str | None = "deflate") -> None:
    """Write the RGBA GeoTIFF (tiled, alpha band) and the footprints as GeoJSON in EPSG:4326."""
    import geopandas as gpd
    import rasterio

    image_path.parent.mkdir(parents=True, exist_ok=True)
    labels_path.parent.mkdir(parents=True, exist_ok=True)
    _, h, w = scene.rgba.shape
    profile = {"driver": "GTiff", "width": w, "height": h, "count": 4, "dtype": "uint8", "crs": scene.crs,
               "transform": scene.transform, "tiled": True, "blockxsize": 256, "blockysize": 256,
               "photometric": "RGB", "alpha": "YES", "interleave": "pixel"}
    if compress:
        profile["compress"] = compress
    with rasterio.open(image_path, "w", **profile) as dst:
        dst.write(scene.rgba)
        dst.update_tags(generator=f"demo_scene v{GENERATOR_VERSION}")
    gdf = gpd.GeoDataFrame({"building": ["yes"] * len(scene.footprints), "roof": scene.roofs},
                           geometry=scene.footprints, crs=scene.crs).to_crs("EPSG:4326")
    if labels_path.exists():
        labels_path.unlink()
    gdf.to_file(labels_path, driver="GeoJSON")


def big_scene(n_buildings: int, seed: int = 0, gsd: float = 0.3) -> SyntheticScene:
    """A benchmark scene with about `n_buildings` roofs (flat-coloured, vectorised drawing)."""
    cell_px = CELL_METRES / gsd
    side = size_for_buildings(n_buildings, cell_px)
    return generate_scene(seed, (side, side), gsd=gsd, detail=False, nodata_corner=False)


def _stac_item(scene_id: str, scene: SyntheticScene):
    import geopandas as gpd
    import pystac
    from shapely.geometry import box, mapping

    _, h, w = scene.rgba.shape
    left, top = scene.transform * (0, 0)
    right, bottom = scene.transform * (w, h)
    footprint = gpd.GeoSeries([box(left, bottom, right, top)], crs=scene.crs).to_crs("EPSG:4326").iloc[0]
    return pystac.Item(id=scene_id, geometry=mapping(footprint), bbox=list(footprint.bounds),
                       datetime=pystac.utils.str_to_datetime(DATETIME), properties={})


def _write_catalog(root: Path, scenes: dict[str, SyntheticScene]) -> None:
    """Open Cities-style STAC: catalog -> collection `demo` -> image items + label items with `source`."""
    import pystac

    catalog = pystac.Catalog(id="demo", description="Synthetic demo scenes in the Open Cities AI Challenge layout")
    when = pystac.utils.str_to_datetime(DATETIME)
    collection = pystac.Collection(
        id="demo", description="Synthetic drone-like scenes with building footprints", license="CC0-1.0",
        extent=pystac.Extent(pystac.SpatialExtent([[-180, -90, 180, 90]]), pystac.TemporalExtent([[when, when]])))
    catalog.add_child(collection)
    for scene_id, scene in scenes.items():
        folder = root / "demo" / scene_id
        label_folder = root / "demo" / f"{scene_id}-labels"
        write_scene(scene, folder / f"{scene_id}.tif", label_folder / f"{scene_id}.geojson")
        image_item = _stac_item(scene_id, scene)
        image_item.add_asset("image", pystac.Asset(href=str(folder / f"{scene_id}.tif"), roles=["data"],
                                                   media_type=pystac.MediaType.GEOTIFF))
        label_item = _stac_item(f"{scene_id}-labels", scene)
        label_item.stac_extensions.append(LABEL_EXTENSION)
        label_item.properties.update({"label:description": "building footprints", "label:type": "vector",
                                      "label:properties": None, "label:classes": [], "label:tasks": ["segmentation"]})
        label_item.add_asset("labels", pystac.Asset(href=str(label_folder / f"{scene_id}.geojson"), roles=["labels"],
                                                    media_type=pystac.MediaType.GEOJSON))
        label_item.add_link(pystac.Link("source", image_item, media_type=pystac.MediaType.JSON))
        collection.add_items([image_item, label_item])
    catalog.normalize_hrefs(str(root))
    catalog.make_all_asset_hrefs_relative()
    catalog.save(pystac.CatalogType.SELF_CONTAINED)


def write_demo(root: Path, seed: int = DEMO_SEED) -> dict:
    """Generate the whole demo (training catalog, csv index, held-out test scene) into `root`."""
    root.mkdir(parents=True, exist_ok=True)
    scenes = {name: generate_scene(seed + i, (side, side)) for i, (name, side) in enumerate(TRAIN_SCENES)}
    _write_catalog(root, scenes)
    rows = ["img_uri,label_uri"] + [f"demo/{n}/{n}.tif,demo/{n}-labels/{n}.geojson" for n in scenes]
    (root / "train_metadata.csv").write_text("\n".join(rows) + "\n")
    test_name, test_side = TEST_SCENE
    test = generate_scene(seed + 100, (test_side, test_side))
    write_scene(test, root / "test" / "images" / f"{test_name}.tif", root / "test" / "labels" / f"{test_name}.geojson")
    info = {"generator_version": GENERATOR_VERSION, "seed": seed, "crs": DEMO_CRS, "gsd": DEMO_GSD,
            "train": {n: len(s.footprints) for n, s in scenes.items()}, "test": {test_name: len(test.footprints)}}
    (root / "demo.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def _is_current(root: Path) -> bool:
    try:
        info = json.loads((root / "demo.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return info.get("generator_version") == GENERATOR_VERSION and (root / "catalog.json").exists()


def ensure_demo_scene(root: str | os.PathLike | None = None) -> Path:
    """The demo folder, generated on first use (into a temporary folder renamed into place).

    Concurrent callers are safe: whoever renames first wins and the others discard their copy.
    An out-of-date demo (older generator version) is regenerated; derived folders such as `chips/`
    inside it go with it.
    """
    root = Path(root) if root is not None else demo_dir()
    if _is_current(root):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-new-", dir=root.parent))
    try:
        write_demo(tmp / root.name)  # a plain folder name: STAC href layout treats "a.b" as a file
        if root.exists() and not _is_current(root):
            os.replace(root, tmp / "stale")
        try:
            os.rename(tmp / root.name, root)
        except OSError:
            if not _is_current(root):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


if __name__ == "__main__":
    path = ensure_demo_scene()
    print(json.dumps(json.loads((path / "demo.json").read_text()), indent=2))
    print(f"demo scene ready in {path}")


def write_repeated_scene(path: str | os.PathLike, height: int, width: int, block: int = 1024, seed: int = 7) -> Path:
    """A large RGBA GeoTIFF of `height` x `width` px tiled from one generated `block`^2 demo scene, written
    block by block (benchmarks of big scenes: no big array in memory, the same look everywhere)."""
    import rasterio
    from rasterio.windows import Window

    scene = generate_scene(seed, size=(block, block), detail=False, nodata_corner=False)
    profile = {"driver": "GTiff", "width": width, "height": height, "count": 4, "dtype": "uint8",
               "crs": scene.crs, "transform": scene.transform, "tiled": True, "blockxsize": 256,
               "blockysize": 256, "compress": "deflate", "photometric": "RGB"}
    with rasterio.open(path, "w", **profile) as dst:
        for r in range(0, height, block):
            for c in range(0, width, block):
                h, w = min(block, height - r), min(block, width - c)
                dst.write(scene.rgba[:, :h, :w], window=Window(c, r, w, h))
    return Path(path)

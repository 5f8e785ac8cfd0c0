"""lib/footprints.py: masks -> polygons (streamed by blocks), measured, placed in the image CRS, written."""

import cv2
import geopandas as gpd
import numpy as np
import pytest
import shapely
from rasterio.transform import from_origin
from standins import polygonize

from lib import footprints


def test_footprints_from_blocks_equal_footprints_of_the_whole_mask():
    rng = np.random.default_rng(3)
    mask = cv2.GaussianBlur(rng.random((300, 500)).astype(np.float32), (0, 0), 6) > 0.5
    mask[40:200, 90:110] = True  # a long building across many blocks
    mask[100:120, 20:480] = True
    prob = rng.integers(0, 256, mask.shape).astype(np.uint8)
    whole = polygonize(mask, prob)
    poly = footprints.Polygonizer(*mask.shape)
    for r in range(0, 300, 64):
        for c in range(0, 500, 100):
            poly.add(r, mask[r:r + 64, c:c + 100], prob[r:r + 64, c:c + 100], c)
    blocks = poly.finish()

    def key(p):
        return p.pixels, p.prob_sum

    assert sorted(map(key, blocks)) == sorted(map(key, whole)) and len(whole) > 5
    union_a = shapely.union_all([p.geom for p in whole])
    union_b = shapely.union_all([p.geom for p in blocks])
    assert union_a.symmetric_difference(union_b).area == 0 and union_a.area == mask.sum()


def _two_buildings():
    mask = np.zeros((100, 120), bool)
    mask[10:30, 10:50] = True  # 800 px
    mask[60:65, 100:105] = True  # 25 px
    prob = np.where(mask, 204, 0).astype(np.uint8)  # 0.8
    return mask, prob


def test_known_mask_gives_polygons_with_pixel_and_ground_areas_in_the_image_crs():
    mask, prob = _two_buildings()
    transform = from_origin(500000, 4000000, 0.5, 0.5)  # 0.5 m pixels in UTM 32N
    gdf = footprints.footprints_frame(polygonize(mask, prob), transform, "EPSG:32632")
    assert gdf.crs.to_epsg() == 32632
    gdf = gdf.sort_values("area_px", ascending=False)
    assert gdf["area_px"].tolist() == [800, 25]
    assert gdf["area_m2"].tolist() == pytest.approx([200.0, 6.25], rel=1e-3)
    assert gdf["mean_prob"].tolist() == pytest.approx([0.8, 0.8])
    assert tuple(gdf.geometry.iloc[0].bounds) == pytest.approx((500005.0, 3999985.0, 500025.0, 3999995.0))


def test_min_area_drops_small_blobs_and_plain_images_stay_in_pixel_coordinates():
    mask, prob = _two_buildings()
    gdf = footprints.footprints_frame(polygonize(mask, prob), None, None, min_area=30)
    assert len(gdf) == 1 and gdf.crs is None and gdf["area_m2"].isna().all()
    assert tuple(gdf.geometry.iloc[0].bounds) == (10.0, 10.0, 50.0, 30.0)


def test_footprints_are_written_as_epsg4326_geojson_beside_a_gpkg_in_the_image_crs(tmp_path):
    mask, prob = _two_buildings()
    gdf = footprints.footprints_frame(polygonize(mask, prob), from_origin(500000, 4000000, 0.5, 0.5),
                                      "EPSG:32632")
    written = footprints.write_footprints(gdf, tmp_path / "scene.geojson", "gpkg")
    assert written == [tmp_path / "scene.geojson", tmp_path / "scene.gpkg"]
    gj, gp = gpd.read_file(written[0]), gpd.read_file(written[1])
    assert gj.crs.to_epsg() == 4326 and gp.crs.to_epsg() == 32632 and len(gj) == len(gp) == 2
    assert gj.to_crs(32632).area.sum() == pytest.approx(206.25, rel=1e-3)


def _grids():
    """The same 0.5 m grid at one place in UTM 32N and (approximately) in longitude/latitude."""
    from pyproj import Transformer

    utm = from_origin(500000, 4000000, 0.5, 0.5)
    to_ll = Transformer.from_crs(32632, 4326, always_xy=True)
    lon0, lat0 = to_ll.transform(500000, 4000000)
    lon1, lat1 = to_ll.transform(500100, 3999900)
    ll = from_origin(lon0, lat0, (lon1 - lon0) / 200, (lat0 - lat1) / 200)
    return (utm, "EPSG:32632"), (ll, "EPSG:4326")


def test_min_area_and_area_m2_are_ground_square_metres_in_utm_and_in_degrees_alike():
    mask, prob = _two_buildings()  # 800 px = 200 m^2 and 25 px = 6.25 m^2 on a 0.5 m grid
    frames = [footprints.footprints_frame(polygonize(mask, prob), t, crs, min_area=10)
              for t, crs in _grids()]
    for gdf in frames:
        assert gdf["area_px"].tolist() == [800]  # the 6.25 m^2 blob is dropped in both
    assert frames[1]["area_m2"].iloc[0] == pytest.approx(frames[0]["area_m2"].iloc[0], rel=1e-3)
    assert frames[0]["area_m2"].iloc[0] == pytest.approx(200.0, rel=1e-3)


def test_squared_footprints_keep_their_raw_outlines_in_a_raw_geojson(tmp_path):
    mask = np.zeros((200, 200), np.uint8)
    cv2.fillPoly(mask, [cv2.boxPoints(((80, 80), (90, 40), 25)).astype(np.int32)], 1)
    cv2.circle(mask, (150, 150), 30, 1, -1)
    gdf = footprints.footprints_frame(polygonize(mask.astype(bool)), from_origin(500000, 4000000, 0.5, 0.5),
                                      "EPSG:32632", simplify=0.0, regularize=True)
    gdf = gdf.sort_values("area_px", ascending=False).reset_index(drop=True)
    assert gdf["squared"].tolist() == [True, False]  # the rectangle is squared, the round one is not
    assert len(gdf.geometry.iloc[0].exterior.coords) == 5
    assert gdf["area_m2"].iloc[0] == pytest.approx(gdf["area_px"].iloc[0] * 0.25, rel=0.03)
    written = footprints.write_footprints(gdf, tmp_path / "scene.geojson", "gpkg")
    assert [p.name for p in written] == ["scene.geojson", "scene.gpkg", "scene_raw.geojson"]
    main, raw = gpd.read_file(written[0]), gpd.read_file(written[2])
    assert main["squared"].tolist() == raw["squared"].tolist() and len(raw.geometry.iloc[0].exterior.coords) > 50


def test_existing_buildings_mark_predictions_mapped_or_new_and_new_ones_are_written_for_osm(tmp_path):
    from lib import existing_buildings
    from lib.cli import compose_config

    mask = np.zeros((200, 200), bool)
    mask[10:50, 10:50] = True    # 20 x 20 m: mapped (IoU 0.64 with an existing building)
    mask[100:120, 10:30] = True  # inside a large existing outline (covers all of it): mapped
    mask[100:140, 150:190] = True  # nothing there: new
    t, crs = from_origin(500000, 4000000, 0.5, 0.5), "EPSG:32632"
    x0, y0 = 500000, 4000000
    existing = gpd.GeoDataFrame(geometry=[shapely.box(x0 + 5, y0 - 25, x0 + 25, y0 - 9),
                                          shapely.box(x0 + 2, y0 - 70, x0 + 40, y0 - 45)], crs=crs).to_crs(4326)
    existing.to_file(tmp_path / "osm.geojson")
    cfg = compose_config("inference", [f"existing={tmp_path / 'osm.geojson'}", "vector_format=geojson"])
    gdf = footprints.save_footprints(polygonize(mask), t, crs, tmp_path / "scene.geojson", cfg)
    by_x = gdf.assign(x=gdf.geometry.centroid.x).sort_values(["x", "area_px"])
    assert by_x["status"].tolist() == ["mapped", "mapped", "new"]
    new = gpd.read_file(tmp_path / "scene_new.geojson")
    assert new.crs.to_epsg() == 4326 and new["building"].tolist() == ["yes"] and list(new.columns) == ["building",
                                                                                                      "geometry"]
    assert new.to_crs(crs).geometry.iloc[0].centroid.distance(by_x.geometry.iloc[2].centroid) < 0.01
    assert existing_buildings.load(None) is None


@pytest.mark.filterwarnings("ignore:'crs' was not provided")
def test_bad_existing_files_are_one_line_errors_before_any_prediction(tmp_path):
    from lib.cli import compose_config
    from lib.errors import UserError

    no_crs = tmp_path / "nocrs.gpkg"
    gpd.GeoDataFrame(geometry=[shapely.box(0, 0, 1, 1)]).to_file(no_crs)
    broken = tmp_path / "broken.geojson"
    broken.write_text("{not json")
    for path, match in ((no_crs, "have no CRS"), (broken, "not a readable vector file"),
                        (tmp_path / "missing.gpkg", "does not exist")):
        with pytest.raises(UserError, match=match) as err:
            footprints.check_inputs(compose_config("inference", [f"existing={path}"]))
        assert str(path.name) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserError, match="regularize_angles"):
        footprints.check_inputs(compose_config("inference", ["regularize_angles=30"]))


def _grid_of_houses(rows=16, cols=15, cell=20):
    """Rectangular houses on a grid (some across the 64-row blocks' seams) and a long one across all."""
    mask = np.zeros((rows * cell, cols * cell), bool)
    for i in range(rows):
        for j in range(cols):
            mask[i * cell + 3:i * cell + 3 + 9 + (i + j) % 6, j * cell + 4:j * cell + 15] = True
    mask[5:rows * cell - 10, 150:154] = True
    prob = (np.arange(mask.size) % 200 + 50).reshape(mask.shape).astype(np.uint8)
    return mask, prob


def _stream(mask, prob, path, cfg, chunk, band=64, block=128):
    """Feed a mask through Polygonizer -> FootprintWriter in bands of rows and column blocks; watch memory."""
    t = from_origin(500000, 4000000, 0.5, 0.5)
    writer = footprints.FootprintWriter(path, t, "EPSG:32632", cfg, chunk=chunk)
    poly = footprints.Polygonizer(*mask.shape, sink=writer)
    held = 0
    with writer:
        for r in range(0, mask.shape[0], band):
            for c in range(0, mask.shape[1], block):
                poly.add(r, mask[r:r + band, c:c + block], prob[r:r + band, c:c + block], c)
            held = max(held, len(poly.open) + len(writer.pending))
        poly.finish()
        return writer.close(), held


def test_streamed_footprints_equal_one_write_and_only_seam_pieces_stay_in_memory(tmp_path):
    from lib.cli import compose_config

    mask, prob = _grid_of_houses()
    x0, y0 = 500000, 4000000  # one mapped house (row 0, column 0 of the grid), all others new
    gpd.GeoDataFrame(geometry=[shapely.box(x0 + 2, y0 - 8, x0 + 7.5, y0 - 1.5)], crs="EPSG:32632").to_file(
        tmp_path / "osm.gpkg")
    cfg = compose_config("inference", [f"existing={tmp_path / 'osm.gpkg'}"])
    n_one, _ = _stream(mask, prob, tmp_path / "one" / "s.geojson", cfg, chunk=10 ** 6)
    n_many, held = _stream(mask, prob, tmp_path / "many" / "s.geojson", cfg, chunk=25)
    assert n_one == n_many == 16 * 15 - 16 + 1  # the long building joins the 16 houses of column 7
    # held at most: a chunk, the pieces on a band's two seams (two grid rows of houses, and the
    # merged ones above) and on its column seams -- not the scene's 225 footprints
    assert held <= 25 + 3 * 15 + 3 * 2 + 1
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "many").iterdir()) == [
        "s.geojson", "s.gpkg", "s_new.geojson", "s_raw.geojson"]  # no scratch files left
    for name in names:
        a, b = gpd.read_file(tmp_path / "one" / name), gpd.read_file(tmp_path / "many" / name)
        assert a.equals(b) and a.crs == b.crs, name
    gj = gpd.read_file(tmp_path / "many" / "s.geojson")
    assert gj.crs.to_epsg() == 4326 and gj["id"].tolist() == list(range(n_one))
    assert (gj["status"] == "mapped").sum() == 1 and gj["squared"].all()
    assert gpd.read_file(tmp_path / "many" / "s.gpkg").crs.to_epsg() == 32632


def test_streamed_footprints_of_a_plain_image_stay_in_pixels_and_an_aborted_scene_leaves_nothing(tmp_path):
    from lib.cli import compose_config

    mask, prob = _grid_of_houses(4, 5)
    cfg = compose_config("inference", ["vector_format=geojson", "regularize=false", "min_area=0"])
    writer = footprints.FootprintWriter(tmp_path / "p.geojson", None, None, cfg, chunk=3)
    poly = footprints.Polygonizer(*mask.shape, sink=writer)
    for r in range(0, mask.shape[0], 32):
        poly.add(r, mask[r:r + 32], prob[r:r + 32])
    poly.finish()
    assert writer.close() == 20 and [p.name for p in tmp_path.iterdir()] == ["p.geojson"]
    gj = gpd.read_file(tmp_path / "p.geojson")
    assert tuple(gj.total_bounds) == (4.0, 3.0, 95.0, 77.0)  # pixel (column, row) coordinates
    assert sorted(gj["area_px"])[:2] == [99, 99] and len(gj) == 20
    with pytest.raises(KeyError), footprints.FootprintWriter(tmp_path / "q" / "q.geojson", None, None, cfg,
                                                             chunk=3) as w:
        w.add(polygonize(mask, prob))  # streaming has begun: scratch files exist
        raise KeyError("interrupted")
    assert list((tmp_path / "q").iterdir()) == []


def test_blocks_out_of_row_order_are_refused():
    poly = footprints.Polygonizer(100, 100)
    poly.add(50, np.ones((50, 100), bool))
    with pytest.raises(ValueError, match="row order"):
        poly.add(0, np.ones((50, 100), bool))


def test_the_outline_tolerance_is_in_metres_with_a_ground_scale_and_in_pixels_without():
    from lib.footprints import OUTLINE_TOLERANCE_M, outline_tolerance_px

    drone, satellite = np.array([0.05]), np.array([0.5])
    assert outline_tolerance_px(None, drone, 1) == pytest.approx(OUTLINE_TOLERANCE_M / 0.05)
    assert outline_tolerance_px(None, satellite, 1) == pytest.approx(1.0)  # never under a pixel by default
    assert outline_tolerance_px(0.3, drone, 1) == pytest.approx(6.0)
    assert outline_tolerance_px(0.3, satellite, 1) == pytest.approx(0.6)
    assert outline_tolerance_px(None, None, 2).tolist() == [1.0, 1.0]
    assert outline_tolerance_px(2.0, None, 1).tolist() == [2.0]  # plain images: pixels
    assert outline_tolerance_px(0.0, drone, 1).tolist() == [0.0]  # exact pixel outlines


def test_outlines_that_are_not_squared_get_few_vertices_while_staying_faithful():
    from lib.footprints import irregular_outlines
    from lib.regularize import MIN_IOU

    rng = np.random.default_rng(3)
    angles = np.linspace(0, 2 * np.pi, 240, endpoint=False)
    radius = 40 + 6 * np.sin(3 * angles) + rng.normal(0, 0.8, angles.size)  # a lumpy yard, 80 px across
    blob = shapely.Polygon(np.column_stack([radius * np.cos(angles), radius * np.sin(angles)]))
    simple = shapely.simplify(blob, 1.0)
    out = irregular_outlines(np.array([blob]), np.array([simple]), np.array([1.0]))[0]
    inter = out.intersection(blob).area
    assert len(out.exterior.coords) < len(simple.exterior.coords) / 2
    assert inter / (out.area + blob.area - inter) >= MIN_IOU
    # a thin winding strip (a path taken for a building) would lose its shape: the fine outline stays
    x = np.arange(0, 300, 3.0)
    strip = shapely.LineString(np.column_stack([x, 6 * np.sin(x / 4)])).buffer(1.0, quad_segs=2)
    assert irregular_outlines(np.array([strip]), np.array([strip]), np.array([0.5]))[0].equals(strip)
    assert irregular_outlines(np.array([blob]), np.array([blob]), np.array([0.0]))[0].equals(blob)  # simplify=0

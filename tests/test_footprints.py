"""lib/footprints.py: masks -> polygons (streamed by blocks), measured, placed in the image CRS, written."""

import cv2
import geopandas as gpd
import numpy as np
import pytest
import shapely
from rasterio.transform import from_origin

from lib import footprints


def test_footprints_from_blocks_equal_footprints_of_the_whole_mask():
    rng = np.random.default_rng(3)
    mask = cv2.GaussianBlur(rng.random((300, 500)).astype(np.float32), (0, 0), 6) > 0.5
    mask[40:200, 90:110] = True  # a long building across many blocks
    mask[100:120, 20:480] = True
    prob = rng.integers(0, 256, mask.shape).astype(np.uint8)
    whole = footprints.polygonize(mask, prob)
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
    gdf = footprints.footprints_frame(footprints.polygonize(mask, prob), transform, "EPSG:32632")
    assert gdf.crs.to_epsg() == 32632
    gdf = gdf.sort_values("area_px", ascending=False)
    assert gdf["area_px"].tolist() == [800, 25]
    assert gdf["area_m2"].tolist() == pytest.approx([200.0, 6.25], rel=1e-3)
    assert gdf["mean_prob"].tolist() == pytest.approx([0.8, 0.8])
    assert tuple(gdf.geometry.iloc[0].bounds) == pytest.approx((500005.0, 3999985.0, 500025.0, 3999995.0))


def test_min_area_drops_small_blobs_and_plain_images_stay_in_pixel_coordinates():
    mask, prob = _two_buildings()
    gdf = footprints.footprints_frame(footprints.polygonize(mask, prob), None, None, min_area=30)
    assert len(gdf) == 1 and gdf.crs is None and gdf["area_m2"].isna().all()
    assert tuple(gdf.geometry.iloc[0].bounds) == (10.0, 10.0, 50.0, 30.0)


def test_footprints_are_written_as_epsg4326_geojson_beside_a_gpkg_in_the_image_crs(tmp_path):
    mask, prob = _two_buildings()
    gdf = footprints.footprints_frame(footprints.polygonize(mask, prob), from_origin(500000, 4000000, 0.5, 0.5),
                                      "EPSG:32632")
    written = footprints.write_footprints(gdf, tmp_path / "scene.geojson", "gpkg")
    assert written == [tmp_path / "scene.geojson", tmp_path / "scene.gpkg"]
    gj, gp = gpd.read_file(written[0]), gpd.read_file(written[1])
    assert gj.crs.to_epsg() == 4326 and gp.crs.to_epsg() == 32632 and len(gj) == len(gp) == 2
    assert gj.to_crs(32632).area.sum() == pytest.approx(206.25, rel=1e-3)

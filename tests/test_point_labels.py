"""lib.point_labels: xView3 CSVs, points and polygon centroids over a GeoTIFF, all as one PointLabels table."""

import math

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from rasterio.features import rasterize
from rasterio.transform import from_origin
from shapely import affinity
from shapely.geometry import Point, Polygon

from lib.errors import UserError
from lib.point_labels import POINT_COLUMNS, read_vector_points, read_xview3_csv

HEADER = "scene_id,detect_scene_row,detect_scene_column,is_vessel,is_fishing,vessel_length_m,distance_from_shore_km,confidence"


def write_csv(path, *lines, header=HEADER):
    path.write_text("\n".join([header, *lines]) + "\n")
    return path


@pytest.fixture
def image(tmp_path):
    """A 100 x 120 px GeoTIFF in UTM 31N, 10 m pixels."""
    path = tmp_path / "scene.tif"
    profile = {"driver": "GTiff", "width": 120, "height": 100, "count": 1, "dtype": "uint8", "crs": "EPSG:32631",
               "transform": from_origin(500_000.0, 5_800_000.0, 10.0, 10.0)}
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.ones((1, 100, 120), np.uint8))
    return path


def test_xview3_csv_with_unknown_cells(tmp_path):
    path = write_csv(tmp_path / "labels.csv",
                     "a,10,20,True,False,55.5,1.5,HIGH",
                     "a,11.5,21,,,,,medium",
                     "b,3,4,False,,12,7,",
                     "b,5,6,1,1,,0.2,LOW")
    labels = read_xview3_csv(path, scenes=["a", "b", "c"])
    assert tuple(labels.columns) == POINT_COLUMNS
    assert labels.scene_id.tolist() == ["a", "a", "b", "b"]
    assert labels.row.tolist() == [10, 11.5, 3, 5] and labels.col.tolist() == [20, 21, 4, 6]
    np.testing.assert_array_equal(labels.is_vessel, [1, np.nan, 0, 1])
    np.testing.assert_array_equal(labels.is_fishing, [0, np.nan, np.nan, 1])
    np.testing.assert_array_equal(labels.length_m, [55.5, np.nan, 12, np.nan])
    np.testing.assert_array_equal(labels.distance_from_shore_km, [1.5, np.nan, 7, 0.2])
    assert labels.confidence.tolist() == ["HIGH", "MEDIUM", "", "LOW"]


def test_xview3_csv_missing_column_is_one_line_naming_file_and_column(tmp_path):
    header = HEADER.replace(",is_fishing", "")
    path = write_csv(tmp_path / "labels.csv", "a,10,20,True,55.5,1.5,HIGH", header=header)
    with pytest.raises(UserError) as err:
        read_xview3_csv(path)
    text = str(err.value)
    assert "\n" not in text and text.count(str(path)) == 1 and "missing column(s) is_fishing" in text


def test_xview3_csv_unknown_scene_ids_are_listed(tmp_path):
    path = write_csv(tmp_path / "labels.csv", "a,1,1,True,False,,,HIGH", "zz,1,1,,,,,HIGH", "yy,1,1,,,,,HIGH")
    with pytest.raises(UserError) as err:
        read_xview3_csv(path, scenes=["a"])
    text = str(err.value)
    assert "\n" not in text and text.count(str(path)) == 1 and text.endswith("scenes: yy, zz")


def test_xview3_csv_bad_values_are_one_line(tmp_path):
    path = write_csv(tmp_path / "labels.csv", "a,1,1,maybe,False,,,HIGH")
    with pytest.raises(UserError, match="is_vessel must be True/False or empty"):
        read_xview3_csv(path)
    with pytest.raises(UserError, match="label CSV does not exist"):
        read_xview3_csv(tmp_path / "nope.csv")


def pixel_centre(row, col, transform):
    return transform * (col + 0.5, row + 0.5)


def test_points_are_reprojected_and_placed_at_pixel_centres(image, tmp_path):
    with rasterio.open(image) as ds:
        transform = ds.transform
    rc = [(0.0, 0.0), (12.0, 30.0), (99.0, 119.0), (40.25, 7.75)]
    pts = gpd.GeoDataFrame({"is_vessel": [True, False, None, True], "vessel_length_m": [50.0, None, 20.0, 10.0]},
                           geometry=[Point(*pixel_centre(r, c, transform)) for r, c in rc], crs="EPSG:32631")
    path = tmp_path / "points.geojson"
    pts.to_crs("EPSG:4326").to_file(path)
    labels = read_vector_points(path, image)
    np.testing.assert_allclose(labels[["row", "col"]].to_numpy(), rc, atol=1e-6)
    np.testing.assert_array_equal(labels.is_vessel, [1, 0, np.nan, 1])
    np.testing.assert_array_equal(labels.length_m, [50, np.nan, 20, 10])
    assert labels.scene_id.unique().tolist() == ["scene"] and labels.is_fishing.isna().all()
    assert labels.confidence.tolist() == [""] * 4


def test_points_outside_the_image_are_left_out_with_a_warning(image, tmp_path):
    with rasterio.open(image) as ds:
        transform = ds.transform
    pts = gpd.GeoDataFrame(geometry=[Point(*pixel_centre(5, 5, transform)), Point(*pixel_centre(-3, 5, transform)),
                                     Point(*pixel_centre(5, 130, transform))], crs="EPSG:32631")
    path = tmp_path / "points.gpkg"
    pts.to_file(path)
    with pytest.warns(UserWarning, match="2 of 3 point"):
        labels = read_vector_points(path, image, scene_id="s1")
    assert labels[["scene_id", "row", "col"]].values.tolist() == [["s1", 5.0, 5.0]]


def test_polygons_need_from_polygons_and_give_centroids_and_lengths(image, tmp_path):
    with rasterio.open(image) as ds:
        transform = ds.transform
    x, y = pixel_centre(50, 60, transform)
    rect = affinity.rotate(Polygon([(x - 40, y - 10), (x + 40, y - 10), (x + 40, y + 10), (x - 40, y + 10)]), 30)
    path = tmp_path / "footprints.geojson"
    gpd.GeoDataFrame(geometry=[rect], crs="EPSG:32631").to_file(path)
    with pytest.raises(UserError, match="set from_polygons=true"):
        read_vector_points(path, image)
    labels = read_vector_points(path, image, from_polygons=True)
    np.testing.assert_allclose(labels[["row", "col"]].to_numpy(), [[50, 60]], atol=1e-6)
    assert labels.length_m.tolist() == pytest.approx([80.0])


def test_geojson_without_crs_is_wgs84(image, tmp_path):
    path = tmp_path / "nocrs.geojson"
    path.write_text('{"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {}, '
                    '"geometry": {"type": "Point", "coordinates": [500100, 5799900]}}]}')
    with pytest.warns(UserWarning, match="1 of 1 point"):
        labels = read_vector_points(path, image)  # GeoJSON means WGS84: a UTM coordinate lands nowhere
    assert len(labels) == 0


def test_real_building_footprints_become_their_centroids(shared):
    """solaris' SpaceNet-4 sample: 43 footprints -> 43 points at the centre of each rasterised building."""
    data = shared / "data" / "solaris"
    image, footprints = data / "sample_geotiff.tif", data / "geotiff_labels.geojson"
    labels = read_vector_points(footprints, image, from_polygons=True)
    assert len(labels) == 43
    with rasterio.open(image) as ds:
        crs, transform, shape = ds.crs, ds.transform, (ds.height, ds.width)
    gdf = gpd.read_file(footprints).to_crs(crs)
    errors = []
    for geom, (r, c) in zip(gdf.geometry, labels[["row", "col"]].to_numpy()):
        mask = rasterize([(geom, 1)], out_shape=shape, transform=transform, all_touched=False)
        rows, cols = np.nonzero(mask)
        inside = rows.min() > 0 and cols.min() > 0 and rows.max() < shape[0] - 1 and cols.max() < shape[1] - 1
        if len(rows) > 50 and inside:  # buildings cut by the image edge have their centroid off the visible part
            errors.append(math.hypot(rows.mean() - r, cols.mean() - c))
    assert len(errors) > 25 and max(errors) < 0.6
    lengths = labels.length_m.to_numpy()
    assert np.isfinite(lengths).all() and 3 < np.median(lengths) < 60  # metres: Atlanta houses and blocks

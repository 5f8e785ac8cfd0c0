"""lib/geo_io.py: reading real scenes (bands, alpha, CRS, GSD), one-line errors, label loading."""

import numpy as np
import pytest
import rasterio
from rasterio.windows import Window

from lib import geo_io
from lib.errors import UserError

KAMPALA = "data/kampala/kam/81046528/81046528.tif"


def test_kampala_rgba_scene_reads_with_its_crs_transform_gsd_and_alpha_as_nodata(shared):
    with geo_io.open_raster(shared / KAMPALA) as ds:
        assert ds.crs.to_epsg() == 3857 and (ds.width, ds.height) == (3072, 2048)
        assert geo_io.is_georeferenced(ds)
        assert geo_io.band_layout(ds) == ([1, 2, 3], 4)
        assert geo_io.raster_gsd(ds) == pytest.approx(0.0746, abs=5e-4)  # true ground metres, not Web Mercator's
        assert geo_io.resolve_zero_is_nodata("auto", ds) is False  # the alpha band marks the edges
        rgb, valid = geo_io.read_window(ds, Window(0, 0, 3072, 2048))
        alpha = ds.read(4)
    assert rgb.shape == (2048, 3072, 3) and rgb.dtype == np.uint8
    assert np.array_equal(valid, alpha > 0) and 0.99 < valid.mean() < 1
    assert not rgb[~valid].any()  # nodata is 0 in every band


def test_a_window_past_the_edge_is_padded_as_invalid(drone):
    with geo_io.open_raster(drone) as ds:
        assert ds.crs.to_epsg() == 32632 and geo_io.raster_gsd(ds) == pytest.approx(0.06, abs=0.005)
        rgb, valid = geo_io.read_window(ds, Window(500, 900, 100, 50))
        inner = ds.read([1, 2, 3], window=Window(500, 900, 76, 23))
    assert valid.shape == (50, 100) and valid[:23, :76].all() and not valid[23:].any() and not valid[:, 76:].any()
    assert np.array_equal(np.moveaxis(rgb[:23, :76], -1, 0), inner)


def test_nodata_value_marks_invalid_pixels_and_uint16_is_stretched_to_uint8(tmp_path):
    data = np.arange(64 * 64, dtype=np.uint16).reshape(1, 64, 64) * 10
    data[:, :8, :8] = 9999
    path = tmp_path / "u16.tif"
    with rasterio.open(path, "w", driver="GTiff", width=64, height=64, count=1, dtype="uint16", nodata=9999,
                       crs="EPSG:32632", transform=rasterio.transform.from_origin(0, 640, 10, 10)) as ds:
        ds.write(data)
    with geo_io.open_raster(path) as ds:
        bands, _ = geo_io.band_layout(ds)
        assert bands == [1, 1, 1]  # one band becomes grey RGB
        stretch = geo_io.stretch_range(ds, bands)
        rgb, valid = geo_io.read_window(ds, None, stretch)
    assert not valid[:8, :8].any() and valid[8:, 8:].all()
    assert rgb.dtype == np.uint8 and rgb[valid].min() == 0 and rgb[valid].max() == 255


def test_missing_and_broken_files_are_one_line_errors_naming_the_file(tmp_path):
    with pytest.raises(UserError, match="nope.tif: image file does not exist"):
        geo_io.open_raster(tmp_path / "nope.tif")
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"II*\x00 not really a tiff")
    with pytest.raises(UserError) as err:
        geo_io.open_raster(bad)
    assert "bad.tif" in str(err.value) and "\n" not in str(err.value)
    broken = tmp_path / "labels.geojson"
    broken.write_text("{not json")
    with pytest.raises(UserError, match="labels.geojson: not a readable vector file"):
        geo_io.load_footprints(broken)


def test_kampala_labels_load_reprojected_to_the_image_crs(shared):
    labels = shared / "data/kampala/kam/81046528-labels/81046528.geojson"
    gdf, report = geo_io.load_footprints_report(labels, crs="EPSG:3857")
    assert gdf.crs.to_epsg() == 3857 and len(gdf) == report["read"] - report["dropped"] and len(gdf) > 100
    with geo_io.open_raster(shared / KAMPALA) as ds:
        left, bottom, right, top = ds.bounds
    x0, y0, x1, y1 = gdf.total_bounds
    assert left - 50 < x0 and x1 < right + 50 and bottom - 50 < y0 and y1 < top + 50

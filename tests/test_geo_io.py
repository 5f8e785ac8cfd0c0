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


def write_4band(path, band4, dtype="uint8"):
    """An RGB + 4th band GeoTIFF whose 4th band has no colour interpretation (no ExtraSamples alpha)."""
    h, w = band4.shape
    rgb = np.full((3, h, w), 100, dtype=dtype)
    with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=4, dtype=dtype, photometric="RGB",
                       crs="EPSG:32632", transform=rasterio.transform.from_origin(0, 64, 1, 1)) as ds:
        ds.write(rgb, [1, 2, 3])
        ds.write(band4.astype(dtype), 4)
    return path


def test_a_0_255_fourth_band_without_colour_interpretation_is_alpha_with_one_note(tmp_path, capsys):
    band4 = np.full((64, 64), 255, np.uint8)
    band4[:, :16] = 0
    path = write_4band(tmp_path / "rgba.tif", band4)
    with geo_io.open_raster(path) as ds:
        assert ds.colorinterp[3] == rasterio.enums.ColorInterp.undefined
        assert geo_io.band_layout(ds) == ([1, 2, 3], 4)
        assert geo_io.band_layout(ds) == ([1, 2, 3], 4)
        _, valid = geo_io.read_window(ds)
        assert geo_io.band_layout(ds, [1, 2, 4]) == ([1, 2, 4], None)  # chosen as colour: not alpha
    assert np.array_equal(valid, band4 > 0)
    assert capsys.readouterr().err.count("band 4 has no colour interpretation") == 1


@pytest.mark.parametrize("band4", [np.arange(64 * 64).reshape(64, 64) % 251,  # continuous (NIR-like)
                                   np.zeros((64, 64))])  # all 0: alpha would hide the whole image
def test_any_other_fourth_band_is_an_ignored_extra_band(tmp_path, band4):
    with geo_io.open_raster(write_4band(tmp_path / "rgbn.tif", band4)) as ds:
        assert geo_io.band_layout(ds) == ([1, 2, 3], None)
        _, valid = geo_io.read_window(ds)
    assert valid.all()


def test_bands_pick_worldview_rgb_from_8_band_imagery_and_name_the_file_when_out_of_range(shared):
    path = shared / "data/spacenet-rio/8band/8band_013022223130_Public_img4.tif"
    with geo_io.open_raster(path) as ds:
        assert ds.count == 8 and ds.dtypes[0] == "uint16"
        assert geo_io.band_layout(ds) == ([1, 2, 3], None)
        layout = geo_io.band_layout(ds, [5, 3, 2])
        assert layout == ([5, 3, 2], None)
        stretch = geo_io.stretch_range(ds, layout[0], layout=layout)
        rgb, _ = geo_io.read_window(ds, None, stretch, layout=layout)
        default, _ = geo_io.read_window(ds, None, geo_io.stretch_range(ds, [1, 2, 3]))
        assert np.array_equal(rgb[..., 1], default[..., 2])  # green is band 3 in both
        assert not np.array_equal(rgb[..., 0], default[..., 0])
        with pytest.raises(UserError) as err:
            geo_io.band_layout(ds, [9, 3, 2])
    assert str(err.value) == f"{path}: bands=[9, 3, 2] but the file has 8 band(s) (indexes are 1-based)"
    with pytest.raises(UserError, match=r"bands=\[5, 3\]: give 3 band indexes"):
        geo_io.check_bands([5, 3])
    assert geo_io.check_bands(None) is None and geo_io.check_bands([4]) == [4]


def test_gdal_messages_lose_the_repeated_path_and_the_driver_advice(tmp_path):
    labels = tmp_path / "x.geojson"
    labels.write_text("hello")
    with pytest.raises(UserError) as err:
        geo_io.load_footprints(labels)
    assert str(err.value) == f"{labels}: not a readable vector file (not recognized as a supported file format)"
    advice = OSError(f"'{labels}' not recognized as being in a supported file format.; It might help to specify "
                     "the correct driver explicitly by prefixing the file path with '<DRIVER>:', e.g. 'CSV:path'.")
    assert geo_io.gdal_reason(advice, labels) == "not recognized as a supported file format"


def test_a_truncated_tiff_is_one_short_line_and_rasterio_logs_nothing(drone, tmp_path, caplog):
    bad = tmp_path / "bad.tif"
    bad.write_bytes(drone.read_bytes()[:5000])
    caplog.set_level("DEBUG")
    with pytest.raises(UserError) as err, geo_io.open_raster(bad) as ds:
        geo_io.check_readable(ds, bad)
    message = str(err.value)
    assert message.startswith(f"{bad}: corrupt or truncated raster (band 1: ") and message.count("bad.tif") == 1
    assert len(message) < 200 and "\n" not in message
    assert not [r for r in caplog.records if r.name.startswith("rasterio")]

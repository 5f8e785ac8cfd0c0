"""lib.sar: the sigmoid normalisation, window reads equal to direct reads, and bad SAR input in one line."""

import math

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from lib.errors import UserError
from lib.sar import DB_NODATA, DEFAULT_NORMALIZATION, SarSource, channel_normalization, normalize_db

TRANSFORM = from_origin(500_000.0, 5_800_000.0, 10.0, 10.0)


def write_band(path, array, dtype="float32", nodata=DB_NODATA, transform=TRANSFORM, crs="EPSG:32631"):
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = {"driver": "GTiff", "width": array.shape[-1], "height": array.shape[-2], "count": 1, "dtype": dtype,
               "crs": crs, "transform": transform, "nodata": nodata}
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(array.astype(dtype), 1)
    return path


@pytest.fixture
def scene(tmp_path):
    """A 70 x 90 px scene: VV/VH dB noise with -32768 nodata in VV, NaN in VH, in different places."""
    rng = np.random.default_rng(1)
    vv = rng.uniform(-30, 10, (70, 90)).astype(np.float32)
    vh = rng.uniform(-35, 0, (70, 90)).astype(np.float32)
    vv[:5, :7] = DB_NODATA
    vh[60:, 80:] = np.nan
    folder = tmp_path / "S1"
    write_band(folder / "VV_dB.tif", vv)
    write_band(folder / "VH_dB.tif", vh)
    return folder, vv, vh


def test_normalize_db_known_values():
    scale, offset = 3.0, -10.0
    db = np.array([offset, offset + scale * math.log(3), offset - scale * math.log(3), -200.0, 200.0])
    assert normalize_db(db[:, None], [scale], [offset])[:, 0].tolist() == [128, 191, 64, 1, 255]


def test_normalize_db_is_monotone_and_uses_the_whole_range():
    db = np.linspace(-60, 40, 5001, dtype=np.float32)[:, None]
    out = normalize_db(db, 3.0, -10.0)[:, 0].astype(int)
    assert np.all(np.diff(out) >= 0)
    assert out.min() == 1 and out.max() == 255 and len(np.unique(out)) == 255


def test_normalize_db_nodata_is_zero_and_only_nodata():
    db = np.array([[DB_NODATA, -15.0], [np.nan, np.inf], [-np.inf, -1e9]], dtype=np.float32)
    out = normalize_db(db, [3.0, 3.0], [-10.0, -17.0])
    assert out.tolist() == [[0, 168], [0, 0], [0, 1]]  # -15 dB VH: 255 * sigmoid(2 / 3) = 168.49


def test_default_normalization_saturates_sea_and_keeps_targets_mid_range():
    vv_scale, vv_offset = DEFAULT_NORMALIZATION["VV"]
    vh_scale, vh_offset = DEFAULT_NORMALIZATION["VH"]
    sea = normalize_db(np.array([[-20.0, -25.0]]), [vv_scale, vh_scale], [vv_offset, vh_offset])
    fringe = normalize_db(np.array([[-15.0, -22.0], [-5.0, -12.0]]), [vv_scale, vh_scale], [vv_offset, vh_offset])
    core = normalize_db(np.array([[0.0]]), vv_scale, vv_offset)
    assert sea.tolist() == [[9, 17]]
    assert fringe.tolist() == [[41, 41], [214, 214]]  # 255 * sigmoid(-+5 / 3): ~0.16 .. 0.84
    assert core.tolist() == [[246]]


def test_channel_normalization_defaults_and_errors():
    assert channel_normalization(["VH", "VV"]) == ([3.0, 3.0], [-17.0, -10.0])
    assert channel_normalization(["VV", "bathymetry"], [3, 100], [-10, -50]) == ([3.0, 100.0], [-10.0, -50.0])
    with pytest.raises(UserError, match="no default for channel.*bathymetry"):
        channel_normalization(["VV", "bathymetry"])
    with pytest.raises(UserError, match="one value per channel"):
        channel_normalization(["VV", "VH"], [3.0], None)
    with pytest.raises(UserError, match="positive"):
        normalize_db(np.zeros((1, 1)), 0.0, 0.0)


def test_windows_equal_direct_reads(scene):
    folder, vv, vh = scene
    expected = normalize_db(np.stack([vv, vh], -1), [3.0, 3.0], [-10.0, -17.0])
    valid = np.all(expected > 0, axis=-1)
    expected[~valid] = 0
    with SarSource(folder) as src:
        assert (src.height, src.width, src.gsd, src.count) == (70, 90, 10.0, 2)
        assert src.crs == "EPSG:32631" and src.transform == TRANSFORM
        for row, col, h, w in ((0, 0, 70, 90), (3, 5, 20, 31), (50, 70, 20, 20)):
            data, ok = src.read(row, col, h, w)
            assert data.dtype == np.uint8 and data.shape == (h, w, 2)
            assert np.array_equal(data, expected[row:row + h, col:col + w])
            assert np.array_equal(ok, valid[row:row + h, col:col + w])
        other = src.reopen()
        assert np.array_equal(other.read(3, 5, 20, 31)[0], expected[3:23, 5:36])
        other.close()
    assert not valid[:5, :7].any() and not valid[60:, 80:].any() and valid[10:50, 10:70].all()


def test_windows_past_the_edge_are_nodata(scene):
    folder, _, _ = scene
    with SarSource(folder) as src:
        whole, _ = src.read(0, 0, 70, 90)
        data, ok = src.read(-4, 80, 10, 20)
    assert data.shape == (10, 20, 2) and not ok[:4].any() and not ok[:, 10:].any()
    assert np.array_equal(data[4:, :10], whole[:6, 80:90]) and (data[:4] == 0).all() and (data[:, 10:] == 0).all()


def test_prepared_scene_reads_as_written(tmp_path):
    rng = np.random.default_rng(2)
    data = rng.integers(1, 256, (2, 40, 50)).astype(np.uint8)
    data[:, :3, :3] = 0
    path = tmp_path / "prep.tif"
    profile = {"driver": "GTiff", "width": 50, "height": 40, "count": 2, "dtype": "uint8", "crs": "EPSG:32631",
               "transform": TRANSFORM, "nodata": 0}
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        dst.update_tags(channels="VV,VH", sar_scale="3,3", sar_offset="-10,-17")
    with SarSource(path) as src:
        assert src.prepared and src.channels == ["VV", "VH"] and src.offset == [-10.0, -17.0]
        img, ok = src.read(0, 0, 40, 50)
    assert np.array_equal(img, np.moveaxis(data, 0, -1)) and ok.sum() == 40 * 50 - 9


def one_line_naming(err, path):
    text = str(err.value)
    return "\n" not in text and text.count(str(path)) == 1


def test_complex_slc_band_is_refused(tmp_path):
    path = write_band(tmp_path / "S1" / "VV_dB.tif", np.ones((8, 8)) * (1 + 2j), dtype="complex64", nodata=None)
    write_band(tmp_path / "S1" / "VH_dB.tif", np.zeros((8, 8)))
    with pytest.raises(UserError, match="complex-valued SAR") as err:
        SarSource(tmp_path / "S1")
    assert one_line_naming(err, path)


def test_missing_channel_is_named(tmp_path):
    write_band(tmp_path / "S1" / "VV_dB.tif", np.zeros((8, 8)))
    with pytest.raises(UserError, match="channel VH is missing") as err:
        SarSource(tmp_path / "S1")
    assert one_line_naming(err, tmp_path / "S1" / "VH_dB.tif")


def test_mismatched_channels_are_refused(tmp_path):
    write_band(tmp_path / "a" / "VV_dB.tif", np.zeros((8, 8)))
    write_band(tmp_path / "a" / "VH_dB.tif", np.zeros((8, 9)))
    with pytest.raises(UserError, match="9x8 px but VV_dB.tif is 8x8") as err:
        SarSource(tmp_path / "a")
    assert one_line_naming(err, tmp_path / "a" / "VH_dB.tif")
    write_band(tmp_path / "b" / "VV_dB.tif", np.zeros((8, 8)))
    write_band(tmp_path / "b" / "VH_dB.tif", np.zeros((8, 8)), transform=from_origin(500_010.0, 5_800_000.0, 10, 10))
    with pytest.raises(UserError, match="georeferencing"):
        SarSource(tmp_path / "b")


def test_extra_channels_by_name(tmp_path):
    folder = tmp_path / "S1"
    write_band(folder / "VV_dB.tif", np.full((6, 6), -10.0))
    write_band(folder / "VH_dB.tif", np.full((6, 6), -17.0))
    write_band(folder / "bathymetry.tif", np.full((6, 6), -50.0), nodata=None)
    with SarSource(folder, channels=("VV", "VH", "bathymetry"), scale=[3, 3, 20], offset=[-10, -17, 0]) as src:
        data, ok = src.read(0, 0, 6, 6)
    assert ok.all() and data[0, 0].tolist() == [128, 128, round(255 / (1 + math.exp(2.5)))]

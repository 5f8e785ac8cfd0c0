"""lib/raster_outputs.py: quantisation, aligned profiles and the atomic probability/mask writer."""

import numpy as np
import pytest
import rasterio
import torch
from standins import read

from lib.raster_outputs import SceneWriter, quantize, raster_profile
from lib.segmentation import BUILDING
from lib.tiling import Block


def test_quantize_rounds_to_0_255_and_nodata_is_never_building_even_at_threshold_0():
    prob = torch.tensor([[0.0, 0.5, 1.0], [0.2, 1.7, -0.3]])
    valid = np.array([[True, True, True], [False, True, True]])
    prob_u8, mask = quantize(prob, valid, threshold=0.0)
    assert prob_u8.tolist() == [[0, 128, 255], [51, 255, 0]]
    assert mask.tolist() == [[True, True, True], [False, True, False]]


def test_raster_profile_keeps_the_grid_of_georeferenced_images_and_drops_it_for_plain_ones(drone):
    with rasterio.open(drone) as ds:
        geo = raster_profile(ds, True)
        plain = raster_profile(ds, False)
        assert (geo["crs"], geo["transform"], geo["width"], geo["height"]) == (ds.crs, ds.transform, 576, 923)
    assert "crs" not in plain and "transform" not in plain and geo["dtype"] == "uint8" and geo["count"] == 1


def _profile(h=40, w=60):
    return {"driver": "GTiff", "width": w, "height": h, "count": 1, "dtype": "uint8", "crs": None, "nodata": None}


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_writer_as_a_sink_writes_blocks_thresholded_and_renames_only_on_commit(tmp_path):
    prob_path, mask_path = tmp_path / "p" / "a.tif", tmp_path / "m" / "a.tif"
    with SceneWriter(prob_path, mask_path, _profile(), {"RUN": "x"}, cog=False, threshold=0.6) as w:
        for row in (0, 25):
            h = 25 if row == 0 else 15
            prob = torch.linspace(0, 1, 60).repeat(h, 1)
            w.add(Block(row, {BUILDING: prob}, np.ones((h, 60), bool)))
        assert not prob_path.exists() and not mask_path.exists()  # nothing final before commit
        w.commit()
    p, _ = read(prob_path)
    m, _ = read(mask_path)
    expected = torch.linspace(0, 1, 60).numpy()
    assert np.array_equal(p[0], np.round(expected * 255).astype(np.uint8))
    assert np.array_equal(m[39] == 255, expected >= np.float32(0.6))
    with rasterio.open(prob_path) as ds:
        assert ds.tags()["RUN"] == "x"


def test_a_writer_that_fails_or_misses_pixels_leaves_no_file(tmp_path):
    with (pytest.raises(RuntimeError, match="wrote 600 of 2400 pixels"),
          SceneWriter(tmp_path / "p.tif", tmp_path / "m.tif", _profile(), cog=False) as w):
        w.write(0, np.zeros((10, 60), np.uint8), np.zeros((10, 60), bool))
        w.commit()
    with pytest.raises(KeyError), SceneWriter(tmp_path / "p.tif", tmp_path / "m.tif", _profile(), cog=False):
        raise KeyError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_georeferenced_outputs_become_cloud_optimized_geotiffs(tmp_path, drone):
    with rasterio.open(drone) as ds:
        profile = raster_profile(ds, True)
    with SceneWriter(tmp_path / "p.tif", tmp_path / "m.tif", profile, cog=True) as w:
        w.write(0, np.full((923, 576), 200, np.uint8), np.ones((923, 576), bool))
        w.commit()
    with rasterio.open(tmp_path / "p.tif") as ds:
        assert ds.profile["tiled"] and ds.read(1).min() == 200
        assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert ds.overviews(1) == []  # at most 2048 px a side: a viewer reads it whole from 4 x 4 blocks


def test_a_cog_longer_than_2048_px_gets_overviews_of_every_raster(tmp_path, drone):
    with rasterio.open(drone) as ds:
        profile = {**raster_profile(ds, True), "height": 24, "width": 2050}
    paths = [tmp_path / "p.tif", tmp_path / "m.tif", tmp_path / "i.tif"]
    with SceneWriter(*paths[:2], profile, cog=True, instance_path=paths[2]) as w:
        prob = np.tile(np.arange(2050, dtype=np.uint16) % 256, (24, 1)).astype(np.uint8)
        w.write(0, prob, prob >= 128, border_u8=prob, contact_u8=prob[:, ::-1].copy())
        w.commit()
    for path in paths:
        with rasterio.open(path) as ds:
            assert ds.overviews(1) == [2, 4] and ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
            assert np.array_equal(ds.read(1), prob if path != paths[1] else (prob >= 128) * np.uint8(255))


def test_nodata_goes_into_an_internal_mask_of_both_cogs_and_probability_0_stays_valid(tmp_path, drone):
    with rasterio.open(drone) as ds:
        profile = raster_profile(ds, True)
        crs, transform = ds.crs, ds.transform
    valid = np.ones((923, 576), bool)
    valid[:100, :50] = False
    valid[500:, 300:] = False
    prob = torch.where(torch.from_numpy(valid), 0.0, 0.9)  # valid pixels have probability 0
    with SceneWriter(tmp_path / "p.tif", tmp_path / "m.tif", profile, cog=True, nodata_mask=True) as w:
        for row in range(0, 923, 300):
            w.add(Block(row, {BUILDING: prob[row:row + 300]}, valid[row:row + 300]))
        w.commit()
    for name in ("p.tif", "m.tif"):
        with rasterio.open(tmp_path / name) as ds:
            assert np.array_equal(ds.dataset_mask() == 255, valid) and ds.nodata is None
            assert (ds.crs, ds.transform) == (crs, transform) and ds.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
            assert ds.read(1)[valid].max() == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.tif", "p.tif"]  # no .msk side files


def test_instance_maps_go_to_their_own_2_band_raster_and_to_the_polygonizer(tmp_path):
    from rasterio.transform import from_origin

    from lib.segmentation import BORDER, CONTACT

    class Collect:
        def __init__(self):
            self.calls = []

        def add(self, row, mask, prob_u8, col, border_u8=None, contact_u8=None):
            self.calls.append((row, col, border_u8, contact_u8))

    profile = {**_profile(), "crs": "EPSG:32632", "transform": from_origin(500000, 4000000, 0.5, 0.5)}
    poly = Collect()
    with SceneWriter(tmp_path / "p.tif", tmp_path / "m.tif", profile, cog=True, polygonizer=poly,
                     instance_path=tmp_path / "i.tif") as w:
        for row in (0, 20):
            maps = {BUILDING: torch.full((20, 60), 0.9), BORDER: torch.full((20, 60), row / 40),
                    CONTACT: torch.full((20, 60), 0.2)}
            w.add(Block(row, maps, np.ones((20, 60), bool)))
        w.commit()
    with rasterio.open(tmp_path / "i.tif") as ds:
        assert (ds.count, ds.crs.to_epsg(), ds.transform) == (2, 32632, profile["transform"])
        assert ds.read(1)[0, 0] == 0 and ds.read(1)[30, 0] == 128 and (ds.read(2) == 51).all()
        assert ds.descriptions == ("building border probability (0-255)", "building contact probability (0-255)")
    assert [(r, c) for r, c, *_ in poly.calls] == [(0, 0), (20, 0)] and (poly.calls[1][2] == 128).all()
    with pytest.raises(ValueError, match="border_u8"), SceneWriter(
            tmp_path / "p2.tif", tmp_path / "m2.tif", profile, cog=False, instance_path=tmp_path / "i2.tif") as w:
        w.add(Block(0, {BUILDING: torch.full((20, 60), 0.9)}, np.ones((20, 60), bool)))


def test_cog_level_trades_size_for_speed_with_the_same_values_and_bad_levels_are_refused(tmp_path, drone):
    from lib.cli import compose_config
    from lib.errors import UserError
    from lib.raster_outputs import check_settings

    with rasterio.open(drone) as ds:
        profile = raster_profile(ds, True)
    rng = np.random.default_rng(0)
    prob = torch.from_numpy(np.clip(rng.normal(0.5, 0.2, (923, 576)), 0, 1).astype(np.float32))
    sizes, values = {}, {}
    for level in (1, 9):
        out = tmp_path / str(level)
        out.mkdir()
        with SceneWriter(out / "p.tif", out / "m.tif", profile, cog=True, cog_level=level) as w:
            w.add(Block(0, {BUILDING: prob}, np.ones((923, 576), bool)))
            w.commit()
        sizes[level] = (out / "p.tif").stat().st_size
        with rasterio.open(out / "p.tif") as ds:
            values[level] = ds.read(1)
            assert ds.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
    assert np.array_equal(values[1], values[9]) and sizes[9] < sizes[1]
    check_settings(compose_config("inference", []))
    with pytest.raises(UserError, match="cog_level must be 1"):
        check_settings(compose_config("inference", ["cog_level=0"]))


def test_small_scenes_are_drafted_in_memory_and_large_ones_beside_the_targets(tmp_path, drone, monkeypatch):
    """A COG scene of at most MEMORY_DRAFT_PX is drafted in GDAL's memory (nothing left there after commit
    or abort); a larger one on disk. Both give the same values, mask and tags."""
    from lib import raster_outputs

    with rasterio.open(drone) as ds:
        profile = raster_profile(ds, True)
    rng = np.random.default_rng(1)
    prob = torch.from_numpy(rng.random((923, 576), dtype=np.float32))
    valid = np.ones((923, 576), bool)
    valid[:40] = False
    got = {}
    for name, limit in (("memory", 923 * 576), ("disk", 923 * 576 - 1)):
        monkeypatch.setattr(raster_outputs, "MEMORY_DRAFT_PX", limit)
        out = tmp_path / name
        out.mkdir()
        with SceneWriter(out / "p.tif", out / "m.tif", profile, {"RUN": name}, cog=True, nodata_mask=True) as w:
            drafts = list(w._drafts)
            w.add(Block(0, {BUILDING: prob}, valid))
            w.commit()
        assert all(str(d).startswith("/vsimem/") for d in drafts) == (name == "memory")
        for d in drafts:
            with pytest.raises(rasterio.errors.RasterioIOError):
                rasterio.open(d)
        with rasterio.open(out / "p.tif") as ds:
            assert ds.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG" and ds.tags()["RUN"] == name
            assert ds.crs == profile["crs"] and ds.transform == profile["transform"]
            got[name] = (ds.read(1), ds.dataset_mask())
        assert sorted(p.name for p in out.iterdir()) == ["m.tif", "p.tif"]
    assert np.array_equal(got["memory"][0], got["disk"][0]) and np.array_equal(got["memory"][1], got["disk"][1])
    assert got["memory"][1][:40].max() == 0 and got["memory"][1][40:].min() == 255

    monkeypatch.setattr(raster_outputs, "MEMORY_DRAFT_PX", 923 * 576)
    with pytest.raises(KeyError), SceneWriter(tmp_path / "a.tif", tmp_path / "b.tif", profile, cog=True) as w:
        drafts = list(w._drafts)
        w.write(0, np.zeros((10, 576), np.uint8), np.zeros((10, 576), bool))
        raise KeyError("interrupted")
    assert not (tmp_path / "a.tif").exists() and not (tmp_path / "b.tif").exists()
    for d in drafts:
        with pytest.raises(rasterio.errors.RasterioIOError):
            rasterio.open(d)

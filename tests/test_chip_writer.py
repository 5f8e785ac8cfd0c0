"""lib.chip_writer: grid windows cut like inference cuts a scene, batches of neighbouring chips, resolutions.json."""

import json
import shutil

import cv2
import numpy as np
import pytest
import rasterio
from omegaconf import OmegaConf

from lib.chip_writer import MIN_VALID_SHARE, ScenePlan, chip_batches, chip_scales, update_resolutions, write_chips
from lib.errors import UserError
from lib.scene_sources import DataWarning, Scene
from lib.windows import window_offsets


def seed_grid_starts(n: int, tile: int, stride: int) -> list[int]:
    """The grid starts dataset.py computed before it used lib.windows (kept here as the reference)."""
    if n <= tile:
        return [0]
    starts = list(range(0, n - tile, stride))
    return starts + [n - tile] if not starts or starts[-1] != n - tile else starts


@pytest.mark.parametrize("n", [50, 100, 101, 300, 333, 1024, 5000])
@pytest.mark.parametrize("tile, stride", [(100, 100), (100, 50), (100, 1), (256, 200), (1024, 1024)])
def test_grid_windows_use_the_shared_window_offsets_with_identical_results(n, tile, stride):
    assert window_offsets(n, tile, tile - stride) == seed_grid_starts(n, tile, stride)


def test_scales_accept_one_value_or_a_list_and_refuse_non_positive_ones():
    assert chip_scales(OmegaConf.create({"scale": 2})) == [2.0]
    assert chip_scales(OmegaConf.create({"scale": [1, 0.5]})) == [1.0, 0.5]
    with pytest.raises(UserError, match="scale=0"):
        chip_scales(OmegaConf.create({"scale": 0}))


def plan(name: str, chips: list[tuple]) -> ScenePlan:
    return ScenePlan(Scene("c", name, None, None), [], None, False, 0.1, chips)


def test_batches_group_neighbouring_chips_of_one_scene_and_cap_the_total():
    chips = [(f"1_{i}", (i % 4) * 300, (i // 4) * 600, 256, 256, 1.0) for i in range(8)]
    plans = [plan("a", chips), plan("b", chips[:3])]
    cfg = OmegaConf.create({"shuffle": False, "seed": 0, "max_samples": None, "batch_chips": 4})
    batches = chip_batches(plans, cfg)
    assert [(i, len(specs)) for i, specs in batches] == [(0, 4), (0, 4), (1, 3)]
    assert [s[0] for s in batches[0][1]] == ["1_0", "1_1", "1_2", "1_3"]  # one 512 px strip first
    capped = chip_batches(plans, OmegaConf.merge(cfg, {"max_samples": 5}))
    assert sum(len(specs) for _, specs in capped) == 5


def test_resolutions_merge_with_an_existing_file_and_survive_a_corrupt_one(tmp_path):
    update_resolutions(tmp_path, {"c/a": 0.1234567})
    update_resolutions(tmp_path, {"c/b": 0.3})
    assert json.loads((tmp_path / "resolutions.json").read_text()) == {"c/a": 0.123457, "c/b": 0.3}
    (tmp_path / "resolutions.json").write_text("{not json")
    update_resolutions(tmp_path, {"c/a": 0.1})
    assert json.loads((tmp_path / "resolutions.json").read_text()) == {"c/a": 0.1}


RIO = "data/spacenet-rio"


def rio_pairs(shared, folder, ids=(4, 5, 6)):
    folder.mkdir()
    for i in ids:
        shutil.copy(shared / RIO / f"3band/3band_013022223130_Public_img{i}.tif", folder)
        shutil.copy(shared / RIO / f"geojson/013022223130_Public_img{i}_Geo.geojson", folder)
    return folder


def prep_config(base, out, **overrides):
    from dataset import default_config

    return default_config(base_dir=str(base), out_dir=str(out), source="pairs", num_workers=0, progress=False,
                          **overrides)


def test_an_unreadable_scene_is_reported_and_skipped_and_a_rerun_retries_it(shared, tmp_path, capsys):
    base = rio_pairs(shared, tmp_path / "pairs")
    labels = base / "013022223130_Public_img5_Geo.geojson"
    good = labels.read_bytes()
    labels.write_text("hello")
    first = write_chips(prep_config(base, tmp_path / "chips"))
    err = capsys.readouterr().err
    assert first["failed"] == [f"{labels}: not a readable vector file (not recognized as a supported file format)"]
    assert err == f"error: {first['failed'][0]} (scene skipped)\n"
    assert first["scenes"] == 2 and first["written"] > 0
    assert not (tmp_path / "chips" / "pairs" / "3band_013022223130_Public_img5").exists()
    labels.write_bytes(good)
    second = write_chips(prep_config(base, tmp_path / "chips"))
    assert second["failed"] == [] and second["skipped"] == first["written"] and second["written"] > 0
    assert (tmp_path / "chips" / "pairs" / "3band_013022223130_Public_img5").is_dir()


def test_grid_tiles_without_imagery_are_not_written(shared, tmp_path):
    base = rio_pairs(shared, tmp_path / "pairs", ids=(4,))
    summary = write_chips(prep_config(base, tmp_path / "chips", mode="grid", tile_size=64, negative_ratio=1.0))
    with rasterio.open(base / "3band_013022223130_Public_img4.tif") as ds:
        h, w = ds.shape
    assert summary["chips"] == len(window_offsets(h, 64, 0)) * len(window_offsets(w, 64, 0))  # every tile planned
    assert summary["nodata"] > 0 and summary["written"] == summary["chips"] - summary["nodata"]
    folder = tmp_path / "chips" / "pairs" / "3band_013022223130_Public_img4"
    assert len(list(folder.glob("*.jpg"))) == summary["written"]
    for ignore in folder.glob("*_ignore.png"):  # every chip written has some imagery
        assert (cv2.imread(str(ignore), cv2.IMREAD_GRAYSCALE) == 0).mean() >= MIN_VALID_SHARE


# --- instance ids: one id per building, the later of two overlapping footprints wins -------------------

KAMPALA = "data/kampala/kam"


def kampala_with_duplicates(shared, folder, copies=(5, 40, 77)):
    """The Kampala scene as an image/labels pair whose labels end with shifted (~1 m) copies of three
    buildings: three real overlapping pairs (the shared labels themselves have none over 1 %)."""
    import geopandas as gpd
    import pandas as pd
    from shapely import affinity

    folder.mkdir()
    (folder / "kam.tif").symlink_to(shared / KAMPALA / "81046528" / "81046528.tif")
    labels = gpd.read_file(shared / KAMPALA / "81046528-labels" / "81046528.geojson")
    extra = labels.iloc[list(copies)].copy()
    extra["geometry"] = [affinity.translate(g, 1e-5, 0) for g in extra.geometry]
    gpd.GeoDataFrame(pd.concat([labels, extra], ignore_index=True), crs=labels.crs).to_file(folder / "kam.geojson")
    return folder


def later_wins_oracle(labels, chip) -> np.ndarray:
    """Each footprint rasterised on its own (all_touched), in file order, later overwriting earlier."""
    from rasterio.features import rasterize
    from shapely.geometry import box

    ids = np.zeros(chip.shape, np.int32)
    near = box(*chip.bounds).buffer(abs(chip.res[0]))
    for k, geom in enumerate(labels.geometry):
        if not geom.intersects(near):
            continue
        ids[rasterize([geom], out_shape=chip.shape, transform=chip.transform, all_touched=True) > 0] = k + 1
    return ids


def test_overlapping_pairs_are_counted_once_per_scene_and_ids_follow_the_later_wins_rule(shared, tmp_path):
    import geopandas as gpd
    import shapely

    from lib.chip_writer import overlapping_pairs
    from lib.geo_io import load_footprints_report

    real, _ = load_footprints_report(shared / KAMPALA / "81046528-labels" / "81046528.geojson", "EPSG:3857")
    assert overlapping_pairs(np.asarray(real.geometry.values)) == 0  # one pair touches, sharing no area
    base = kampala_with_duplicates(shared, tmp_path / "in")
    with pytest.warns(DataWarning) as caught:
        summary = write_chips(prep_config(base, tmp_path / "chips", mode="grid", tile_size=1024, negative_ratio=0,
                                          image_format="tif"))
    overlap = [str(w.message) for w in caught if "of footprints" in str(w.message)]
    assert overlap == [f"{base / 'kam.geojson'}: 3 pairs of footprints overlap; shared pixels go to the later one"]
    assert summary["written"] == 6
    folder = tmp_path / "chips" / "in" / "kam"
    with rasterio.open(base / "kam.tif") as ds:
        labels = gpd.read_file(base / "kam.geojson").to_crs(ds.crs)
    labels["geometry"] = shapely.make_valid(labels.geometry.values)
    seen = set()
    for tif in sorted(folder.glob("*.tif")):
        ids = cv2.imread(str(tif.with_name(tif.stem + "_instances.png")), cv2.IMREAD_UNCHANGED)
        mask = cv2.imread(str(tif.with_name(tif.stem + "_mask.png")), cv2.IMREAD_UNCHANGED)
        assert ids.dtype == np.uint16 and np.array_equal(mask, (ids > 0).astype(np.uint8) * 255)
        with rasterio.open(tif) as chip:
            expected = later_wins_oracle(labels, chip)
        ignore = tif.with_name(tif.stem + "_ignore.png")
        if ignore.exists():
            expected[cv2.imread(str(ignore), cv2.IMREAD_UNCHANGED) > 0] = 0
        present = np.unique(expected[expected > 0])  # file indexes, ascending
        assert np.unique(ids[ids > 0]).tolist() == list(range(1, len(present) + 1))  # consecutive 1..K
        np.testing.assert_array_equal(ids, np.where(expected > 0, np.searchsorted(present, expected) + 1, 0))
        seen |= set(present.tolist())
    assert {109, 110, 111} <= seen  # the duplicates own pixels: they are later in the file


def test_a_rerun_over_chips_of_an_older_version_adds_the_missing_instance_files(shared, tmp_path):
    base = rio_pairs(shared, tmp_path / "pairs", ids=(4, 5))
    first = write_chips(prep_config(base, tmp_path / "chips"))
    files = sorted((tmp_path / "chips").rglob("*_instances.png"))
    assert len(files) == first["written"] > 0
    before = {p: cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in files}
    for p in files:
        p.unlink()
    second = write_chips(prep_config(base, tmp_path / "chips"))
    assert (second["written"], second["skipped"], second["instances_added"]) == (0, first["written"], len(files))
    for p, ids in before.items():
        assert np.array_equal(cv2.imread(str(p), cv2.IMREAD_UNCHANGED), ids)
    assert any(ids.max() > 0 for ids in before.values())

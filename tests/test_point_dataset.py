"""point_dataset: `dataset.py task=points` preparation, the scene split, balanced sampling and training chips."""

import os
import shutil
import subprocess
import sys

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
from rasterio.transform import from_origin
from shapely.geometry import Point

import dataset
import point_dataset as P
from lib.cli import REPO_DIR, compose_config
from lib.distributed import Dist
from lib.errors import UserError
from lib.image_sources import RasterSource
from lib.point_labels import point_table, read_xview3_csv
from lib.sar import SarSource
from lib.sar_demo import make_sar_demo


def config(**keys):
    return compose_config("dataset", ["task=points", "progress=false", *[f"{k}={v}" for k, v in keys.items()]])


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_sar_demo(tmp_path_factory.mktemp("sar") / "demo", n_scenes=2, size=512, seed=5)


@pytest.fixture(scope="module")
def prepared(demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    summary = P.prepare(config(base_dir=demo.root, labels=demo.labels, out_dir=out))
    assert summary["failed"] == [] and summary["written"] == 2
    return out


# ----- preparation ----------------------------------------------------------------------------------


def test_prepared_scenes_keep_the_input_grid_and_the_normalised_values(demo, prepared):
    for scene in demo.scenes:
        with rasterio.open(scene / "VV_dB.tif") as src, rasterio.open(prepared / "scenes" / f"{scene.name}.tif") as out:
            assert (out.crs, out.transform, out.width, out.height) == (src.crs, src.transform, src.width, src.height)
            assert out.count == 2 and out.dtypes == ("uint8", "uint8") and out.nodata == 0
            assert out.block_shapes == [(256, 256)] * 2 and out.descriptions == ("VV", "VH")
            assert out.tags()["sar_offset"] == "-10,-17" and out.tags()["channels"] == "VV,VH"
            data = np.moveaxis(out.read(), 0, -1)
            nodata = src.read(1) == -32768
        with SarSource(scene) as sar:
            expected, valid = sar.read(0, 0, sar.height, sar.width)
        assert np.array_equal(data, expected) and np.array_equal(valid, ~nodata)
        assert (data[nodata] == 0).all() and (data[~nodata] > 0).all()


def test_points_and_scenes_tables(demo, prepared):
    points = pd.read_csv(prepared / "points.csv", keep_default_na=False, na_values={"is_vessel": [""]})
    labels = read_xview3_csv(demo.labels)
    assert len(points) == len(labels)
    assert np.array_equal(points[["row", "col"]].to_numpy(), labels[["row", "col"]].to_numpy())
    scenes, loaded = P.load_prepared(prepared)
    assert [s.scene_id for s in scenes] == ["sar5_00", "sar5_01"] and scenes[0].gsd == 10.0
    assert (scenes[0].height, scenes[0].width) == (512, 512) and scenes[0].path.is_file()
    pd.testing.assert_frame_equal(loaded, labels, check_dtype=False)
    table = pd.read_csv(prepared / "scenes.csv")
    assert table.points.tolist() == labels.groupby("scene_id").size().tolist()


def test_rerun_keeps_what_is_prepared(demo, prepared):
    tif = prepared / "scenes" / "sar5_00.tif"
    before = tif.stat().st_mtime_ns
    summary = P.prepare(config(base_dir=demo.root, labels=demo.labels, out_dir=prepared))
    assert (summary["written"], summary["skipped"]) == (0, 2) and tif.stat().st_mtime_ns == before
    summary = P.prepare(config(base_dir=demo.root, labels=demo.labels, out_dir=prepared, sar_offset="[-11,-17]"))
    assert summary["written"] == 2  # another normalisation is another preparation


def test_one_bad_scene_never_stops_the_others(demo, tmp_path, capsys):
    root = tmp_path / "scenes"
    for scene in demo.scenes:
        shutil.copytree(scene, root / scene.name)
    (root / "broken").mkdir()
    shutil.copy(demo.scenes[0] / "VV_dB.tif", root / "broken" / "VV_dB.tif")
    with pytest.raises(SystemExit) as exit_:
        P.main(config(base_dir=root, labels=demo.labels, out_dir=tmp_path / "out"))
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == f"error: {root / 'broken' / 'VH_dB.tif'}: channel VH is missing (scene broken needs VV_dB.tif, " \
                     "VH_dB.tif) (scene skipped)"
    assert err[-1].startswith("error: 1 scene(s) could not be read")
    table = pd.read_csv(tmp_path / "out" / "scenes.csv")
    assert table.scene_id.tolist() == ["sar5_00", "sar5_01"]


def test_labels_of_unknown_scenes_stop_before_anything_is_written(demo, tmp_path):
    labels = pd.read_csv(demo.labels)
    labels.loc[0, "scene_id"] = "ghost"
    labels.to_csv(tmp_path / "labels.csv", index=False)
    with pytest.raises(UserError, match="scene id.* not found among the scenes: ghost$"):
        P.prepare(config(base_dir=demo.root, labels=tmp_path / "labels.csv", out_dir=tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_image_and_points_variant_keeps_the_georeferencing(drone, tmp_path):
    with rasterio.open(drone) as ds:
        crs, transform, shape = ds.crs, ds.transform, (ds.height, ds.width)
    rc = [(10, 20), (300, 400), (shape[0] - 1, shape[1] - 1)]
    pts = gpd.GeoDataFrame({"confidence": ["HIGH", "LOW", ""]},
                           geometry=[Point(*(transform * (c + 0.5, r + 0.5))) for r, c in rc], crs=crs)
    pts.to_crs("EPSG:4326").to_file(tmp_path / "points.geojson")
    summary = P.prepare(config(image=drone, points=tmp_path / "points.geojson", out_dir=tmp_path / "out"))
    assert summary["points"] == 3
    with rasterio.open(tmp_path / "out" / "scenes" / "drone.tif") as out:
        assert (out.crs, out.transform, (out.height, out.width)) == (crs, transform, shape)
        data = np.moveaxis(out.read(), 0, -1)
    with RasterSource(drone) as src:
        rgb, valid = src.read(0, 0, *shape)
    assert np.array_equal(data, np.where(valid[..., None], np.maximum(rgb, 1), 0))
    _, points = P.load_prepared(tmp_path / "out")
    np.testing.assert_allclose(points[["row", "col"]].to_numpy(), rc, atol=1e-6)
    assert points.confidence.tolist() == ["HIGH", "LOW", ""]


@pytest.mark.slow
def test_dataset_cli_dispatches_task_points(demo, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "dataset.py", "task=points", f"base_dir={demo.root}",
                          f"labels={demo.labels}", f"out_dir={tmp_path / 'out'}", "progress=false"],
                         cwd=REPO_DIR, capture_output=True, text=True, env=env, check=False)
    assert run.returncode == 0, run.stderr
    assert "2 scene(s) prepared (2 written, 0 already there)" in run.stdout
    bad = subprocess.run([sys.executable, "dataset.py", "task=boxes"], cwd=REPO_DIR, capture_output=True, text=True,
                         env=env, check=False)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: task=boxes: use segmentation or points"


# ----- split and balanced sampling ------------------------------------------------------------------


def test_split_scenes_holds_out_whole_scenes_stratified():
    scenes = [f"s{i}" for i in range(8)]
    points = point_table([f"s{i}" for i in range(8) for _ in range(3)], np.zeros(24), np.zeros(24),
                         is_vessel=np.ones(24), is_fishing=[float(i < 4) for i in range(8) for _ in range(3)])
    folds = [P.split_scenes(scenes, f, 4, seed=1, points=points) for f in range(4)]
    vals = [v for _, v in folds]
    assert sorted(s for v in vals for s in v) == scenes and all(len(v) == 2 for v in vals)
    for (train, val) in folds:
        assert set(train) | set(val) == set(scenes) and not set(train) & set(val)
    assert all(sum(int(s[1:]) < 4 for s in v) == 1 for v in vals)  # one fishing scene per fold
    with pytest.raises(UserError, match="fold=4"):
        P.split_scenes(scenes, 4, 4)


def lone_points(kinds, spacing=1000.0):
    """Points far apart in one scene; kinds: (is_vessel, is_fishing, distance_from_shore_km) per object."""
    n = len(kinds)
    v, f, d = (np.array(x, dtype=float) for x in zip(*kinds))
    return point_table("s", np.arange(n) * spacing, np.zeros(n), v, f, None, None, d)


def test_balanced_weights_balance_every_attribute_at_once():
    kinds = ([(1, 0, 10)] * 60 + [(1, 1, 10)] * 15 + [(1, 0, 1)] * 10 + [(0, np.nan, 10)] * 8 + [(0, np.nan, 0.5)] * 2
             + [(np.nan, np.nan, np.nan)] * 5)
    pts = lone_points(kinds)
    w = P.balanced_weights(pts)
    assert w.sum() == pytest.approx(1.0) and (w > 0).all()
    for name, cls in P.attribute_classes(pts).items():
        share = w[cls == 1].sum() / w[cls >= 0].sum()
        assert share == pytest.approx(0.5, abs=1e-6), name
    assert np.allclose(w[-5:], w[-1])  # unknown everywhere: untouched by the raking, equal among themselves


def test_a_rare_class_is_drawn_about_as_often_as_a_common_one():
    pts = lone_points([(1, 0, 10)] * 95 + [(0, np.nan, 10)] * 5)
    w = P.balanced_weights(pts)
    sampler = dataset.EpochBatches(len(w), 50, seed=0, d=Dist(), weights=w)
    drawn = np.concatenate([sampler.indices(e) for e in range(40)])
    assert abs(np.mean(drawn >= 95) - 0.5) < 0.03  # 5 % of the objects, half of the draws


def test_crowded_objects_are_drawn_less():
    rows = np.r_[np.arange(9) * 5.0, 1000.0, 2000.0]  # a cluster of 9 within 40 px, two lone objects
    pts = point_table("s", rows, np.zeros(11), is_vessel=np.ones(11))
    w = P.balanced_weights(pts)
    assert np.allclose(w[:9].sum(), w[9], rtol=0.35) and w[9] == pytest.approx(w[10])
    assert (w[:9] < w[9] / 3).all()


# ----- training chips ---------------------------------------------------------------------------------


@pytest.fixture
def dots(tmp_path):
    """A prepared 2-band 200 x 240 scene: grey 40 with single bright pixels (250, 200) at known objects."""
    rc = np.array([(30, 40), (31, 44), (100, 120), (150, 200), (5, 230), (190, 3)])
    data = np.full((2, 200, 240), 40, np.uint8)
    data[0][tuple(rc.T)] = 250
    data[1][tuple(rc.T)] = 200
    path = tmp_path / "scenes" / "dots.tif"
    path.parent.mkdir()
    profile = {"driver": "GTiff", "width": 240, "height": 200, "count": 2, "dtype": "uint8", "nodata": 0,
               "crs": "EPSG:32631", "transform": from_origin(500_000, 5_800_000, 10, 10)}
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        dst.update_tags(channels="VV,VH")
    scene = P.PreparedScene("dots", path, 200, 240, 10.0)
    lengths = [50.0, 30.0, np.nan, 120.0, 80.0, 20.0]
    points = point_table("dots", rc[:, 0], rc[:, 1], np.ones(6), np.zeros(6), lengths)
    return scene, points, rc


def only(chips, name_part):
    for t in chips.transform.transforms:
        t.p = 1.0 if name_part in type(t).__name__ else 0.0


def test_object_chips_contain_their_object_and_stay_in_the_scene(dots):
    scene, points, rc = dots
    chips = P.PointChips([scene], points, tile_size=64, augment=False)
    assert len(chips) == 6 + 1 and chips.weights[:6].sum() == pytest.approx(0.9)
    for i in range(6):
        for seed in range(5):
            chips.transform.set_random_seed(seed)
            c = chips.chip(i)
            r0, c0 = c["origin"]
            assert 0 <= r0 <= 200 - 64 and 0 <= c0 <= 240 - 64
            here = np.hypot(c["rows"] - (rc[i, 0] - r0), c["cols"] - (rc[i, 1] - c0)).min()
            assert here == 0 and c["image"][rc[i, 0] - r0, rc[i, 1] - c0, 0] == 250


def test_keypoints_follow_flips_exactly(dots):
    scene, points, rc = dots
    chips = P.PointChips([scene], points, tile_size=64)
    only(chips, "Flip")
    for seed in range(6):
        chips.transform.set_random_seed(seed)
        c = chips.chip(seed % 6)
        r0, c0 = c["origin"]
        rows, cols = rc[:, 0] - r0, rc[:, 1] - c0
        inside = (rows >= 0) & (rows < 64) & (cols >= 0) & (cols < 64)
        expected = sorted(zip(63 - rows[inside], 63 - cols[inside]))
        got = sorted(zip(c["rows"][(c["rows"] >= 0) & (c["rows"] < 64) & (c["cols"] >= 0) & (c["cols"] < 64)],
                         c["cols"][(c["rows"] >= 0) & (c["rows"] < 64) & (c["cols"] >= 0) & (c["cols"] < 64)]))
        assert got == expected and len(got) >= 1
        for r, col in got:
            assert c["image"][int(r), int(col)].tolist() == [250, 200]


def test_keypoints_and_lengths_follow_rotation_and_scale(dots):
    scene, points, _ = dots
    chips = P.PointChips([scene], points, tile_size=64)
    only(chips, "Affine")
    for seed in range(6):
        chips.transform.set_random_seed(seed)
        c = chips.chip(seed % 6)
        before = chips.points.length_m.to_numpy() / 10.0
        img = c["image"][..., 0].astype(float) - 40
        ratios = []
        for r, col, length in zip(c["rows"], c["cols"], c["length_px"]):
            ir, ic = round(float(r)), round(float(col))
            if not (3 <= ir < 61 and 3 <= ic < 61):
                continue
            win = np.clip(img[ir - 3:ir + 4, ic - 3:ic + 4], 0, None)
            yy, xx = np.mgrid[ir - 3:ir + 4, ic - 3:ic + 4]
            assert abs((win * yy).sum() / win.sum() - r) < 0.3 and abs((win * xx).sum() / win.sum() - col) < 0.3
            if np.isfinite(length):
                ratios.append(length / before[np.nanargmin(np.abs(before - length))])
        assert all(0.9 - 1e-6 <= q <= 1.1 + 1e-6 for q in ratios)
    assert np.isnan(chips.chip(2)["length_px"]).any()  # an unknown length stays unknown


def test_items_are_tensors_and_a_pure_function_of_their_key(dots):
    pytest.importorskip("lib.point_targets")
    from lib.point_contract import T_HEATMAP, TARGETS

    scene, points, _ = dots
    chips = P.PointChips([scene], points, tile_size=64)
    items = dataset.SeededItems(chips, seed=3, stream=0)
    a, b, other = items[(2, 1)], items[(2, 1)], items[(3, 1)]
    assert set(a) == {"image", *TARGETS}
    assert a["image"].shape == (2, 64, 64) and a["image"].dtype.is_floating_point
    assert 0 <= float(a["image"].min()) and float(a["image"].max()) <= 1
    assert a[T_HEATMAP].shape == (1, 32, 32) and float(a[T_HEATMAP].max()) == 1.0
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
    assert not np.array_equal(a["image"].numpy(), other["image"].numpy())


def test_random_chips_cover_the_scenes(demo, prepared):
    scenes, points = P.load_prepared(prepared)
    chips = P.PointChips(scenes, points, tile_size=128, augment=False)
    assert chips.weights[:chips.n_objects].sum() == pytest.approx(0.9) and chips.weights.sum() == pytest.approx(1.0)
    origins = set()
    for seed in range(30):
        chips.transform.set_random_seed(seed)
        k, r, c = chips.place(chips.n_objects, chips.transform.random_generator)
        assert 0 <= r <= 512 - 128 and 0 <= c <= 512 - 128
        origins.add((k, r // 128, c // 128))
    assert len({o[0] for o in origins}) == 2 and len(origins) > 10
    with pytest.raises(UserError, match="multiple of 32"):
        P.PointChips(scenes, points, tile_size=100)

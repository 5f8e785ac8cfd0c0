"""benchmarks/kampala_holdout.py's cut of the real Kampala scene: the documented holdout on the right and
its mirror on the left are disjoint strips of the scene, georeferenced where they lie, with their buildings."""

import geopandas as gpd
import pytest
import rasterio
import shapely
from standins import benchmark_module


def _benchmark():
    return benchmark_module("kampala_holdout")


@pytest.mark.slow
def test_the_mirrored_holdout_is_the_left_strip_and_shares_no_building_with_the_right_one(tmp_path, shared):
    bench = _benchmark()
    with rasterio.open(bench.SCENE) as ds:
        scene_bounds, width, res = ds.bounds, ds.width, ds.res[0]
    strips = {}
    for side in ("right", "left"):
        paths = bench.split_scene(tmp_path / side, 2048, side)
        with rasterio.open(paths["test_image"]) as hold, \
                rasterio.open(paths["train_dir"] / "kampala_train.tif") as train:
            assert (hold.width, train.width) == (width - 2048, 2048)
            assert hold.crs and hold.crs == train.crs
            strips[side] = shapely.box(*hold.bounds)
            # the two parts tile the scene side by side, in the scene's own grid
            left, right = (train, hold) if side == "right" else (hold, train)
            assert left.bounds.left == pytest.approx(scene_bounds.left)
            assert right.bounds.left == pytest.approx(left.bounds.right)
            assert right.bounds.right == pytest.approx(scene_bounds.right)
            assert left.res[0] == pytest.approx(res)
            truth = gpd.read_file(paths["test_truth"]).to_crs(hold.crs)
        assert len(truth) > 20
        assert truth.geometry.within(strips[side].buffer(res)).all()  # clipped to the holdout strip
    assert strips["left"].intersection(strips["right"]).area == 0
    assert strips["left"].bounds[0] == pytest.approx(scene_bounds.left)


@pytest.mark.slow
def test_a_work_folder_cut_one_way_refuses_another_cut(tmp_path, shared):
    bench = _benchmark()
    bench.split_scene(tmp_path, 2048, "right")
    assert bench.split_scene(tmp_path, 2048, "right")["test_truth"].exists()  # the same cut is reused
    with pytest.raises(SystemExit, match="already cut with --split 2048 --side right"):
        bench.split_scene(tmp_path, 2048, "left")

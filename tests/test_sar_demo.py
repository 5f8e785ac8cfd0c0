"""lib.sar_demo: deterministic synthetic SAR scenes in the xView3 layout whose labels sit on the vessels."""

import numpy as np
import pandas as pd
import pytest
import rasterio

from lib.point_labels import read_xview3_csv
from lib.sar_demo import make_sar_demo
from lib.xview3_metric import GT_COLUMNS, _shoreline, read_labels


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_sar_demo(tmp_path_factory.mktemp("sar") / "demo", n_scenes=2, size=768, seed=3)


def read_db(path):
    with rasterio.open(path) as ds:
        return ds.read(1), ds.crs, ds.transform, ds.nodata


def test_layout_and_georeferencing(demo):
    assert [p.name for p in demo.scenes] == ["sar3_00", "sar3_01"]
    transforms = []
    for scene in demo.scenes:
        vv, crs, transform, nodata = read_db(scene / "VV_dB.tif")
        vh, crs_h, transform_h, _ = read_db(scene / "VH_dB.tif")
        assert vv.shape == vh.shape == (768, 768) and vv.dtype == np.float32
        assert crs == crs_h and crs.to_epsg() == 32631 and crs.is_projected
        assert transform == transform_h and (transform.a, transform.e) == (10.0, -10.0)
        assert nodata == -32768
        corner = vv == -32768
        assert 0.003 < corner.mean() < 0.02 and np.array_equal(corner, vh == -32768)
        assert (demo.shoreline_dir / f"{scene.name}_shoreline.npy").is_file()
        transforms.append(transform)
    assert transforms[0] != transforms[1]


def test_same_seed_same_scenes_other_seed_other_scenes(demo, tmp_path):
    again = make_sar_demo(tmp_path / "again", n_scenes=1, size=768, seed=3)
    other = make_sar_demo(tmp_path / "other", n_scenes=1, size=768, seed=4)
    a = read_db(demo.scenes[0] / "VV_dB.tif")[0]
    assert np.array_equal(a, read_db(again.scenes[0] / "VV_dB.tif")[0])
    labels = pd.read_csv(demo.labels)
    assert labels[labels.scene_id == "sar3_00"].reset_index(drop=True).equals(pd.read_csv(again.labels))
    assert not np.array_equal(a, read_db(other.scenes[0] / "VV_dB.tif")[0])


def test_labels_sit_on_bright_pixels(demo):
    objects = pd.read_csv(demo.objects)
    for scene in demo.scenes:
        vv = read_db(scene / "VV_dB.tif")[0]
        vh = read_db(scene / "VH_dB.tif")[0]
        objs = objects[objects.scene_id == scene.name]
        sea = vv[(vv > -32768) & (vv < -9)]  # open sea, far below land and targets
        at = vv[objs.row, objs.col]
        assert at.min() > np.percentile(sea, 99.9) and at.min() > -6
        assert vh[objs.row, objs.col].min() > -14
        # a lone object's label is its brightest pixel, up to the speckle of its sea background (VV)
        rc = objs[["row", "col"]].to_numpy(float)
        gap = np.hypot(*(rc[:, None] - rc[None]).transpose(2, 0, 1))
        np.fill_diagonal(gap, np.inf)
        lone = gap.min(axis=1) > 10
        assert lone.sum() > 30
        for r, c in zip(objs.row[lone], objs.col[lone]):
            assert vv[r, c] >= vv[r - 1:r + 2, c - 1:c + 2].max() - 1.0


def test_label_csv_is_xview3_with_unknowns_low_and_unlabelled(demo):
    raw = pd.read_csv(demo.labels, keep_default_na=False)
    assert tuple(raw.columns) == GT_COLUMNS
    labels = read_labels(demo.labels)  # the metric's own reader accepts it
    objects = pd.read_csv(demo.objects)
    assert len(labels) == objects.labelled.sum() < len(objects)
    for scene, n in objects.groupby("scene_id").size().items():
        assert 40 <= n <= 85, scene
    assert labels.is_vessel.isna().any() and labels.is_fishing.isna().any() and labels.vessel_length_m.isna().any()
    assert set(labels.confidence) == {"HIGH", "MEDIUM", "LOW"}
    assert (labels.is_fishing == 1).sum() >= 10 and (labels.is_vessel == 0).sum() >= 5
    near = labels.distance_from_shore_km <= 2
    assert 0.15 < near.mean() < 0.6
    known = objects.length_m
    assert known.min() >= 15 and known.max() <= 300
    points = read_xview3_csv(demo.labels, [p.name for p in demo.scenes])
    assert len(points) == len(labels)


def test_close_pairs_exist(demo):
    objects = pd.read_csv(demo.objects)
    gaps = []
    for _, objs in objects.groupby("scene_id"):
        rc = objs[["row", "col"]].to_numpy(float)
        d = np.hypot(*(rc[:, None] - rc[None]).transpose(2, 0, 1))
        np.fill_diagonal(d, np.inf)
        gaps.append(d.min(axis=1))
    gaps = np.concatenate(gaps)
    assert ((gaps >= 2.5) & (gaps <= 6.5)).sum() >= 6  # three pairs per scene, each counted twice per scene


def test_shoreline_matches_distance_from_shore(demo):
    labels = read_labels(demo.labels)
    for scene in demo.scenes:
        contour = _shoreline(demo.shoreline_dir, scene.name)
        assert contour.shape[1] == 2 and len(contour) > 500
        lab = labels[labels.scene_id == scene.name]
        rc = lab[["detect_scene_row", "detect_scene_column"]].to_numpy(float)
        d_km = np.min(np.hypot(*(rc[:, None] - contour[None]).transpose(2, 0, 1)), axis=1) * 10 / 1000
        assert np.allclose(d_km, lab.distance_from_shore_km, atol=0.03)

"""The built-in demo scene: deterministic, georeferenced, labels that match the painted roofs."""

import csv
import json

import geopandas as gpd
import numpy as np
import pystac
import pytest
import rasterio
from rasterio.enums import ColorInterp
from rasterio.features import rasterize

import dataset
from lib import demo_scene
from lib.demo_scene import big_scene, ensure_demo_scene, generate_scene
from lib.scene_sources import pair_scenes, stac_scenes


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return ensure_demo_scene(tmp_path_factory.mktemp("demo") / "demo")


def test_generate_scene_is_deterministic_in_its_seed():
    a, b, c = generate_scene(3, (256, 320)), generate_scene(3, (256, 320)), generate_scene(4, (256, 320))
    np.testing.assert_array_equal(a.rgba, b.rgba)
    assert [p.wkt for p in a.footprints] == [p.wkt for p in b.footprints] and a.roofs == b.roofs
    assert not np.array_equal(a.rgba, c.rgba)
    assert a.rgba.shape == (4, 256, 320) and a.rgba.dtype == np.uint8


def test_footprints_are_exactly_the_painted_roofs_on_the_utm_grid():
    scene = generate_scene(7, (512, 640))
    assert scene.crs == "EPSG:32636" and scene.transform.a == 0.1 and scene.transform.e == -0.1
    burned = rasterize(scene.footprints, out_shape=(512, 640), transform=scene.transform) > 0
    np.testing.assert_array_equal(burned, scene.drawn)
    assert 10 <= len(scene.footprints) <= 40
    # roofs stand out from their surroundings (what makes the demo learnable)
    rgb = scene.rgba[:3].astype(float)
    ring = np.zeros_like(scene.drawn)
    for dy, dx in ((6, 0), (-6, 0), (0, 6), (0, -6)):
        ring |= np.roll(scene.drawn, (dy, dx), axis=(0, 1))
    ring &= ~scene.drawn
    contrast = np.abs(rgb[:, scene.drawn].mean(1) - rgb[:, ring].mean(1)).max()
    assert contrast > 15


def test_no_data_corner_has_alpha_zero_and_black_pixels():
    scene = generate_scene(1, (400, 400))
    alpha = scene.rgba[3]
    assert 0.01 < (alpha == 0).mean() < 0.1 and alpha[-1, 0] == 0 and alpha[0, -1] == 255
    assert not scene.rgba[:3, alpha == 0].any()
    assert generate_scene(1, (64, 64), nodata_corner=False).rgba[3].min() == 255


def test_demo_is_an_open_cities_stac_catalog_with_georeferenced_rgba_scenes(demo):
    catalog = pystac.Catalog.from_file(str(demo / "catalog.json"))
    (collection,) = list(catalog.get_children())
    assert collection.id == "demo"
    items = {i.id: i for i in collection.get_items()}
    assert set(items) == {"demo_a", "demo_b", "demo_c", "demo_a-labels", "demo_b-labels", "demo_c-labels"}
    for name in ("demo_a", "demo_b", "demo_c"):
        label_item = items[f"{name}-labels"]
        assert label_item.properties["label:type"] == "vector"
        assert label_item.get_single_link("source").resolve_stac_object(root=catalog).target.id == name
        image = demo / "demo" / name / f"{name}.tif"
        assert items[name].assets["image"].get_absolute_href() == str(image)
        with rasterio.open(image) as ds:
            assert ds.crs.to_epsg() == 32636 and ds.res == (0.1, 0.1) and (ds.width, ds.height) == (1280, 1280)
            assert list(ds.colorinterp) == [ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.alpha]
            alpha = ds.read(4)
        labels = gpd.read_file(demo / "demo" / f"{name}-labels" / f"{name}.geojson")
        assert labels.crs.to_epsg() == 4326 and 100 <= len(labels) <= 220  # lots x 1.5: rows of touching roofs
        assert labels["roof"].nunique() >= 4
        # the GeoJSON, reprojected back to UTM, still burns exactly the generator's roofs
        scene = generate_scene(demo_scene.DEMO_SEED + ("demo_a", "demo_b", "demo_c").index(name), (1280, 1280))
        burned = rasterize(labels.to_crs(32636).geometry, out_shape=(1280, 1280), transform=ds.transform) > 0
        assert (burned != scene.drawn).sum() <= 0.001 * scene.drawn.sum()
        assert (alpha == 0).any()
    assert [s.key for s in stac_scenes(demo / "catalog.json")] == ["demo/demo_a", "demo/demo_b", "demo/demo_c"]
    rows = list(csv.DictReader((demo / "train_metadata.csv").open()))
    assert all((demo / r["img_uri"]).exists() and (demo / r["label_uri"]).exists() for r in rows) and len(rows) == 3


def test_demo_has_a_held_out_labelled_test_pair(demo):
    image, labels = demo / "test" / "images" / "demo_test.tif", demo / "test" / "labels" / "demo_test.geojson"
    with rasterio.open(image) as ds:
        assert ds.crs.to_epsg() == 32636 and (ds.width, ds.height) == (1024, 1024)
    info = json.loads((demo / "demo.json").read_text())
    assert len(gpd.read_file(labels)) == info["test"]["demo_test"] > 30
    assert [s.name for s in pair_scenes(demo / "test")] == ["demo_test"]


@pytest.mark.slow
def test_ensure_demo_scene_generates_once_and_replaces_an_outdated_one(tmp_path):
    root = tmp_path / "demo"
    assert ensure_demo_scene(root) == root
    stamp = (root / "catalog.json").stat().st_mtime_ns
    ensure_demo_scene(root)
    assert (root / "catalog.json").stat().st_mtime_ns == stamp
    info = json.loads((root / "demo.json").read_text())
    (root / "demo.json").write_text(json.dumps({**info, "generator_version": 0}))
    (root / "chips").mkdir()
    ensure_demo_scene(root)
    assert json.loads((root / "demo.json").read_text())["generator_version"] == demo_scene.GENERATOR_VERSION
    assert not (root / "chips").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]  # no temporary folders left behind


def test_big_scene_holds_about_the_requested_number_of_buildings():
    scene = big_scene(600, seed=2)
    assert abs(len(scene.footprints) - 600) < 60
    assert scene.transform.a == pytest.approx(0.3)
    assert scene.rgba.shape[1] == scene.rgba.shape[2] == demo_scene.size_for_buildings(600, demo_scene.CELL_METRES / 0.3)


@pytest.mark.slow
def test_demo_chips_dir_prepares_chips_once_for_training(tmp_path, monkeypatch):
    monkeypatch.setenv("BUILDINGS_DEMO_DIR", str(tmp_path / "demo"))
    chips_dir = dataset.demo_chips_dir()
    assert chips_dir == tmp_path / "demo" / "chips"
    chips = dataset.list_chips(chips_dir)
    assert len(chips) >= 240 and all(c.mask is not None for c in chips)
    stamp = chips[0].image.stat().st_mtime_ns
    assert dataset.demo_chips_dir() == chips_dir and chips[0].image.stat().st_mtime_ns == stamp
    train, val = dataset.split_folds(chips, 0)
    assert {c.scene for c in val} and not {c.scene for c in val} & {c.scene for c in train}
    item = dataset.ChipDataset(train, dataset.train_transform(256))[0]
    assert item["image"].shape == (3, 256, 256) and item["gsd"].item() == pytest.approx(0.1)


def test_scenes_hold_rows_of_touching_roofs_each_its_own_label_polygon():
    import shapely

    scene = generate_scene(7, (512, 640))
    geoms = np.asarray(scene.footprints, dtype=object)
    tree = shapely.STRtree(geoms)
    pairs = [(i, j) for i, j in zip(*tree.query(geoms, predicate="touches")) if i < j]
    walls = [geoms[i].intersection(geoms[j]) for i, j in pairs]
    # touching neighbours share a whole wall (an edge metres long), never overlap
    assert len(pairs) >= 5 and all(w.length > 2.0 and w.area == 0 for w in walls)
    assert shapely.area(shapely.union_all(geoms)) == pytest.approx(shapely.area(geoms).sum())
    # each roof is its own label: a blob of the mask holds several of them
    n_blobs = len(shapely.get_parts(shapely.union_all(geoms)))
    assert n_blobs <= len(geoms) - 5
    assert len(generate_scene(7, (512, 640), clusters=0.0).footprints) < len(geoms)

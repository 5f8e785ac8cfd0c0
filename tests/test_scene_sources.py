"""lib.scene_sources: which layout a dataset folder is, and the scenes (image + labels) found in it."""

import os

import pytest

from lib.errors import UserError
from lib.scene_sources import csv_scenes, detect_source, pair_scenes, tile_id


def touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("x")
    return path


def test_detect_source_prefers_a_catalog_then_a_csv_index_then_pairs(tmp_path):
    assert detect_source(tmp_path) == ("pairs", tmp_path)
    csv = touch(tmp_path / "train_metadata.csv")
    assert detect_source(tmp_path) == ("csv", csv)
    catalog = touch(tmp_path / "train_tier_2" / "catalog.json")
    assert detect_source(tmp_path, process_tier=2) == ("stac", catalog)
    assert detect_source(tmp_path, "csv", process_tier=2) == ("csv", csv)
    assert detect_source(csv) == ("csv", csv)


def test_detect_source_names_what_is_missing(tmp_path):
    with pytest.raises(UserError, match="base_dir does not exist"):
        detect_source(tmp_path / "nope")
    with pytest.raises(UserError, match="catalog.json for source=stac"):
        detect_source(tmp_path, "stac")
    with pytest.raises(UserError, match="source=zip: use one of"):
        detect_source(tmp_path, "zip")


def test_kampala_is_a_stac_catalog_and_also_has_a_csv_index(shared):
    base = shared / "data" / "kampala"
    assert detect_source(base)[0] == "stac"
    assert detect_source(base, "csv")[0] == "csv"


def test_tile_ids_pair_spacenet_and_plain_names():
    assert tile_id("3band_013022223130_Public_img4") == tile_id("013022223130_Public_img4_Geo")
    assert tile_id("RGB-PanSharpen_AOI_2_Vegas_img5") == tile_id("buildings_AOI_2_Vegas_img5")
    assert tile_id("sample") == "sample"


def test_pairs_match_images_to_labels_by_tile_id_and_skip_the_output_folder(tmp_path):
    touch(tmp_path / "3band" / "3band_A_img1.tif")
    touch(tmp_path / "geojson" / "A_img1_Geo.geojson")
    touch(tmp_path / "out" / "old.tif")
    (scene,) = pair_scenes(tmp_path, exclude=tmp_path / "out")
    assert (scene.collection, scene.name, scene.labels.name) == (tmp_path.name, "3band_A_img1", "A_img1_Geo.geojson")
    assert scene.key == f"{tmp_path.name}/3band_A_img1"
    touch(tmp_path / "more" / "A_img1.geojson")
    with pytest.raises(UserError, match="several label files match"):
        pair_scenes(tmp_path, exclude=tmp_path / "out")


def test_csv_index_rows_become_scenes_and_missing_columns_are_named(tmp_path):
    index = tmp_path / "train_metadata.csv"
    index.write_text("img_uri,label_uri\nacc/665946/665946.tif,acc/665946-labels/665946.geojson\n")
    (scene,) = csv_scenes(index)
    assert (scene.collection, scene.name, scene.image) == ("acc", "665946", tmp_path / "acc/665946/665946.tif")
    index.write_text("image,labels\na.tif,a.geojson\n")
    with pytest.raises(UserError, match=r"missing column\(s\) img_uri, label_uri"):
        csv_scenes(index)


def test_pairs_follow_symlinked_folders_and_collect_per_scene_problems(tmp_path):
    real = tmp_path / "elsewhere"
    touch(real / "3band" / "3band_A_img1.tif")
    touch(real / "3band" / "3band_A_img2.tif")  # no labels
    touch(real / "geojson" / "A_img1_Geo.geojson")
    base = tmp_path / "base"
    base.mkdir()
    os.symlink(real / "3band", base / "3band")
    os.symlink(real / "geojson", base / "geojson")
    os.symlink(base, base / "3band" / "loop")  # a cycle
    with pytest.raises(UserError, match="3band_A_img2.tif: label file missing"):
        pair_scenes(base)
    failures = []
    (scene,) = pair_scenes(base, failures=failures)
    assert (scene.name, scene.image, scene.labels) == ("3band_A_img1", base / "3band" / "3band_A_img1.tif",
                                                        base / "geojson" / "A_img1_Geo.geojson")
    assert len(failures) == 1 and failures[0].startswith(f"{base / '3band' / '3band_A_img2.tif'}: label file missing")

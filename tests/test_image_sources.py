"""lib/image_sources.py: which input images a run finds (symlinked folders too) and which it can read."""

import os
import shutil

import pytest

from lib.errors import UserError
from lib.image_sources import ImageInput, check_images, list_images


def test_symlinked_folders_are_searched_once_and_a_link_cycle_ends(drone, tmp_path):
    real = tmp_path / "real" / "tiles"
    real.mkdir(parents=True)
    shutil.copy(drone, real / "a.tif")
    shutil.copy(drone, real / "b.tif")
    data = tmp_path / "data"
    data.mkdir()
    os.symlink(real, data / "linked")
    os.symlink(data, data / "linked" / "loop")  # a cycle back to the top
    images = list_images(data)
    assert [(im.stem, im.path) for im in images] == [("a", data / "linked" / "a.tif"), ("b", data / "linked" / "b.tif")]
    os.symlink(data / "linked", tmp_path / "top")  # data_dir itself a link
    assert [im.stem for im in list_images(tmp_path / "top")] == ["a", "b"]


def test_one_unreadable_image_is_set_aside_and_the_others_are_checked(drone, tmp_path):
    shutil.copy(drone, tmp_path / "b_good.tif")
    (tmp_path / "a_bad.tif").write_bytes(drone.read_bytes()[:5000])
    images = list_images(tmp_path) + [ImageInput("gone", tmp_path / "gone.tif")]
    readable, pixels, failures = check_images(images)
    assert [im.stem for im in readable] == ["b_good"] and pixels == [576 * 923]
    assert [f.image.stem for f in failures] == ["a_bad", "gone"]
    assert failures[0].message.startswith(f"{tmp_path / 'a_bad.tif'}: corrupt or truncated raster (")
    assert failures[1].message == f"{tmp_path / 'gone.tif'}: image file does not exist"
    _, _, failures = check_images(readable, bands=[5, 3, 2])  # a 3-band file has no band 5
    assert failures[0].message.endswith("bands=[5, 3, 2] but the file has 3 band(s) (indexes are 1-based)")
    with pytest.raises(UserError, match="bands=\\[0\\]"):
        check_images(readable, bands=[0])

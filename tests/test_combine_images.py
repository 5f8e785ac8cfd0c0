"""combine_images.py: averaging inference runs into an ensemble run folder, or into soft labels."""

import json

import numpy as np
import pytest
import rasterio
import torch
from standins import PositionalModel, infer_cfg, read

from lib.cli import compose_config
from lib.errors import UserError

torch.set_num_threads(1)


@pytest.mark.slow
def test_five_seed_tta_runs_are_averaged_by_combine_images(drone, checkpoints, tmp_path):
    import combine_images
    import inference

    variants = {"id": ["flip=0"], "f3": ["flip=3"], "f2": ["flip=2"], "f23": ["flip=23"],
                "tr": ["flip=0", "transpose=True"]}
    for name, keys in variants.items():
        inference.run(infer_cfg(drone, checkpoints["b0"], tmp_path / "runs" / name, *keys), models=[PositionalModel()])
    taken = {json.loads((tmp_path / "runs" / n / "run.json").read_text())["tta"][0] for n in variants}
    assert taken == {"none", "hflip", "vflip", "hvflip", "transpose"}
    maps = np.stack([read(tmp_path / "runs" / n / "probabilities" / "drone.tif")[0] for n in variants])
    assert np.abs(maps[0].astype(int) - maps[1]).max() > 20  # the transforms really differ
    out = combine_images.run(compose_config("combine_images", [f"base_dir={tmp_path / 'runs'}", "progress=false",
                                                               "cog=false", "threshold=0.5"]))
    assert len(out["combined_from"]) == 5
    ens, profile = read(tmp_path / "runs" / "ensemble" / "probabilities" / "drone.tif")
    mean = maps.astype(np.float32).sum(0) / np.float32(255 * 5)
    assert np.abs(ens.astype(float) - mean * 255).max() <= 0.5 + 1e-4
    with rasterio.open(drone) as src:
        assert (profile["crs"], profile["transform"], profile["width"]) == (src.crs, src.transform, src.width)
    mask = read(tmp_path / "runs" / "ensemble" / "masks" / "drone.tif")[0]
    assert np.array_equal(mask == 255, mean >= np.float32(0.5)) and 0.05 < (mask == 255).mean() < 0.95
    # one run with the whole TTA ensemble gives the same average (up to 8-bit rounding of each run)
    inference.run(infer_cfg(drone, checkpoints["b0"], tmp_path / "one", "tta=[none,hflip,vflip,hvflip,transpose]"),
                  models=[PositionalModel()])
    one = read(tmp_path / "one" / "probabilities" / "drone.tif")[0]
    assert np.abs(one.astype(float) - mean * 255).max() <= 1.0


@pytest.mark.slow
def test_combine_reports_mismatched_and_missing_maps(drone, checkpoints, tmp_path):
    import combine_images
    import inference

    inference.run(infer_cfg(drone, checkpoints["empty"], tmp_path / "a"))
    inference.run(infer_cfg(drone, checkpoints["empty"], tmp_path / "b", "tile_size=128"))
    other = tmp_path / "b" / "probabilities" / "drone.tif"
    arr, profile = read(other)
    with rasterio.open(other, "w", **dict(profile, width=100)) as ds:
        ds.write(arr[:, :100], 1)
    cfg = compose_config("combine_images", [f"base_dir={tmp_path}", "progress=false"])
    with pytest.raises(UserError, match="size 100x923 differs"):
        combine_images.run(cfg)
    other.rename(tmp_path / "b" / "probabilities" / "moved.tif")
    with pytest.raises(UserError, match="missing"):
        combine_images.run(cfg)


def test_soft_labels_are_written_beside_image_copies(drone, checkpoints, tmp_path):
    import cv2

    import combine_images
    import inference

    for name in ("empty", "full"):
        inference.run(infer_cfg(drone, checkpoints[name], tmp_path / "runs" / name))
    soft = tmp_path / "soft"
    runs = f"[{tmp_path / 'runs' / 'empty'},{tmp_path / 'runs' / 'full' / 'probabilities'}]"  # run or maps folder
    combine_images.run(compose_config("combine_images", [f"inputs={runs}", "add_mask_suffix=true",
                                                         f"out_dir={soft}", "progress=false"]))
    assert sorted(p.name for p in soft.iterdir()) == ["drone.tif", "drone_mask.png"]
    assert (soft / "drone.tif").read_bytes() == drone.read_bytes()
    label = cv2.imread(str(soft / "drone_mask.png"), cv2.IMREAD_UNCHANGED)
    assert label.dtype == np.uint8 and label.shape == (923, 576)
    assert np.all(np.abs(label.astype(int) - 128) <= 1)  # mean of 0 and 255: a soft 0.5

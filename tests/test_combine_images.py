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
    # 923 x 576 px, within the default soft_chip_size (1024): kept whole, as the seed kept its test tiles
    assert sorted(p.name for p in soft.iterdir()) == ["drone.tif", "drone_mask.png", "soft_labels.json"]
    assert (soft / "drone.tif").read_bytes() == drone.read_bytes()
    label = cv2.imread(str(soft / "drone_mask.png"), cv2.IMREAD_UNCHANGED)
    assert label.dtype == np.uint8 and label.shape == (923, 576)
    assert np.all(np.abs(label.astype(int) - 128) <= 1)  # mean of 0 and 255: a soft 0.5
    assert json.loads((soft / "soft_labels.json").read_text())["images"]["drone"]["chips"] == ["drone"]


def test_soft_labels_of_a_big_scene_are_cut_into_georeferenced_chips(drone, checkpoints, tmp_path):
    import cv2

    import combine_images
    import dataset
    import inference

    for name in ("empty", "full"):
        inference.run(infer_cfg(drone, checkpoints[name], tmp_path / "runs" / name))
    soft = tmp_path / "soft"
    args = [f"base_dir={tmp_path / 'runs'}", "add_mask_suffix=true", f"out_dir={soft}", "progress=false",
            "soft_chip_size=256"]
    out = combine_images.run(compose_config("combine_images", args))
    # 923 rows -> chips at 0, 256, 512 and 667 (the last one flush with the edge); 576 columns -> 0, 256, 320
    expected = [f"drone_{r}_{c}" for r in (0, 256, 512, 667) for c in (0, 256, 320)]
    assert out["images"]["drone"]["chips"] == expected
    with rasterio.open(drone) as src:
        for name in expected:
            row, col = map(int, name.split("_")[1:])
            with rasterio.open(soft / f"{name}.tif") as chip:
                assert (chip.width, chip.height, chip.crs) == (256, 256, src.crs)
                assert chip.transform == src.window_transform(rasterio.windows.Window(col, row, 256, 256))
                assert np.array_equal(chip.read(), src.read(window=rasterio.windows.Window(col, row, 256, 256)))
            label = cv2.imread(str(soft / f"{name}_mask.png"), cv2.IMREAD_UNCHANGED)
            assert label.shape == (256, 256) and np.all(np.abs(label.astype(int) - 128) <= 1)
    chips = [c for c in dataset.list_chips(soft) if c.mask is not None]
    assert len(chips) == 12 and all(c.image.suffix == ".tif" for c in chips)  # what train.py soft_labels_dir= reads
    stamp = (soft / "drone_667_320.tif").stat().st_mtime_ns
    combine_images.run(compose_config("combine_images", args))  # a rerun keeps finished images
    assert (soft / "drone_667_320.tif").stat().st_mtime_ns == stamp
    with pytest.raises(UserError, match="soft_chip_size=256, not 512"):
        combine_images.run(compose_config("combine_images", [*args[:-1], "soft_chip_size=512"]))


def test_soft_chips_without_imagery_are_left_out_and_nodata_is_ignored(tmp_path):
    import cv2

    import combine_images
    from lib.geo_io import write_raster

    image = tmp_path / "scene.tif"
    rgba = np.full((4, 300, 300), 120, np.uint8)
    rgba[3, :, 150:] = 0  # no imagery right of column 150
    write_raster(image, rgba, {"driver": "GTiff", "crs": "EPSG:32636", "photometric": "RGB", "alpha": "YES",
                               "transform": rasterio.transform.from_origin(0, 300, 0.1, 0.1)})
    label = np.full((300, 300), 200, np.uint8)
    assert combine_images.chip_offsets(300, 100) == [0, 100, 200]
    assert combine_images.chip_offsets(250, 100) == [0, 100, 150] and combine_images.chip_offsets(80, 100) == [0]
    written = []
    with rasterio.open(image) as src:
        for row in (0, 100, 200):
            for col in (0, 100, 200):
                if combine_images._write_chip(src, rasterio.windows.Window(col, row, 100, 100), label,
                                              tmp_path / f"c_{row}_{col}"):
                    written.append((row, col))
    assert written == [(r, c) for r in (0, 100, 200) for c in (0, 100)]  # column 200 on holds no imagery
    assert not (tmp_path / "c_0_0_ignore.png").exists()
    ignore = cv2.imread(str(tmp_path / "c_0_100_ignore.png"), cv2.IMREAD_UNCHANGED)
    mask = cv2.imread(str(tmp_path / "c_0_100_mask.png"), cv2.IMREAD_UNCHANGED)
    assert (ignore[:, :50] == 0).all() and (ignore[:, 50:] == 255).all()
    assert (mask[:, :50] == 200).all() and (mask[:, 50:] == 0).all()  # nodata is never a building


def test_ensemble_keeps_the_nodata_mask_of_its_input_maps(tmp_path):
    import combine_images

    transform = rasterio.transform.from_origin(500000, 100, 0.5, 0.5)
    valid = np.ones((64, 80), bool)
    valid[:, :20] = False  # no imagery in the first 20 columns of both runs
    for name, value in (("a", 100), ("b", 200)):
        path = tmp_path / name / "probabilities" / "scene.tif"
        path.parent.mkdir(parents=True)
        with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(
                path, "w", driver="GTiff", width=80, height=64, count=1, dtype="uint8", crs="EPSG:32636",
                transform=transform) as ds:
            ds.write(np.where(valid, value, 0).astype(np.uint8), 1)
            ds.write_mask(valid.astype(np.uint8) * 255)
    out = tmp_path / "ens"
    combine_images.run(compose_config("combine_images", [f"inputs=[{tmp_path / 'a'},{tmp_path / 'b'}]",
                                                         f"out_dir={out}", "threshold=0.5", "progress=false"]))
    for folder in ("probabilities", "masks"):
        with rasterio.open(out / folder / "scene.tif") as ds:
            assert ds.crs.to_epsg() == 32636 and ds.transform == transform
            assert ((ds.dataset_mask() > 0) == valid).all()
    with rasterio.open(out / "probabilities" / "scene.tif") as ds:
        assert (ds.read(1)[valid] == 150).all()


def _run_with_maps(folder, prob, border=None):
    """A run folder holding `scene`'s probability map and, with `border`, its instance maps (no contact)."""
    transform = rasterio.transform.from_origin(500000, 100, 0.5, 0.5)
    layers = {"probabilities": [prob]} if border is None else {"probabilities": [prob],
                                                               "instances": [border, np.zeros_like(border)]}
    for kind, bands in layers.items():
        path = folder / kind / "scene.tif"
        path.parent.mkdir(parents=True)
        with rasterio.open(path, "w", driver="GTiff", width=prob.shape[1], height=prob.shape[0], count=len(bands),
                           dtype="uint8", crs="EPSG:32636", transform=transform) as ds:
            ds.write(np.stack(bands))
    return folder, transform


def test_instance_maps_are_averaged_and_split_touching_roofs_unless_a_run_lacks_them(tmp_path, capsys):
    import geopandas as gpd

    import combine_images

    prob = np.zeros((64, 96), np.uint8)
    prob[16:48, 16:80] = 230  # two 32 x 32 px roofs sharing the wall at column 48
    border = np.zeros_like(prob)
    border[16:48, 46:50] = 255
    a, transform = _run_with_maps(tmp_path / "a", prob, border)
    b, _ = _run_with_maps(tmp_path / "b", prob, border // 255 * 155)
    c, _ = _run_with_maps(tmp_path / "c", prob)
    out = combine_images.run(compose_config("combine_images", [f"inputs=[{a},{b}]", f"out_dir={tmp_path / 'ab'}",
                                                               "progress=false", "vector_format=geojson", "cog=false"]))
    assert out["instances"] == "on" and out["threshold"] == 0.5 and out["postprocess_source"]["threshold"] == "default"
    with rasterio.open(tmp_path / "ab" / "instances" / "scene.tif") as ds:
        assert (ds.count, ds.crs.to_epsg(), ds.transform) == (2, 32636, transform)
        assert ds.read(1)[30, 47] == 205 and ds.read(1)[30, 30] == 0 and ds.read(2).max() == 0
    assert len(gpd.read_file(tmp_path / "ab" / "footprints" / "scene.geojson")) == 2
    capsys.readouterr()
    out = combine_images.run(compose_config("combine_images", [f"inputs=[{a},{c}]", f"out_dir={tmp_path / 'ac'}",
                                                               "progress=false", "vector_format=geojson", "cog=false"]))
    assert f"no instance maps (instances/) in {c}" in capsys.readouterr().out
    assert out["instances"] == "off" and not (tmp_path / "ac" / "instances").exists()
    assert len(gpd.read_file(tmp_path / "ac" / "footprints" / "scene.geojson")) == 1

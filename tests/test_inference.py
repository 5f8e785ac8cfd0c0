"""Inference engine, inference.py and combine_images.py: tiling, TTA, blending, outputs, resume, mining."""

import itertools
import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import from_origin

import engine
from lib.cli import compose_config
from lib.errors import UserError

torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------------
# Stand-in models: behaviour that does not depend on learned weights
# ----------------------------------------------------------------------------------------------

class ConstantModel(torch.nn.Module):
    """Building probability `p` everywhere (2-class logits at stride 4), image-level probability `p`."""

    def __init__(self, p=0.7):
        super().__init__()
        self.logit = float(np.log(p / (1 - p)))
        self.calls = []

    def forward(self, x):
        self.calls.append(tuple(x.shape))
        n, _, h, w = x.shape
        seg = torch.zeros(n, 2, h // 4, w // 4)
        seg[:, 1] = self.logit
        cls = torch.zeros(n, 2)
        cls[:, 1] = self.logit
        return {"seg": seg, "cls": cls}


class PooledBrightnessModel(torch.nn.Module):
    """Logits from the 4x4-pooled input: position-free, so every flip/transpose commutes with it.

    A TTA that is not undone exactly shows up as a mirrored/transposed map.
    """

    def forward(self, x):
        pooled = torch.nn.functional.avg_pool2d(x[:, :1] * 0.7 + x[:, 1:2] * 0.3, 4)
        return {"seg": torch.cat([torch.zeros_like(pooled), pooled], 1), "cls": pooled.mean((2, 3)).repeat(1, 2)}


class PositionalModel(PooledBrightnessModel):
    """Brightness plus a left-to-right ramp: not flip-invariant, so each TTA gives a different map."""

    def forward(self, x):
        out = super().forward(x)
        w = out["seg"].shape[-1]
        out["seg"][:, 1] += torch.linspace(-1.0, 1.0, w)
        return out


def gradient_image(h, w, seed=0):
    """An asymmetric image: ramps plus noise, so a wrong TTA inverse cannot go unnoticed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx * yy) % 256], -1)
    return np.clip(img + rng.integers(-20, 20, img.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """b0 checkpoints saved with save_checkpoint: random weights, an always-empty and an always-building one."""
    import model as M

    d = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    net = M.build_model("efficientnet-b0", pretrained=False)
    M.save_checkpoint(d / "b0.pth", net, meta={"ref_scale": 0.1})
    out = {"b0": d / "b0.pth"}
    for name, sign in (("empty", -1.0), ("full", 1.0)):
        with torch.no_grad():
            net.seg_head.weight.zero_()
            net.seg_head.bias.copy_(torch.tensor([-10.0 * sign, 10.0 * sign]))
            net.image_heads.cls.weight.zero_()
            net.image_heads.cls.bias.copy_(torch.tensor([-10.0 * sign, 10.0 * sign]))
        M.save_checkpoint(d / f"{name}.pth", net)
        out[name] = d / f"{name}.pth"
    return out


@pytest.fixture
def drone(shared):
    return shared / "data" / "drone" / "drone.tif"


def infer_cfg(data_dir, model, out, *extra):
    overrides = [f"data_dir={data_dir}", f"model={model}", f"output_dir={out}", "tile_size=256", "width=64",
                 "overlap=64", "progress=false", "num_threads=1", "cog=false", "backend=torch", *extra]
    return compose_config("inference", overrides)


def read(path):
    with rasterio.open(path) as ds:
        return ds.read(1), ds.profile


# ----------------------------------------------------------------------------------------------
# TTA
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", engine.TTA_NAMES)
def test_every_tta_transform_inverts_exactly(name):
    x = torch.arange(2 * 3 * 5 * 7, dtype=torch.float32).reshape(2, 3, 5, 7)  # non-square
    y = engine.tta_forward(x, name)
    assert torch.equal(engine.tta_inverse(y, name), x)
    assert (y.shape[-2:] == (7, 5)) == name.startswith("transpose")


def test_tta_transforms_are_the_eight_distinct_symmetries_of_a_tile():
    x = torch.arange(36, dtype=torch.float32).reshape(1, 1, 6, 6)
    outs = {tuple(engine.tta_forward(x, n).flatten().tolist()) for n in engine.TTA_NAMES}
    assert len(outs) == len(engine.TTA_NAMES) == 8


@pytest.mark.parametrize("name", engine.TTA_NAMES)
def test_engine_tta_prediction_equals_plain_prediction_for_equivariant_model(name):
    rgb = gradient_image(160, 224)
    common = {"widths": [128], "tile_size": 128, "overlap": 32, "batch_size": 4, "num_workers": 0}
    plain = engine.Engine([PooledBrightnessModel()], tta=["none"], **common).predict_array(rgb)
    tta = engine.Engine([PooledBrightnessModel()], tta=[name], **common).predict_array(rgb)
    assert np.abs(plain - tta).max() < 1e-6
    assert plain.std() > 0.01  # the map is not trivially constant


def test_seed_flip_and_transpose_keys_select_the_matching_transforms():
    assert engine.seed_tta_name(0, False) == "none"
    assert engine.seed_tta_name(3, False) == "hflip"  # dim 3 = width
    assert engine.seed_tta_name(2, False) == "vflip"
    assert engine.seed_tta_name(23, False) == "hvflip"
    assert engine.seed_tta_name(0, True) == "transpose"
    assert engine.seed_tta_name(3, True) == "transpose_hflip"
    x = torch.rand(1, 3, 8, 8)
    assert torch.equal(engine.tta_forward(x, "hflip"), x.flip(3))
    assert torch.equal(engine.tta_forward(x, "transpose_hflip"), x.transpose(2, 3).flip(3))
    with pytest.raises(UserError, match="flip=5"):
        engine.seed_tta_name(5)
    with pytest.raises(UserError, match="unknown transform"):
        engine.parse_tta(["rot45"])


def test_tta_and_widths_are_batched_in_one_call_per_shape():
    model = ConstantModel()
    eng = engine.Engine([model], widths=[64, 96], tta=["none", "hflip", "vflip", "hvflip", "transpose"],
                        tile_size=128, overlap=0, batch_size=5, num_workers=0)
    eng.predict_array(gradient_image(128, 128))
    assert sorted(model.calls) == [(5, 3, 64, 64), (5, 3, 96, 96)]


# ----------------------------------------------------------------------------------------------
# Tiling, blending, scale, nodata, memory
# ----------------------------------------------------------------------------------------------

def test_constant_model_gives_seamless_constant_map_across_window_seams():
    rgb = gradient_image(300, 517)
    eng = engine.Engine([ConstantModel(0.7)], widths=[96], tile_size=128, overlap=48, batch_size=3, num_workers=1)
    eng.out_cols = 200  # finished rows are also handed out in column blocks
    prob = eng.predict_array(rgb)
    assert prob.shape == (300, 517)
    assert np.abs(prob - 0.7).max() < 1e-5
    assert eng.stats.windows == len(engine.window_offsets(300, 128, 48)) * len(engine.window_offsets(517, 128, 48))


def test_footprints_from_blocks_equal_footprints_of_the_whole_mask():
    import cv2
    import shapely

    from lib import footprints

    rng = np.random.default_rng(3)
    mask = cv2.GaussianBlur(rng.random((300, 500)).astype(np.float32), (0, 0), 6) > 0.5
    mask[40:200, 90:110] = True  # a long building across many blocks
    mask[100:120, 20:480] = True
    prob = rng.integers(0, 256, mask.shape).astype(np.uint8)
    whole = footprints.polygonize(mask, prob)
    poly = footprints.Polygonizer(*mask.shape)
    for r in range(0, 300, 64):
        for c in range(0, 500, 100):
            poly.add(r, mask[r:r + 64, c:c + 100], prob[r:r + 64, c:c + 100], c)
    blocks = poly.finish()
    def key(p):
        return p.pixels, p.prob_sum

    assert sorted(map(key, blocks)) == sorted(map(key, whole)) and len(whole) > 5
    union_a = shapely.union_all([p.geom for p in whole])
    union_b = shapely.union_all([p.geom for p in blocks])
    assert union_a.symmetric_difference(union_b).area == 0 and union_a.area == mask.sum()


def test_windows_cover_the_scene_without_leaving_it():
    for length, extent, overlap in [(1000, 256, 64), (256, 256, 64), (100, 256, 64), (1025, 1024, 0)]:
        offs = engine.window_offsets(length, extent, overlap)
        assert offs[0] == 0 and offs[-1] == max(0, length - extent)
        assert all(b - a <= extent - overlap for a, b in itertools.pairwise(offs))


def test_model_size_is_a_multiple_of_32_and_keeps_the_scale():
    assert engine.model_size(1024, 672 / 1024) == (672, 1024)  # the original x0.656 scale TTA
    for extent, factor in [(439, 672 / 1024), (1024, 0.59), (50, 1.0), (1000, 2.0)]:
        m, padded = engine.model_size(extent, factor)
        assert m % 32 == 0 and padded >= extent
        assert abs(m / padded - factor) / factor < 1.5 / padded  # no stretching beyond a pixel


def test_scale_factor_and_match_gsd_change_the_model_size():
    model = ConstantModel()
    model.meta = {"ref_scale": 0.2}
    eng = engine.Engine([model], widths=[128], tile_size=128, overlap=0, scale_factor=0.5, match_gsd=True,
                        num_workers=0)
    eng.predict_array(gradient_image(128, 128), gsd=0.1)  # 0.1 m/px seen at 0.2 m/px: another x0.5
    assert model.calls == [(1, 3, 32, 32)]


def _write_rgba(path, rgb, alpha, crs="EPSG:32632"):
    h, w = alpha.shape
    profile = {"driver": "GTiff", "width": w, "height": h, "count": 4, "dtype": "uint8", "crs": crs,
                   "transform": from_origin(500000, 4000000, 0.1, 0.1), "photometric": "RGB", "alpha": "YES"}
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(np.moveaxis(rgb, -1, 0), [1, 2, 3])
        ds.write(alpha, 4)
    return path


def test_nodata_is_never_building_and_nodata_windows_are_skipped(tmp_path):
    rgb = gradient_image(256, 384)
    alpha = np.full((256, 384), 255, np.uint8)
    alpha[:, 256:] = 0  # the right third has no imagery: its windows are skipped
    alpha[40:60, 30:90] = 0  # a hole inside a predicted window
    src = engine.RasterSource(_write_rgba(tmp_path / "a.tif", rgb, alpha))
    eng = engine.Engine([ConstantModel(0.9)], widths=[64], tile_size=128, overlap=0, num_workers=0)
    prob, valid = np.full((256, 384), -1.0, np.float32), np.zeros((256, 384), bool)
    for s in eng.predict(src):
        h, w = s.prob.shape
        prob[s.row_off:s.row_off + h, s.col_off:s.col_off + w] = s.prob.numpy()
        valid[s.row_off:s.row_off + h, s.col_off:s.col_off + w] = s.valid
    assert np.array_equal(valid, alpha > 0)
    assert np.all(prob[alpha == 0] == 0) and np.allclose(prob[alpha > 0], 0.9, atol=1e-5)
    _, mask = engine.quantize(torch.from_numpy(prob), valid, threshold=0.0)  # even at threshold 0
    assert not mask[alpha == 0].any()
    assert eng.stats.skipped == 2 and eng.stats.windows == 4


def _stream_scene(path, eng, tmp_path):
    """Predict and write a scene as inference does; returns the engine's accumulator shape and traced peak."""
    from lib import footprints

    tracemalloc.start()
    with engine.gdal_env(), engine.RasterSource(path) as src:
        profile = engine.raster_profile(src.ds)
        poly = footprints.Polygonizer(src.height, src.width)
        with engine.SceneWriter(tmp_path / f"p_{src.height}.tif", tmp_path / f"m_{src.height}.tif", profile,
                                cog=False, polygonizer=poly) as w:
            for s in eng.predict(src):
                w.write(s.row_off, *engine.quantize(s.prob, s.valid, 0.5), s.col_off)
            w.commit()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return eng.stats.accumulator_shape, peak


def test_memory_does_not_grow_with_scene_height(tmp_path):
    """Serial reads give a deterministic peak: 4x the rows must not raise it; threaded read-ahead
    (whose peak depends on thread timing) must stay far below one uint8 copy of the scene."""
    shapes, peaks = [], []
    for h, workers in ((256, 0), (2048, 0), (8192, 0), (8192, 2)):  # the first scene only warms up
        eng = engine.Engine([ConstantModel(0.3)], widths=[64], tile_size=256, overlap=64, batch_size=8,
                            num_workers=workers)
        rgb = np.zeros((h, 1024, 3), np.uint8) + 90
        path = _write_rgba(tmp_path / f"s{h}.tif", rgb, np.full((h, 1024), 255, np.uint8))
        shape, peak = _stream_scene(path, eng, tmp_path)
        shapes.append(shape)
        peaks.append(peak)
        assert read(tmp_path / f"p_{h}.tif")[0].shape == (h, 1024)
    assert shapes[1] == shapes[2] == shapes[3] == (256, 1024)  # one window high, whatever the scene height
    assert peaks[2] < 1.3 * peaks[1], peaks
    assert peaks[3] < 8192 * 1024, peaks


def test_precision_auto_keeps_fp32_unless_bf16_is_native_and_bf16_masks_agree(checkpoints):
    import model as M

    net = M.load_model(checkpoints["b0"])
    rgb = gradient_image(128, 128)
    ref = engine.Engine([net], widths=[64], tile_size=128, precision="fp32", num_workers=0).predict_array(rgb)
    auto = engine.Engine([net], widths=[64], tile_size=128, precision="auto", num_workers=0)
    auto.predict_array(rgb)
    assert auto.precision_name in ("fp32", "bf16")
    if not engine._cpu_has_native_bf16():
        assert auto.precision_name == "fp32"
    bf16 = engine.Engine([net], widths=[64], tile_size=128, precision="bf16", num_workers=0).predict_array(rgb)
    assert np.mean((bf16 >= 0.5) == (ref >= 0.5)) >= engine.AGREEMENT_MIN
    assert np.abs(bf16 - ref).max() < 0.05


# ----------------------------------------------------------------------------------------------
# inference.py: inputs, outputs, georeferencing, resume, mining
# ----------------------------------------------------------------------------------------------

def test_outputs_keep_size_crs_transform_and_footprints_load_in_epsg4326(drone, checkpoints, tmp_path):
    import geopandas as gpd

    import inference

    cfg = infer_cfg(drone, checkpoints["full"], tmp_path, "threshold=0.5", "vector_format=gpkg")
    result = inference.run(cfg)
    with rasterio.open(drone) as src:
        for kind in ("probabilities", "masks"):
            with rasterio.open(tmp_path / kind / "drone.tif") as ds:
                assert (ds.width, ds.height, ds.crs, ds.transform) == (src.width, src.height, src.crs, src.transform)
                assert ds.dtypes == ("uint8",) and ds.profile["compress"] == "deflate"
                assert ds.tags()["BUILDINGS_TTA"] == "none"
                assert ds.read(1).min() == 255  # the always-building model
        bounds = src.bounds
    gj = gpd.read_file(tmp_path / "footprints" / "drone.geojson")
    assert gj.crs.to_epsg() == 4326 and len(gj) == 1
    back = gj.to_crs(src.crs).total_bounds
    assert np.allclose(back, [bounds.left, bounds.bottom, bounds.right, bounds.top], atol=1e-3)
    area = (bounds.right - bounds.left) * (bounds.top - bounds.bottom)
    assert gj["area_m2"].iloc[0] == pytest.approx(area, rel=1e-3)
    assert gj["mean_prob"].iloc[0] == pytest.approx(1.0)
    gp = gpd.read_file(tmp_path / "footprints" / "drone.gpkg")
    assert gp.crs.to_epsg() == 32632
    run_json = json.loads((tmp_path / "run.json").read_text())
    assert run_json["models"][0]["sha256"] == engine.file_sha256(checkpoints["full"])
    assert run_json["tile_size"] == 256 and run_json["tta"] == ["none"] and run_json["toolkit_version"]
    assert result["images"]["drone"]["path"] == str(drone.resolve())


def test_plain_png_gives_plain_tiff_and_pixel_footprints(checkpoints, tmp_path):
    import cv2
    import geopandas as gpd

    import inference

    cv2.imwrite(str(tmp_path / "plain.png"), gradient_image(100, 140))
    inference.run(infer_cfg(tmp_path / "plain.png", checkpoints["full"], tmp_path / "out"))
    with rasterio.open(tmp_path / "out" / "masks" / "plain.tif") as ds:
        assert ds.crs is None and ds.transform.is_identity and (ds.height, ds.width) == (100, 140)
    gj = gpd.read_file(tmp_path / "out" / "footprints" / "plain.geojson")
    assert tuple(gj.total_bounds) == (0, 0, 140, 100)  # pixel (column, row) coordinates


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


def test_rerun_skips_finished_outputs_unless_overwrite(drone, checkpoints, tmp_path):
    import inference

    first = inference.run(infer_cfg(drone, checkpoints["empty"], tmp_path))
    assert first["summary"]["predicted"] == 1
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file() and p.name != "run.json")
    stamps = [p.stat().st_mtime_ns for p in files]
    again = inference.run(infer_cfg(drone, checkpoints["empty"], tmp_path))
    assert again["summary"] == {"predicted": 0, "skipped": 1, "empty": []}
    assert [p.stat().st_mtime_ns for p in files] == stamps
    assert "drone" in again["images"]  # the earlier record is kept in run.json
    (tmp_path / "masks" / "drone.tif").unlink()  # an unfinished image is predicted again
    assert inference.run(infer_cfg(drone, checkpoints["empty"], tmp_path))["summary"]["predicted"] == 1
    redo = inference.run(infer_cfg(drone, checkpoints["empty"], tmp_path, "overwrite=true"))
    assert redo["summary"]["predicted"] == 1
    assert not list(tmp_path.rglob(".*.tif"))  # no temporary files left behind


def test_negative_mining_copies_only_confidently_empty_images(drone, checkpoints, tmp_path):
    import inference

    empty_dir = tmp_path / "negatives"
    r = inference.run(infer_cfg(drone, checkpoints["empty"], tmp_path / "e", "mine_empty=true",
                                f"output_dir_empty={empty_dir}", "empty_threshold=0.1"))
    assert r["summary"]["empty"] == ["drone"] and r["images"]["drone"]["cls_prob"] < 0.1
    assert (empty_dir / "drone.tif").read_bytes() == drone.read_bytes()
    full_dir = tmp_path / "none"
    r = inference.run(infer_cfg(drone, checkpoints["full"], tmp_path / "f", "mine_empty=true",
                                f"output_dir_empty={full_dir}"))
    assert r["summary"]["empty"] == [] and not full_dir.exists()
    with pytest.raises(UserError, match="output_dir_empty"):
        inference.run(infer_cfg(drone, checkpoints["full"], tmp_path / "g", "mine_empty=true"))


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


def test_stac_catalog_input_lists_image_items_only(shared):
    import inference

    images = inference.list_images(shared / "data" / "kampala")
    assert [(im.stem, im.path.name) for im in images] == [("81046528", "81046528.tif")]


def test_unreadable_image_and_mismatched_checkpoint_fail_with_one_line(checkpoints, tmp_path):
    import inference

    bad = tmp_path / "broken.tif"
    bad.write_bytes(b"II*\x00 not really a tiff")
    with pytest.raises(UserError) as err:
        inference.run(infer_cfg(bad, checkpoints["b0"], tmp_path / "o"))
    assert "broken.tif" in str(err.value) and "\n" not in str(err.value)

    good = tmp_path / "img.png"
    import cv2

    cv2.imwrite(str(good), gradient_image(64, 64))
    with pytest.raises(UserError) as err:
        inference.run(infer_cfg(good, checkpoints["b0"], tmp_path / "o", "model_name=efficientnet-b1"))
    assert "b0.pth" in str(err.value) and "\n" not in str(err.value)
    torch.save({"state_dict": {"encoder.bogus": torch.zeros(3)}}, tmp_path / "alien.pth")
    with pytest.raises(UserError) as err:
        inference.run(infer_cfg(good, tmp_path / "alien.pth", tmp_path / "o"))
    assert "alien.pth" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserError, match="multiple of 32"):
        inference.run(infer_cfg(good, checkpoints["b0"], tmp_path / "o", "width=100"))


def test_per_model_widths_and_tta_lists(checkpoints, tmp_path):
    import inference

    cfg = infer_cfg(tmp_path, f"[{checkpoints['b0']},{checkpoints['empty']}]", tmp_path / "o",
                    "widths=[[64],[96]]", "tta=[[none,hflip],[transpose]]")
    eng, records = inference.build_engine(cfg)
    assert [(p.model, p.width, p.tta) for p in eng.passes] == [(0, 64, ("none", "hflip")), (1, 96, ("transpose",))]
    assert len(records) == 2 and records[1]["path"].endswith("empty.pth")


def test_default_data_dir_is_the_demo_test_images():
    import inference

    path = inference.default_data_dir()
    assert path.name == "images" and path.parent.name == "test" and list(Path(path).glob("*.tif"))


def test_outputs_written_inside_data_dir_are_not_taken_as_inputs(checkpoints, tmp_path):
    import cv2

    import inference

    cv2.imwrite(str(tmp_path / "scene.png"), gradient_image(64, 64))
    cfg = infer_cfg(tmp_path, checkpoints["empty"], tmp_path / "out")
    assert inference.run(cfg)["summary"]["predicted"] == 1
    again = inference.run(cfg)
    assert again["summary"] == {"predicted": 0, "skipped": 1, "empty": []} and list(again["images"]) == ["scene"]


def test_a_failure_mid_scene_leaves_no_outputs_behind(drone, checkpoints, tmp_path):
    import inference

    class FailsOnThirdCall(ConstantModel):
        def forward(self, x):
            if len(self.calls) == 2:
                raise RuntimeError("out of memory")
            return super().forward(x)

    with pytest.raises(RuntimeError, match="out of memory"):
        inference.run(infer_cfg(drone, checkpoints["b0"], tmp_path, "batch_size=1"), models=[FailsOnThirdCall()])
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "run.json"]


def test_onnxruntime_backend_matches_torch_and_is_cached(drone, checkpoints, tmp_path):
    import inference

    cache = tmp_path / "cache"
    for out, backend in (("o1", "onnxruntime"), ("o2", "auto")):  # auto: ONNX Runtime for fp32 on this CPU
        run = inference.run(infer_cfg(drone, checkpoints["b0"], tmp_path / out, "tta=[none,transpose]",
                                      f"backend={backend}", f"onnx_cache={cache}", "precision=fp32"))
        assert run["models"][0]["sha256"] == engine.file_sha256(checkpoints["b0"])
    assert len(list(cache.glob("*.onnx"))) == 1  # exported once, reused by the second run
    ref = inference.run(infer_cfg(drone, checkpoints["b0"], tmp_path / "t2", "tta=[none,transpose]"))
    assert ref["summary"]["predicted"] == 1
    a = read(tmp_path / "t2" / "probabilities" / "drone.tif")[0].astype(int)
    b = read(tmp_path / "o2" / "probabilities" / "drone.tif")[0].astype(int)
    assert np.abs(a - b).max() <= 1


def test_images_are_shared_largest_first_among_ranks():
    import inference

    images = [inference.ImageInput(s, Path(f"{s}.tif")) for s in "abcde"]
    pixels = [100, 900, 400, 400, 50]
    shares = [inference.shard_images(images, pixels, r, 2) for r in (0, 1)]
    assert [[im.stem for im in s] for s in shares] == [["b", "e"], ["a", "c", "d"]]  # loads 950 / 900
    assert inference.shard_images(images, pixels, 0, 1) == images


def test_torchrun_inference_shares_images_and_matches_one_process(checkpoints, tmp_path):
    import os
    import subprocess
    import sys

    from lib.cli import REPO_DIR

    data = tmp_path / "images"
    data.mkdir()
    for k, (h, w) in enumerate(((256, 384), (200, 300), (320, 256))):
        _write_rgba(data / f"img{k}.tif", gradient_image(h, w, seed=k), np.full((h, w), 255, np.uint8))
    import inference

    args = [f"data_dir={data}", f"model={checkpoints['b0']}", "tile_size=256", "width=64", "overlap=64",
            "progress=false", "cog=false", "backend=torch", "threshold=0.5", "tta=[none,hflip]"]
    inference.run(compose_config("inference", [*args, f"output_dir={tmp_path / 'one'}", "num_threads=1"]))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "inference.py", *args, f"output_dir={tmp_path / 'two'}"],
                          cwd=REPO_DIR, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "3 predicted, 0 already done" in proc.stdout and "(2 processes)" in proc.stdout
    for k in range(3):
        for kind in ("probabilities", "masks"):
            a, pa = read(tmp_path / "one" / kind / f"img{k}.tif")
            b, pb = read(tmp_path / "two" / kind / f"img{k}.tif")
            assert np.array_equal(a, b) and pa["crs"] == pb["crs"] and pa["transform"] == pb["transform"]
        one = json.loads((tmp_path / "one" / "footprints" / f"img{k}.geojson").read_text())["features"]
        two = json.loads((tmp_path / "two" / "footprints" / f"img{k}.geojson").read_text())["features"]
        assert [f["geometry"] for f in one] == [f["geometry"] for f in two]
    run = json.loads((tmp_path / "two" / "run.json").read_text())
    assert sorted(run["images"]) == ["img0", "img1", "img2"]
    assert not list((tmp_path / "two").glob(".run.rank*.json"))  # merged by rank 0, then removed

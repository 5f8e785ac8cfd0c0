"""lib/tiling.py: tiling, TTA batching, blending, scale, nodata, memory, precision and the decoder seam."""

import tracemalloc

import numpy as np
import pytest
import torch
from standins import ConstantModel, PooledBrightnessModel, gradient_image, read, write_rgba

from lib import footprints, geo_io
from lib.devices import cpu_has_native_bf16
from lib.errors import UserError
from lib.image_sources import ArraySource, RasterSource
from lib.raster_outputs import SceneWriter, raster_profile
from lib.segmentation import BUILDING, BUILDING_PRESENT
from lib.tiling import AGREEMENT_MIN, Engine, build_passes, model_gsd
from lib.tta import TTA_NAMES
from lib.windows import window_offsets

torch.set_num_threads(1)


@pytest.mark.parametrize("name", TTA_NAMES)
def test_engine_tta_prediction_equals_plain_prediction_for_equivariant_model(name):
    rgb = gradient_image(160, 224)
    common = {"widths": [128], "tile_size": 128, "overlap": 32, "batch_size": 4, "num_workers": 0}
    plain = Engine([PooledBrightnessModel()], tta=["none"], **common).predict_array(rgb)
    tta = Engine([PooledBrightnessModel()], tta=[name], **common).predict_array(rgb)
    assert np.abs(plain - tta).max() < 1e-6
    assert plain.std() > 0.01  # the map is not trivially constant


def test_tta_and_widths_are_batched_in_one_call_per_shape():
    model = ConstantModel()
    eng = Engine([model], widths=[64, 96], tta=["none", "hflip", "vflip", "hvflip", "transpose"],
                 tile_size=128, overlap=0, batch_size=5, num_workers=0)
    eng.predict_array(gradient_image(128, 128))
    assert sorted(model.calls) == [(5, 3, 64, 64), (5, 3, 96, 96)]


def test_passes_take_per_model_lists_and_refuse_widths_off_the_stride():
    passes = build_passes(2, [[64], [96, 128]], [["none", "hflip"], ["transpose"]])
    assert [(p.model, p.width, p.tta) for p in passes] == [
        (0, 64, ("none", "hflip")), (1, 96, ("transpose",)), (1, 128, ("transpose",))]
    with pytest.raises(UserError, match="multiple of 32"):
        build_passes(1, [100], ["none"])
    with pytest.raises(UserError, match="2 lists given for 3 models"):
        build_passes(3, [[64], [96]], ["none"])


def test_constant_model_gives_seamless_constant_map_across_window_seams():
    rgb = gradient_image(300, 517)
    eng = Engine([ConstantModel(0.7)], widths=[96], tile_size=128, overlap=48, batch_size=3, num_workers=1)
    eng.out_cols = 200  # finished rows are also handed out in column blocks
    prob = eng.predict_array(rgb)
    assert prob.shape == (300, 517)
    assert np.abs(prob - 0.7).max() < 1e-5
    assert eng.stats.windows == len(window_offsets(300, 128, 48)) * len(window_offsets(517, 128, 48))
    assert eng.stats.scores[BUILDING_PRESENT] == pytest.approx(0.7, abs=1e-6)
    assert eng.stats.map_max[BUILDING] == pytest.approx(0.7, abs=1e-5)


def test_scale_factor_and_match_gsd_change_the_model_size():
    model = ConstantModel()
    model.meta = {"ref_scale": 0.2}
    eng = Engine([model], widths=[128], tile_size=128, overlap=0, scale_factor=0.5, match_gsd=True, num_workers=0)
    eng.predict_array(gradient_image(128, 128), gsd=0.1)  # 0.1 m/px seen at 0.2 m/px: another x0.5
    assert model.calls == [(1, 3, 32, 32)]


def test_nodata_is_never_building_and_nodata_windows_are_skipped(tmp_path):
    rgb = gradient_image(256, 384)
    alpha = np.full((256, 384), 255, np.uint8)
    alpha[:, 256:] = 0  # the right third has no imagery: its windows are skipped
    alpha[40:60, 30:90] = 0  # a hole inside a predicted window
    src = RasterSource(write_rgba(tmp_path / "a.tif", rgb, alpha))
    eng = Engine([ConstantModel(0.9)], widths=[64], tile_size=128, overlap=0, num_workers=0)
    prob, valid = np.full((256, 384), -1.0, np.float32), np.zeros((256, 384), bool)
    for b in eng.predict(src):
        h, w = b.valid.shape
        prob[b.row_off:b.row_off + h, b.col_off:b.col_off + w] = b.maps[BUILDING].numpy()
        valid[b.row_off:b.row_off + h, b.col_off:b.col_off + w] = b.valid
    assert np.array_equal(valid, alpha > 0)
    assert np.all(prob[alpha == 0] == 0) and np.allclose(prob[alpha > 0], 0.9, atol=1e-5)
    assert eng.stats.skipped == 2 and eng.stats.windows == 4


class TwoHeatmaps:
    """Another task's decoder: two per-pixel maps that sum to 1 and no per-window score."""

    maps = ("centre", "background")
    scores = ()

    def __call__(self, out, n, device):
        centre = torch.sigmoid(out["seg"][:, 1:2].float())
        return torch.cat([centre, 1 - centre], 1), torch.zeros((n, 0), device=device)

    def agreement(self, ref, low):
        return 1.0


class CollectingSink:
    def __init__(self):
        self.blocks = []

    def add(self, block):
        self.blocks.append(block)


def test_any_decoder_gets_its_named_maps_tiled_un_transformed_blended_and_handed_to_a_sink():
    rgb = gradient_image(200, 260)
    common = {"widths": [64], "tile_size": 96, "overlap": 32, "batch_size": 4, "num_workers": 0}
    eng = Engine([PooledBrightnessModel()], tta=list(TTA_NAMES), decoder=TwoHeatmaps(), **common)
    sink = CollectingSink()
    stats = eng.predict_into(ArraySource(rgb), sink)
    assert stats.scores == {} and set(stats.map_max) == {"centre", "background"}
    assert sum(b.valid.shape[0] for b in sink.blocks) == 200 and {tuple(b.maps) for b in sink.blocks} == {
        ("centre", "background")}
    centre = Engine([PooledBrightnessModel()], tta=["none"], decoder=TwoHeatmaps(), **common)
    plain = centre.predict_array(rgb, name="centre")
    tta_centre = eng.predict_array(rgb, name="centre")
    tta_background = eng.predict_array(rgb, name="background")
    assert np.abs(plain - tta_centre).max() < 1e-5 and plain.std() > 0.01
    assert np.abs(tta_centre + tta_background - 1).max() < 1e-5  # blending is linear and per map


def _stream_scene(path, eng, tmp_path):
    """Predict and write a scene as inference does; returns the engine's accumulator shape and traced peak."""
    tracemalloc.start()
    with geo_io.gdal_env(), RasterSource(path) as src:
        profile = raster_profile(src.ds)
        poly = footprints.Polygonizer(src.height, src.width)
        with SceneWriter(tmp_path / f"p_{src.height}.tif", tmp_path / f"m_{src.height}.tif", profile,
                         cog=False, polygonizer=poly, threshold=0.5) as w:
            eng.predict_into(src, w)
            w.commit()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return eng.stats.accumulator_shape, peak


def test_memory_does_not_grow_with_scene_height(tmp_path):
    """Serial reads give a deterministic peak: 4x the rows must not raise it; threaded read-ahead
    (whose peak depends on thread timing) must stay far below one uint8 copy of the scene."""
    shapes, peaks = [], []
    for h, workers in ((256, 0), (2048, 0), (8192, 0), (8192, 2)):  # the first scene only warms up
        eng = Engine([ConstantModel(0.3)], widths=[64], tile_size=256, overlap=64, batch_size=8,
                     num_workers=workers)
        rgb = np.zeros((h, 1024, 3), np.uint8) + 90
        path = write_rgba(tmp_path / f"s{h}.tif", rgb, np.full((h, 1024), 255, np.uint8))
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
    ref = Engine([net], widths=[64], tile_size=128, precision="fp32", num_workers=0).predict_array(rgb)
    auto = Engine([net], widths=[64], tile_size=128, precision="auto", num_workers=0)
    auto.predict_array(rgb)
    assert auto.precision_name in ("fp32", "bf16")
    if not cpu_has_native_bf16():
        assert auto.precision_name == "fp32"
    bf16 = Engine([net], widths=[64], tile_size=128, precision="bf16", num_workers=0).predict_array(rgb)
    assert np.mean((bf16 >= 0.5) == (ref >= 0.5)) >= AGREEMENT_MIN
    assert np.abs(bf16 - ref).max() < 0.05


def test_model_gsd_is_what_the_model_saw_and_old_checkpoints_stay_readable():
    assert model_gsd({"model_gsd": 0.3, "model_gsd_source": "ref_scale", "train_gsd": 0.0746}) == (0.3, "ref_scale")
    assert model_gsd({"model_gsd": None, "ref_scale": None, "train_gsd": None}) == (None, None)
    assert model_gsd({"ref_scale": 0.3, "train_gsd": 0.793}) == (0.3, "ref_scale")  # chips were resized to it
    assert model_gsd({"ref_scale": 0.3, "train_gsd": None}) == (None, None)  # no chip had a GSD: none resized
    assert model_gsd({"ref_scale": None, "train_gsd": 0.0746}) == (0.0746, "train_gsd")
    assert model_gsd({"gsd": 0.05}) == (0.05, "gsd") and model_gsd(None) == (None, None)


def test_explicit_model_gsds_win_and_unknown_gsds_keep_width_over_tile():
    eng = Engine([ConstantModel(), ConstantModel()], widths=[64], tile_size=128, match_gsd=True, num_workers=0,
                 model_gsds=[0.2, None])
    assert [eng.factor(p, 0.1) for p in eng.passes] == [0.25, 0.5]
    assert [eng.factor(p, None) for p in eng.passes] == [0.5, 0.5]
    assert [eng.gsd_matched(p, 0.1) for p in eng.passes] == [True, False]


class ExportedStandIn(ConstantModel):
    """Answers like an exported graph (lib.exported): autocast cannot reach inside it."""

    format = "onnx"

    def forward(self, x):
        self.dtypes = getattr(self, "dtypes", []) + [torch.is_autocast_enabled("cpu")]
        return super().forward(x)


def test_exported_graphs_run_and_are_reported_in_fp32_whatever_the_precision_asked():
    exported = ExportedStandIn()
    eng = Engine([exported], widths=[64], tile_size=128, precision="bf16", num_workers=0, channels_last=False)
    assert eng.precision_used == "fp32"
    eng.predict_array(gradient_image(128, 128))
    assert eng.precision_used == "fp32" and exported.dtypes == [False]
    mixed = Engine([ConstantModel(), ExportedStandIn()], widths=[64], tile_size=128, precision="bf16",
                   num_workers=0, channels_last=False)
    mixed.predict_array(gradient_image(128, 128))
    assert mixed.precision_used == "bf16+fp32"

"""lib/tiling.py: tiling, TTA batching, blending, scale, nodata, memory, precision and the decoder seam."""

import itertools
import tracemalloc

import numpy as np
import pytest
import torch
from standins import ConstantModel, PooledBrightnessModel, PositionalModel, gradient_image, read, write_rgba

from lib import footprints, geo_io
from lib.devices import cpu_has_native_bf16
from lib.errors import UserError
from lib.image_sources import ArraySource, RasterSource
from lib.raster_outputs import SceneWriter, raster_profile
from lib.segmentation import BUILDING, BUILDING_PRESENT
from lib.tiling import AGREEMENT_MIN, WRITE_AHEAD, Engine, _ArrayCollector, build_passes, model_gsd
from lib.tta import TTA_NAMES
from lib.windows import OUT_COLS, blend_weights_1d, weight_sums, window_offsets, windows_touching

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


def whole_scene_reference(eng, src):
    """The sweep as it was before column blocks and bands: one whole-scene accumulator per map, windows
    added in row-major order, model calls per row of windows in groups of `per_step` (as the engine
    batches). The engine must equal it bit for bit (fp32, CPU)."""
    H, W = src.height, src.width
    eh, ew = min(eng.tile_size, H), min(eng.tile_size, W)
    rows, cols = window_offsets(H, eh, eng.overlap), window_offsets(W, ew, eng.overlap)
    sizes = [eng._sizes(p, src.gsd, eh, ew) for p in eng.passes]
    w2d = torch.from_numpy(blend_weights_1d(eh, eng.blend_floor))[:, None] * torch.from_numpy(
        blend_weights_1d(ew, eng.blend_floor))[None, :]
    acc, valid = torch.zeros((len(eng.decoder.maps), H, W)), np.zeros((H, W), bool)
    per_step = max(1, eng.batch_size // max(len(p.tta) for p in eng.passes))
    for k, r in enumerate(rows):
        items = [eng._prepare(src, k, j, r, c, eh, ew, sizes)[2] for j, c in enumerate(cols)]
        items = [it for it in items if it is not None]
        for start in range(0, len(items), per_step):
            batch = items[start:start + per_step]
            for it, pr in zip(batch, eng._predict_items(batch, sizes, eh, ew)[0]):
                c = cols[it.col_index]
                acc[:, r:r + eh, c:c + ew] += pr * w2d
                valid[r:r + eh, c:c + ew] |= it.valid
    out = acc / (torch.from_numpy(weight_sums(H, eh, rows, eng.blend_floor))[:, None]
                 * torch.from_numpy(weight_sums(W, ew, cols, eng.blend_floor))[None, :])
    return out.masked_fill_(~torch.from_numpy(valid), 0.0).numpy(), valid


def _paste(eng, src, rows=None):
    """Maps [n_maps, H, W] (NaN where no block came) and validity from predict, and the blocks' boxes."""
    out = np.full((len(eng.decoder.maps), src.height, src.width), np.nan, np.float32)
    valid, boxes = np.zeros((src.height, src.width), bool), []
    for b in eng.predict(src, rows):
        h, w = b.valid.shape
        assert np.all(np.isnan(out[:, b.row_off:b.row_off + h, b.col_off:b.col_off + w]))  # each pixel once
        out[:, b.row_off:b.row_off + h, b.col_off:b.col_off + w] = torch.stack(list(b.maps.values())).numpy()
        valid[b.row_off:b.row_off + h, b.col_off:b.col_off + w] = b.valid
        boxes.append((b.row_off, b.col_off, h, w))
    return out, valid, boxes


def _nodata_scene(h, w, seed=0):
    valid = np.ones((h, w), bool)
    valid[:, w * 2 // 3:] = False  # whole windows skipped
    valid[h // 3:h // 3 + 20, 30:90] = False  # a hole
    return ArraySource(gradient_image(h, w, seed), valid)


@pytest.mark.parametrize("carry_ram", [None, 0])  # carried strip on the device / in a temporary file
def test_sweep_equals_a_whole_scene_accumulator_bit_for_bit(carry_ram):
    src = _nodata_scene(330, 610)
    eng = Engine([PositionalModel()], widths=[64, 96], tta=["none", "hflip"], tile_size=128, overlap=40,
                 batch_size=5, num_workers=2, decoder=TwoHeatmaps())
    eng.out_cols = 150
    if carry_ram is not None:
        eng.carry_ram_bytes = carry_ram
    ref, ref_valid = whole_scene_reference(eng, src)
    out, valid, boxes = _paste(eng, src)
    assert np.array_equal(out, ref) and np.array_equal(valid, ref_valid) and ref.std() > 0.05
    assert eng.stats.carry_on_disk is (carry_ram == 0)
    assert {(r, c) for r, c, _, _ in boxes} == {(r, c) for r in [0, 88, 176, 202] for c in range(0, 610, 150)}


@pytest.mark.parametrize("tile_size, out_cols", [(128, 50), (700, 1000)])
def test_blocks_started_by_a_whole_window_equal_the_whole_scene_accumulator(tile_size, out_cols):
    """A block whose first window covers it whole starts from that window's weighted maps instead of
    zeros plus them: blocks narrower than the windows, and one window over the whole scene (a tile)."""
    src = _nodata_scene(330, 610)
    eng = Engine([PositionalModel()], widths=[64], tta=["none", "hflip"], tile_size=tile_size, overlap=40,
                 batch_size=4, num_workers=0, decoder=TwoHeatmaps())
    eng.out_cols = out_cols
    ref, ref_valid = whole_scene_reference(eng, src)
    out, valid, _ = _paste(eng, src)
    assert np.array_equal(out, ref) and np.array_equal(valid, ref_valid) and ref.std() > 0.05


def test_weight_grids_are_made_once_per_shape_and_the_cache_stays_small():
    from lib import windows

    a, b = windows.blend_weights_1d(96), windows.blend_weights_1d(64)
    grid = windows.outer(a, b, "cpu")
    assert torch.equal(grid, torch.from_numpy(a)[:, None] * torch.from_numpy(b)[None, :])
    assert windows.outer(a.copy(), b.copy(), "cpu") is grid  # same values, same grid
    for n in range(10, 10 + 2 * windows._OUTER_KEEP):
        windows.outer(windows.blend_weights_1d(n), b, "cpu")
    assert len(windows._OUTER) <= windows._OUTER_KEEP


def test_rows_equal_the_same_rows_of_a_whole_scene_run_and_compute_only_their_windows(checkpoints):
    import model as M

    src = _nodata_scene(300, 450, seed=6)
    eng = Engine([M.load_model(checkpoints["b0"])], widths=[64], tta=["none", "vflip"], tile_size=128,
                 overlap=32, batch_size=4, num_workers=0)
    whole, whole_valid, _ = _paste(eng, src)
    rows, cols = window_offsets(300, 128, 32), window_offsets(450, 128, 32)
    for r0, r1 in [*eng.band_rows(300, 3), (101, 108), (0, 1), (299, 300)]:
        out, valid, boxes = _paste(eng, src, (r0, r1))
        assert np.array_equal(out[:, r0:r1], whole[:, r0:r1]) and np.array_equal(valid, whole_valid & (
            np.arange(300)[:, None] >= r0) & (np.arange(300)[:, None] < r1))
        assert np.isnan(out[:, :r0]).all() and np.isnan(out[:, r1:]).all() and not np.isnan(out[:, r0:r1]).any()
        assert min(b[0] for b in boxes) == r0 and max(b[0] + b[2] for b in boxes) == r1
        computed = windows_touching(rows, 128, r0, r1)
        assert eng.stats.windows + eng.stats.skipped == len(computed) * len(cols)
        assert eng.stats.skipped == len(computed) * 1  # the right third (one window column) has no imagery
    assert list(eng.predict(src, (5, 5))) == [] and eng.stats.windows == 0
    with pytest.raises(UserError, match="rows=.*300 rows"):
        list(eng.predict(src, (200, 301)))


def test_band_rows_cover_every_row_once_cut_at_window_rows_and_balance_the_windows():
    eng = Engine([ConstantModel()], tile_size=1024, overlap=256)
    rows = window_offsets(10_000, 1024, 256)  # 13 rows of windows
    bands = eng.band_rows(10_000, 4)
    assert bands == [(0, 3072), (3072, 5376), (5376, 7680), (7680, 10_000)]
    assert [len(windows_touching(rows, 1024, *b)) for b in bands] == [4, 4, 4, 4]  # the 3 seams: 16 of 13
    for height, n in [(10_000, 1), (10_000, 5), (10_000, 40), (700, 3), (2048, 2), (5000, 7), (9000, 3)]:
        bands = eng.band_rows(height, n)
        offsets = window_offsets(height, min(1024, height), 256)
        assert len(bands) == min(n, len(offsets)) and bands[0][0] == 0 and bands[-1][1] == height
        assert all(a < b for a, b in bands) and all(p[1] == q[0] for p, q in itertools.pairwise(bands))
        assert {a for a, _ in bands} <= set(offsets)
        extent = min(1024, height)
        best = min(_largest_band(offsets, extent, height, [offsets[c] for c in cuts])  # any choice of cuts
                   for cuts in itertools.combinations(range(1, len(offsets)), len(bands) - 1))
        assert _largest_band(offsets, extent, height, [a for a, _ in bands[1:]]) == best, (height, n, bands)


def _largest_band(offsets, extent, height, cuts):
    """Window rows computed by the largest band when a scene is cut at `cuts`."""
    edges = [0, *cuts, height]
    return max(len(windows_touching(offsets, extent, a, b)) for a, b in itertools.pairwise(edges))


class DiscardingSink:
    """Checks that the blocks tile the scene with the constant map, keeping nothing."""

    def __init__(self):
        self.pixels = 0

    def add(self, block):
        assert torch.allclose(block.maps[BUILDING], torch.tensor(0.3), atol=1e-5)
        self.pixels += block.valid.size


@pytest.mark.parametrize("height", [256, 600])  # one row of windows; three, with the carried strip on disk
def test_memory_does_not_grow_with_scene_width(height):
    """The engine's blend buffers (and the Python-side allocations while predicting) for 8x the width:
    the same within a small margin (the buffers of the old sweep grew with the width)."""
    figures = []
    for width in (4096, 32768):
        src = ArraySource(np.full((height, width, 3), 90, np.uint8))
        eng = Engine([ConstantModel(0.3)], widths=[64], tile_size=256, overlap=64, batch_size=8, num_workers=0)
        eng.carry_ram_bytes = 2**20
        sink = DiscardingSink()
        tracemalloc.start()
        eng.predict_into(src, sink)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert sink.pixels == height * width and eng.stats.carry_on_disk is (height > 256)
        figures.append((eng.stats.accumulator_shape, eng.stats.accumulator_bytes, peak))
    (shape_a, bytes_a, peak_a), (shape_b, bytes_b, peak_b) = figures
    assert shape_a == shape_b and shape_a[0] == 256 and shape_a[1] <= 3 * 2048, figures
    # the sink's thread may hold WRITE_AHEAD more blocks (their valid masks: one byte a pixel) in a long scene
    in_flight = WRITE_AHEAD * shape_a[0] * OUT_COLS
    assert bytes_b <= 1.05 * bytes_a and peak_b <= 1.15 * peak_a + in_flight, figures
    assert bytes_b < 256 * 32768 * 4 / 2, figures  # far below one window-high strip of the scene


@pytest.mark.parametrize("workers", [0, 2])
def test_a_first_window_read_ahead_gives_the_same_maps_and_is_used_only_for_its_own_sweep(workers):
    """inference reads the next scene's first window while the model runs on the previous one."""
    rgb = gradient_image(200, 260)
    common = {"widths": [64], "tile_size": 96, "overlap": 32, "batch_size": 4, "num_workers": workers}
    eng = Engine([PooledBrightnessModel()], tta=list(TTA_NAMES), decoder=TwoHeatmaps(), **common)
    plain = eng.predict_array(rgb, name="centre")
    src = ArraySource(rgb)
    first = eng.read_ahead(src)
    assert first[1][:2] == (0, 0) and first[1][2] is not None
    sink = _ArrayCollector(200, 260, "centre")
    stats, wait = eng.start_into(src, sink, first=first)
    wait()
    assert np.array_equal(sink.out, plain) and stats.windows == eng.stats.windows
    other = ArraySource(gradient_image(150, 100))  # another scene's read-ahead is not taken for this one
    sink = _ArrayCollector(200, 260, "centre")
    eng.start_into(src, sink, first=eng.read_ahead(other))[1]()
    assert np.array_equal(sink.out, plain)

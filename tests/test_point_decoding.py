"""lib.point_decoding: NMS, exact streaming peaks across blocks, the decoder's units, the stride table."""

import itertools

import numpy as np
import pandas as pd
import pytest
import torch

from lib import point_contract as pc
from lib.image_sources import ArraySource
from lib.point_decoding import PeakSink, PointDecoder, detect, find_peaks, round_trip
from lib.point_targets import encode_targets
from lib.tiling import Block, Engine


def brute_force_peaks(x: np.ndarray, threshold: float, kernel: int) -> set:
    """The NMS rule written out pixel by pixel: above threshold, no larger neighbour, no equal earlier one."""
    r = kernel // 2
    out = set()
    for i, j in zip(*np.nonzero(x >= threshold)):
        win = [(a, b) for a in range(max(0, i - r), min(x.shape[0], i + r + 1))
               for b in range(max(0, j - r), min(x.shape[1], j + r + 1)) if (a, b) != (i, j)]
        if all(x[a, b] < x[i, j] or (x[a, b] == x[i, j] and (a, b) > (i, j)) for a, b in win):
            out.add((int(i), int(j)))
    return out


def random_maps(rng, h: int, w: int, levels: int = 6) -> dict:
    """Every map name; objectness quantised to a few levels so that ties (plateaus) are common."""
    maps = {name: torch.from_numpy(rng.normal(size=(h, w)).astype(np.float32)) for name in pc.MAPS}
    maps[pc.M_OBJECTNESS] = torch.from_numpy((rng.integers(0, levels, (h, w)) / (levels - 1)).astype(np.float32))
    return maps


def irregular_blocks(rng, h: int, w: int, maps: dict) -> list:
    """Row bands of random heights, each cut into random column widths (1 px blocks included), shuffled."""
    row_cuts = np.unique(np.r_[0, rng.choice(np.arange(1, h), size=rng.integers(1, 8), replace=False), h])
    blocks = []
    for r0, r1 in itertools.pairwise(row_cuts):
        col_cuts = np.unique(np.r_[0, rng.choice(np.arange(1, w), size=rng.integers(0, 8), replace=False), w])
        for c0, c1 in itertools.pairwise(col_cuts):
            part = {k: v[r0:r1, c0:c1] for k, v in maps.items()}
            blocks.append(Block(int(r0), part, np.ones((r1 - r0, c1 - c0), bool), int(c0)))
    return [blocks[k] for k in rng.permutation(len(blocks))]


def test_find_peaks_keeps_local_maxima_above_the_threshold():
    x = np.zeros((9, 9), np.float32)
    x[2, 2], x[2, 3], x[6, 6], x[7, 7] = 0.9, 0.8, 0.6, 0.7
    rows, cols = find_peaks(x, 0.5)
    assert list(zip(rows.tolist(), cols.tolist())) == [(2, 2), (7, 7)]
    rows, _ = find_peaks(x, 0.75)
    assert rows.tolist() == [2]
    assert len(find_peaks(x, 0.5, kernel=1)[0]) == 4  # every pixel above the threshold
    with pytest.raises(ValueError, match="odd"):
        find_peaks(x, 0.5, kernel=4)


def test_a_flat_top_keeps_only_its_first_pixel():
    x = np.zeros((8, 8), np.float32)
    x[3:5, 3:5] = 1.0  # what bilinear upsampling makes of one peak cell
    x[1, 5:8] = 0.9  # a flat ridge
    rows, cols = find_peaks(x, 0.5)
    assert list(zip(rows.tolist(), cols.tolist())) == [(1, 5), (3, 3)]


@pytest.mark.parametrize("seed", range(4))
def test_find_peaks_matches_the_rule_written_out(seed):
    rng = np.random.default_rng(seed)
    x = (rng.integers(0, 5, (23, 31)) / 4).astype(np.float32)
    for kernel in (3, 5):
        rows, cols = find_peaks(x, 0.5, kernel)
        assert set(zip(rows.tolist(), cols.tolist())) == brute_force_peaks(x, 0.5, kernel)


@pytest.mark.parametrize("seed", range(6))
def test_peak_sink_over_irregular_blocks_equals_nms_on_the_whole_map(seed):
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(20, 70)), int(rng.integers(20, 70))
    maps = random_maps(rng, h, w)
    for kernel in (3, 5):
        whole = detect(maps, 0.4, kernel)
        sink = PeakSink(h, w, 0.4, kernel)
        blocks = irregular_blocks(rng, h, w, maps)
        for block in blocks:
            sink.add(block)
        streamed = sink.finish()
        assert len(blocks) > 1 and len(whole) > 10
        pd.testing.assert_frame_equal(streamed, whole)


def test_peak_sink_keeps_only_above_threshold_edge_pixels():
    maps = {name: torch.zeros((64, 64)) for name in pc.MAPS}
    maps[pc.M_OBJECTNESS][10, 31] = maps[pc.M_OBJECTNESS][10, 32] = 0.9  # a peak split by the block edge
    maps[pc.M_OBJECTNESS][40, 40] = 0.8
    sink = PeakSink(64, 64, threshold=0.5, nms_kernel=3)
    for c0 in (0, 32):
        sink.add(Block(0, {k: v[:, c0:c0 + 32] for k, v in maps.items()}, np.ones((64, 32), bool), c0))
    assert sum(len(s[0]) for s in sink._strips) == 2  # the two edge pixels, not the blocks' perimeters
    out = sink.finish()
    assert out[["row", "col"]].to_numpy().tolist() == [[10, 31], [40, 40]]


def test_empty_scene_gives_an_empty_table_with_the_detection_columns():
    sink = PeakSink(8, 8, 0.5)
    sink.add(Block(0, {n: torch.zeros((8, 8)) for n in pc.MAPS}, np.ones((8, 8), bool)))
    out = sink.finish()
    assert len(out) == 0 and list(out.columns) == ["row", "col", "objectness", "length_px", "vessel", "fishing"]
    assert len(PeakSink(8, 8, 0.5).finish()) == 0


def test_decoder_gives_probabilities_and_offsets_in_input_pixels():
    out = {pc.OBJECTNESS: torch.zeros((2, 1, 4, 4)), pc.LENGTH: torch.full((2, 1, 4, 4), 7.0),
           pc.OFFSET: torch.stack([torch.full((2, 4, 4), 0.25), torch.full((2, 4, 4), -0.5)], 1),
           pc.VESSEL: torch.full((2, 1, 4, 4), 100.0), pc.FISHING: torch.full((2, 1, 4, 4), -100.0)}
    dec = PointDecoder()
    maps, scores = dec(out, 2, "cpu")
    assert maps.shape == (2, len(pc.MAPS), 4, 4) and scores.shape == (2, 0)
    by_name = dict(zip(dec.maps, maps[0, :, 0, 0].tolist()))
    assert by_name == {pc.M_OBJECTNESS: 0.5, pc.M_LENGTH: 7.0, pc.M_OFFSET_Y: 0.5, pc.M_OFFSET_X: -1.0,
                       pc.M_VESSEL: 1.0, pc.M_FISHING: 0.0}
    assert dec.prepare_input(torch.tensor([0, 255], dtype=torch.uint8)).tolist() == [0.0, 1.0]
    low = maps.clone()
    low[0, 0, 0, :2] = 0.4  # two of 32 cells drop below 0.5
    assert dec.agreement(maps, low) == pytest.approx(30 / 32)


def test_stride_table_stride_two_resolves_a_dense_layout():
    """The seed's encode -> decode table: F1 falls as the stride grows; stride 2 keeps every object.

    1000 objects in 1024 x 1024 px, no two closer than 5 px (50 m at xView3's 10 m), i.e. about a
    thousand times xView3's densest scenes; matched within the xView3 200 m.
    """
    rng = np.random.default_rng(0)
    pts = np.zeros((0, 2))
    for p in rng.uniform(0, 1023, (4000, 2)):
        if len(pts) < 1000 and (len(pts) == 0 or np.hypot(*(pts - p).T).min() >= 5):
            pts = np.vstack([pts, p])
    f1 = {s: round_trip(pts[:, 0], pts[:, 1], (1024, 1024), s)["f1"] for s in (16, 8, 4, 2, 1)}
    assert f1[2] >= 0.999 and f1[1] >= f1[2]
    assert f1[16] <= f1[8] <= f1[4] <= f1[2]
    assert f1[16] < 0.9  # coarse maps merge neighbours: the table's point


def test_offsets_recover_sub_cell_positions_at_stride_two():
    rng = np.random.default_rng(1)
    grid = np.stack(np.meshgrid(np.arange(8, 250, 16), np.arange(8, 250, 16), indexing="ij"), -1).reshape(-1, 2)
    pts = grid + rng.uniform(-3, 3, grid.shape)  # fractional positions anywhere in their cells
    pts = np.vstack([pts, [[0.2, 100.3], [255.4, 7.7]]])  # and at the map's edges
    res = round_trip(pts[:, 0], pts[:, 1], (256, 256), 2)
    assert res["tp"] == len(pts) and res["fp"] == 0
    assert res["error_px"].max() <= 0.5 + 1e-5  # the edge rows: bilinear upsampling clamps there
    interior = np.isin(res["matched_truth"], np.arange(len(grid)))
    assert res["error_px"][interior].max() < 1e-4


class BrightSpotNet(torch.nn.Module):
    """A stand-in CircleNet that 'detects' pixels brighter than 0.9 in channel 0 and reads their length
    (channel 1 x 100 px) and vessel class (channel 1 > 0.5), giving perfect targets as its outputs."""

    def forward(self, x):
        n, _, h, w = x.shape
        outs = []
        for k in range(n):
            rows, cols = np.nonzero(x[k, 0].numpy() > 0.9)
            aux = x[k, 1].numpy()[rows, cols]
            t = encode_targets(rows, cols, (aux > 0.5).astype(float), np.zeros(len(rows)), aux * 100, (h, w))
            outs.append(t)
        stack = {name: torch.from_numpy(np.stack([t[name] for t in outs])) for name in pc.TARGETS}
        heat = stack[pc.T_HEATMAP].clamp(1e-4, 1 - 1e-4)
        return {pc.OBJECTNESS: torch.log(heat / (1 - heat)), pc.LENGTH: stack[pc.T_LENGTH],
                pc.OFFSET: stack[pc.T_OFFSET], pc.VESSEL: (stack[pc.T_VESSEL] * 2 - 1) * 8,
                pc.FISHING: torch.full_like(heat, -8.0)}


def test_engine_with_the_point_decoder_and_sink_finds_every_object():
    rng = np.random.default_rng(2)
    img = np.zeros((150, 200, 2), np.uint8)
    truth = [(r, c) for r in range(5, 150, 23) for c in range(3, 200, 29)]
    aux = rng.integers(20, 240, len(truth))
    for (r, c), a in zip(truth, aux):
        img[r, c] = (255, a)
    engine = Engine([BrightSpotNet()], widths=(64,), tta=("none", "hflip"), tile_size=64, overlap=16,
                    decoder=PointDecoder(), channels_last=False, num_workers=0)
    sink = PeakSink(150, 200, threshold=0.5)
    engine.predict_into(ArraySource(img, np.ones((150, 200), bool)), sink)
    dets = sink.finish()
    assert len(dets) == len(truth)
    dets = dets.iloc[np.lexsort((dets["col"].round(), dets["row"].round()))]  # truth's raster order
    np.testing.assert_allclose(dets[["row", "col"]].to_numpy(), np.array(truth, float), atol=0.05)
    np.testing.assert_allclose(dets["length_px"], aux / 255 * 100, atol=0.5)
    np.testing.assert_array_equal(dets["vessel"] > 0.5, aux / 255 > 0.5)
    # a peak cell of 1 upsampled: 9/16 of it, 6/16 of its edge neighbours, 1/16 of a corner one
    g1, g2 = np.exp(-1 / (2 * (7 / 6) ** 2)), np.exp(-2 / (2 * (7 / 6) ** 2))
    np.testing.assert_allclose(dets["objectness"], 9 / 16 + 6 / 16 * g1 + 1 / 16 * g2, rtol=1e-3)
    assert dets["fishing"].max() < 0.01

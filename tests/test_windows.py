"""lib/windows.py: where the windows of a sweep go, their model sizes, blend weights and bands of rows."""

import itertools

import numpy as np

from lib.windows import (
    BLEND_FLOOR,
    balanced_bands,
    blend_weights_1d,
    model_size,
    weight_sums,
    window_offsets,
    windows_touching,
)


def test_windows_cover_the_scene_without_leaving_it():
    for length, extent, overlap in [(1000, 256, 64), (256, 256, 64), (100, 256, 64), (1025, 1024, 0)]:
        offs = window_offsets(length, extent, overlap)
        assert offs[0] == 0 and offs[-1] == max(0, length - extent)
        assert all(b - a <= extent - overlap for a, b in itertools.pairwise(offs))


def test_model_size_is_a_multiple_of_32_and_keeps_the_scale():
    assert model_size(1024, 672 / 1024) == (672, 1024)  # the original x0.656 scale TTA
    for extent, factor in [(439, 672 / 1024), (1024, 0.59), (50, 1.0), (1000, 2.0)]:
        m, padded = model_size(extent, factor)
        assert m % 32 == 0 and padded >= extent
        assert abs(m / padded - factor) / factor < 1.5 / padded  # no stretching beyond a pixel


def test_blend_weights_peak_in_the_middle_and_keep_a_floor_at_the_seams():
    w = blend_weights_1d(64)
    assert w.argmax() in (31, 32) and w.max() > 0.99
    assert w[0] == w[-1] == np.float32(BLEND_FLOOR) and np.all(w >= np.float32(BLEND_FLOOR))


def test_weight_sums_equal_the_sum_of_every_window_weight():
    offs = window_offsets(300, 128, 48)
    brute = np.zeros(300, np.float32)
    for off in offs:
        brute[off:off + 128] += blend_weights_1d(128)
    assert np.allclose(weight_sums(300, 128, offs), brute)
    assert weight_sums(300, 128, offs).min() >= BLEND_FLOOR


def test_windows_touching_a_range_are_exactly_those_overlapping_it():
    for length, extent, overlap in [(1000, 256, 64), (1000, 256, 0), (300, 128, 100), (100, 256, 64)]:
        offs = window_offsets(length, extent, overlap)
        for start, stop in itertools.combinations(range(0, length + 1, 7), 2):
            brute = [k for k, o in enumerate(offs) if o < stop and o + min(extent, length) > start]
            assert list(windows_touching(offs, min(extent, length), start, stop)) == brute
        assert list(windows_touching(offs, extent, 50, 50)) == []  # an empty range touches nothing


def test_balanced_bands_tile_the_length_at_window_starts():
    assert balanced_bands(10_000, 1024, 256, 4) == [(0, 3072), (3072, 5376), (5376, 7680), (7680, 10_000)]
    assert balanced_bands(900, 900, 225, 8) == [(0, 900)]  # one row of windows: one band
    bands = balanced_bands(5000, 512, 128, 64)  # more bands asked than window rows: one per window row
    assert [a for a, _ in bands] == window_offsets(5000, 512, 128) and bands[-1][1] == 5000

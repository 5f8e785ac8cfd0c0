"""lib.point_targets: heatmap and weight values at known cells, units, ownership, validity."""

import math

import numpy as np
import pytest

from lib import point_contract as pc
from lib.point_targets import encode_targets, gaussian_sigma

NAN = float("nan")
SIGMA = 7 / 6  # CenterNet: (2 * radius + 1) / 6 for radius 3


def g(d2: float) -> float:
    return math.exp(-d2 / (2 * SIGMA * SIGMA))


def one(row=10.0, col=20.0, vessel=1.0, fishing=NAN, length=12.0, shape=(64, 64), valid=None):
    return encode_targets([row], [col], [vessel], [fishing], [length], shape, valid)


def test_every_target_is_float32_channel_first_at_stride_two():
    t = one(shape=(64, 96))
    assert set(t) == set(pc.TARGETS)
    for name, a in t.items():
        assert a.dtype == np.float32
        assert a.shape == ((2 if name == pc.T_OFFSET else 1), 32, 48), name


def test_heatmap_is_one_at_the_objects_cell_and_a_fixed_radius_gaussian_around_it():
    assert gaussian_sigma(3) == pytest.approx(SIGMA)
    heat = one()[pc.T_HEATMAP][0]  # object at row 10, col 20 -> cell (5, 10)
    assert heat[5, 10] == 1.0
    assert heat.max() == 1.0 and np.count_nonzero(heat == 1.0) == 1
    assert heat[5, 11] == pytest.approx(g(1), rel=1e-6)
    assert heat[6, 11] == pytest.approx(g(2), rel=1e-6)
    assert heat[8, 13] == pytest.approx(g(18), rel=1e-6)  # corner of the 7 x 7 window
    assert heat[5, 14] == 0 and heat[9, 10] == 0  # beyond HEATMAP_RADIUS cells
    assert np.count_nonzero(heat) == (2 * pc.HEATMAP_RADIUS + 1) ** 2


def test_cell_is_the_one_holding_the_objects_pixel():
    for row, cell in ((10.0, 5), (11.0, 5), (11.4, 5), (11.6, 6), (-0.4, 0), (12.9, 6)):
        heat = one(row=row)[pc.T_HEATMAP][0]
        assert np.argwhere(heat == 1.0).tolist() == [[cell, 10]], row


def test_class_weights_fall_linearly_to_zero_at_class_radius():
    t = one()
    w = t[pc.T_VESSEL_W][0]
    assert w[5, 10] == 1.0
    assert w[5, 11] == pytest.approx(0.5) and w[4, 10] == pytest.approx(0.5)
    assert w[6, 11] == pytest.approx(1 - math.sqrt(2) / 2)
    assert w[5, 12] == 0 and w[7, 10] == 0  # CLASS_RADIUS = 2 cells away
    assert np.count_nonzero(w) == 9
    np.testing.assert_array_equal(t[pc.T_LENGTH_W][0], w)
    np.testing.assert_array_equal(t[pc.T_OFFSET_W][0], w)


def test_known_labels_get_targets_and_weights_unknown_ones_the_unknown_weight():
    t = one(vessel=1.0, fishing=NAN, length=12.0)
    w = t[pc.T_OFFSET_W][0]
    assert t[pc.T_VESSEL][0, 5, 10] == 1.0 and t[pc.T_VESSEL][0, 5, 11] == 1.0
    assert t[pc.T_VESSEL_UNKNOWN][0].max() == 0
    assert t[pc.T_FISHING][0].max() == 0 and t[pc.T_FISHING_W][0].max() == 0
    np.testing.assert_array_equal(t[pc.T_FISHING_UNKNOWN][0], w)
    assert t[pc.T_LENGTH][0, 5, 10] == 12.0 and t[pc.T_LENGTH][0, 6, 11] == 12.0

    t = one(vessel=0.0, fishing=0.0, length=NAN)
    assert t[pc.T_VESSEL][0].max() == 0 and t[pc.T_VESSEL_W][0, 5, 10] == 1.0
    assert t[pc.T_FISHING_W][0, 5, 10] == 1.0 and t[pc.T_FISHING_UNKNOWN][0].max() == 0
    assert t[pc.T_LENGTH][0].max() == 0 and t[pc.T_LENGTH_W][0].max() == 0


def test_offset_points_from_the_cells_reference_point_to_the_object_in_cells():
    off = one(row=10.0, col=21.3)[pc.T_OFFSET]  # cell (5, 10), reference point (10.5, 20.5)
    assert off[:, 5, 10] == pytest.approx([-0.25, 0.4])
    assert off[:, 6, 11] == pytest.approx([(10 - 12.5) / 2, (21.3 - 22.5) / 2])
    assert off[:, 20, 20].tolist() == [0.0, 0.0]  # no object near


def test_the_nearest_object_owns_a_contested_cell():
    # A at (10, 20) -> cell (5, 10), B at (10, 26) -> cell (5, 13); cells 11 and 12 lie between them
    t = encode_targets([10, 10], [20, 26], [1.0, 0.0], [1.0, NAN], [10.0, 30.0], (64, 64))
    assert t[pc.T_LENGTH][0, 5, 11] == 10.0 and t[pc.T_VESSEL][0, 5, 11] == 1.0  # A is nearer
    assert t[pc.T_LENGTH][0, 5, 12] == 30.0 and t[pc.T_VESSEL][0, 5, 12] == 0.0  # B is nearer
    assert t[pc.T_VESSEL_W][0, 5, 12] == pytest.approx(0.5)  # B's weight one cell from B
    assert t[pc.T_FISHING_UNKNOWN][0, 5, 12] == pytest.approx(0.5)  # B's fishing is unknown
    assert t[pc.T_FISHING_W][0, 5, 12] == 0
    assert t[pc.T_OFFSET][1, 5, 12] == pytest.approx((26 - 24.5) / 2)
    heat = t[pc.T_HEATMAP][0]
    assert heat[5, 10] == heat[5, 13] == 1.0
    assert heat[5, 11] == pytest.approx(g(1), rel=1e-6)  # the maximum, not the sum, of both


def test_objects_just_outside_the_chip_leave_their_tails():
    t = one(row=-4.0, col=20.0)  # cell (-2, 10)
    heat = t[pc.T_HEATMAP][0]
    assert heat[0, 10] == pytest.approx(g(4), rel=1e-6) and heat[1, 10] == pytest.approx(g(9), rel=1e-6)
    assert heat.max() < 1 and t[pc.T_VESSEL_W][0].max() == 0  # 2 cells away: class weight 0


def test_valid_marks_cells_with_any_valid_pixel():
    valid = np.ones((64, 64), bool)
    valid[:3, :3] = False
    cells = one(valid=valid)[pc.T_VALID][0]
    assert cells[0, 0] == 0 and cells[1, 1] == 1 and cells[0, 1] == 1
    assert cells.sum() == 32 * 32 - 1
    with pytest.raises(ValueError, match="shape"):
        one(valid=np.ones((10, 10), bool))


def test_no_objects_give_empty_targets():
    t = encode_targets([], [], [], [], [], (32, 32))
    assert all(t[name].max() == 0 for name in pc.TARGETS if name != pc.T_VALID)
    assert t[pc.T_VALID].min() == 1


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="cols"):
        encode_targets([1, 2], [1], [1, 1], [1, 1], [1, 1], (32, 32))
    with pytest.raises(ValueError, match="finite"):
        encode_targets([NAN], [1], [1], [1], [1], (32, 32))

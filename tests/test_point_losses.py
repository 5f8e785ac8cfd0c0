"""lib.point_losses: each term against hand-computed values, masking, normalisation and gradients."""

import math

import pytest
import torch

from lib import point_contract as P
from lib.point_losses import TERMS, PointLoss, bernoulli_entropy, reduced_focal_loss

CHANNELS = {P.OBJECTNESS: 1, P.LENGTH: 1, P.OFFSET: 2, P.VESSEL: 1, P.FISHING: 1}


def _targets(h=2, w=3, n=1) -> dict:
    """All-zero targets (no object, every weight 0) with every cell valid."""
    t = {k: torch.zeros(n, 2 if k == P.T_OFFSET else 1, h, w) for k in P.TARGETS}
    t[P.T_VALID] = torch.ones(n, 1, h, w)
    return t


def _outputs(h=2, w=3, n=1, value=0.0) -> dict:
    return {k: torch.full((n, c, h, w), value, requires_grad=True) for k, c in CHANNELS.items()}


def _sigmoid(z):
    return 1.0 / (1.0 + math.exp(-z))


def test_reduced_focal_loss_matches_a_hand_computed_case():
    z = [0.0, math.log(3.0), -math.log(3.0)]  # p = 0.5, 0.75, 0.25
    heat = [1.0, 0.5, 0.0]
    logits = torch.tensor(z).view(1, 1, 1, 3)
    heatmap = torch.tensor(heat).view(1, 1, 1, 3)
    pos = -(1 - 0.5) ** 2 * math.log(0.5)
    neg_half = -(1 - 0.5) ** 4 * 0.75 ** 2 * math.log(1 - 0.75)
    neg_zero = -(1 - 0.0) ** 4 * 0.25 ** 2 * math.log(1 - 0.25)
    valid = torch.ones_like(heatmap)
    got = reduced_focal_loss(logits, heatmap, valid, alpha=2, beta=4)
    assert got.item() == pytest.approx(pos + neg_half + neg_zero, rel=1e-6)
    # an invalid cell counts nowhere; two objects halve the (per-object) loss
    valid[..., 2] = 0
    assert reduced_focal_loss(logits, heatmap, valid).item() == pytest.approx(pos + neg_half, rel=1e-6)
    two = torch.tensor([1.0, 1.0, 0.0]).view(1, 1, 1, 3)
    both = (pos + -(1 - 0.75) ** 2 * math.log(0.75) + neg_zero) / 2
    assert reduced_focal_loss(logits, two, torch.ones_like(two)).item() == pytest.approx(both, rel=1e-6)


def test_classifier_bce_uses_label_smoothing_of_005():
    out, t = _outputs(value=1.5), _targets()
    t[P.T_VESSEL][..., 0, 0], t[P.T_VESSEL_W][..., 0, 0] = 1.0, 1.0
    t[P.T_FISHING_W][..., 0, 0] = 1.0  # fishing target 0
    _, terms = PointLoss(label_smoothing=0.05)(out, t)
    p = _sigmoid(1.5)
    assert terms["vessel"].item() == pytest.approx(-(0.975 * math.log(p) + 0.025 * math.log(1 - p)), rel=1e-6)
    assert terms["fishing"].item() == pytest.approx(-(0.025 * math.log(p) + 0.975 * math.log(1 - p)), rel=1e-6)
    # the smoothed target is the minimum: the gradient vanishes at p = 0.975
    out = _outputs(value=math.log(0.975 / 0.025))
    total, _ = PointLoss(label_smoothing=0.05, objectness=0, fishing=0, entropy=0)(out, t)
    total.backward()
    assert out[P.VESSEL].grad.abs().max().item() < 1e-6


def test_entropy_is_largest_at_one_half_and_vanishes_at_certainty():
    z = torch.tensor([-30.0, -2.0, 0.0, 2.0, 30.0]).view(1, 1, 1, 5)
    h = bernoulli_entropy(z).flatten()
    assert h[2].item() == pytest.approx(math.log(2), rel=1e-6)
    assert h[0].item() < 1e-10 and h[4].item() < 1e-10
    assert h[1].item() == pytest.approx(h[3].item()) and h[1].item() < h[2].item()
    # in the loss: only where the label is unknown, averaged over both classifiers' unknown weights
    out, t = _outputs(), _targets()
    with torch.no_grad():
        out[P.FISHING][..., 0, 1] = 30.0
    t[P.T_VESSEL_UNKNOWN][..., 0, 0] = 1.0  # vessel p = 0.5 there: ln 2
    t[P.T_FISHING_UNKNOWN][..., 0, 1] = 1.0  # fishing p ~ 1 there: ~0
    _, terms = PointLoss()(out, t)
    assert terms["entropy"].item() == pytest.approx(math.log(2) / 2, rel=1e-5)


def test_regressions_are_weighted_means_of_squared_errors():
    out, t = _outputs(), _targets()
    t[P.T_LENGTH][..., 0, :2] = torch.tensor([2.0, 4.0])
    t[P.T_LENGTH_W][..., 0, :2] = torch.tensor([1.0, 0.5])
    t[P.T_LENGTH][..., 1, 2] = 100.0  # weight 0: ignored
    t[P.T_OFFSET][:, :, 1, 1] = torch.tensor([0.3, -0.4])
    t[P.T_OFFSET_W][..., 1, 1] = 1.0
    _, terms = PointLoss()(out, t)
    assert terms["length"].item() == pytest.approx((4 * 1 + 16 * 0.5) / 1.5, rel=1e-6)
    assert terms["offset"].item() == pytest.approx(0.3 ** 2 + 0.4 ** 2, rel=1e-6)
    t[P.T_VALID][..., 0, 1] = 0  # nodata removes the second length sample
    assert PointLoss()(out, t)[1]["length"].item() == pytest.approx(4.0, rel=1e-6)


def test_total_is_the_weighted_sum_of_the_unweighted_terms():
    torch.manual_seed(1)
    out = {k: torch.randn(2, c, 4, 4) for k, c in CHANNELS.items()}
    t = _targets(4, 4, 2)
    for k in (P.T_HEATMAP, P.T_VESSEL, P.T_FISHING, P.T_VESSEL_W, P.T_FISHING_W, P.T_VESSEL_UNKNOWN,
              P.T_FISHING_UNKNOWN, P.T_LENGTH_W, P.T_OFFSET_W):
        t[k] = torch.rand_like(t[k])
    t[P.T_HEATMAP][0, 0, 1, 1] = 1.0
    t[P.T_LENGTH], t[P.T_OFFSET] = torch.rand_like(t[P.T_LENGTH]) * 20, torch.randn_like(t[P.T_OFFSET])
    weights = {"objectness": 1.0, "vessel": 0.5, "fishing": 2.0, "entropy": 0.3, "length": 0.1, "offset": 0.001}
    total, terms = PointLoss(**weights)(out, t)
    assert set(terms) == set(TERMS)
    assert total.item() == pytest.approx(sum(weights[k] * terms[k].item() for k in TERMS), rel=1e-6)
    assert all(v.item() > 0 for v in terms.values())


def test_a_zero_weight_gives_exactly_zero_gradient():
    out, t = _outputs(value=0.7), _targets()
    t[P.T_VESSEL_W][..., 0, 0], t[P.T_VESSEL_UNKNOWN][..., 1, 1] = 1.0, 1.0
    t[P.T_LENGTH][..., 0, 0], t[P.T_LENGTH_W][..., 0, 0] = 9.0, 1.0
    total, _ = PointLoss(vessel=0.0, entropy=0.0)(out, t)
    total.backward()
    assert out[P.VESSEL].grad is not None and torch.count_nonzero(out[P.VESSEL].grad) == 0
    assert out[P.FISHING].grad is not None and torch.count_nonzero(out[P.FISHING].grad) == 0
    length_grad = out[P.LENGTH].grad[0, 0]
    assert length_grad[0, 0].item() != 0 and torch.count_nonzero(length_grad) == 1  # target weight 0 elsewhere


def test_a_batch_without_objects_gives_finite_loss_and_gradient():
    out, t = _outputs(value=0.5), _targets()
    t[P.T_LENGTH][:] = float("nan")  # unknown lengths, weight 0
    total, terms = PointLoss()(out, t)
    total.backward()
    assert math.isfinite(total.item())
    assert {k: terms[k].item() for k in TERMS if k != "objectness"} == dict.fromkeys(TERMS[1:], 0.0)
    p = _sigmoid(0.5)
    assert terms["objectness"].item() == pytest.approx(6 * -(p ** 2) * math.log(1 - p), rel=1e-6)  # 6 cells, /1
    assert all(torch.isfinite(v.grad).all() for v in out.values())
    t[P.T_VALID][:] = 0  # an all-nodata chip: nothing at all
    assert PointLoss()(out, t)[0].item() == 0.0


def test_bfloat16_heads_are_scored_in_float32_under_autocast():
    torch.manual_seed(2)
    out = {k: torch.randn(1, c, 4, 4) for k, c in CHANNELS.items()}
    t = _targets(4, 4)
    t[P.T_HEATMAP][0, 0, 2, 2], t[P.T_VESSEL_W][:] = 1.0, 0.5
    ref_total, _ = PointLoss()(out, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, terms = PointLoss()({k: v.bfloat16() for k, v in out.items()}, t)
    assert total.dtype == torch.float32 and all(v.dtype == torch.float32 for v in terms.values())
    assert total.item() == pytest.approx(ref_total.item(), rel=2e-2)  # only the bf16 rounding of the heads


def test_heads_and_targets_at_different_resolutions_refused():
    with pytest.raises(ValueError, match="output stride"):
        PointLoss()(_outputs(4, 6), _targets(2, 3))

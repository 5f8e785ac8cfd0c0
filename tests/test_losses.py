"""Loss values on hand-checked tensors, and that the ignore region reaches no loss."""

import math

import pytest
import torch

from lib.losses import (
    LossConfig,
    bernoulli_kl_map,
    building_present,
    dice_loss,
    entropy_map,
    focal_loss_map,
    instance_terms,
    kl_loss_map,
    ohem_mean,
    sample_mean,
    scale_loss,
    smooth_labels,
    soft_label_loss,
    soft_to_hard,
    supervised_loss,
    upsample_to,
    weighted_total,
)
from lib.model_contract import CLS, DICE, INSTANCE, SCALE, SEG

LN3 = math.log(3.0)  # 2-class logits [0, ln 3] -> probabilities [0.25, 0.75]


def pixel(target, logits=(0.0, LN3)):
    """A 1x1 image: 2-class logits [1, 2, 1, 1] and its target [1, 1, 1]."""
    return torch.tensor(logits).view(1, 2, 1, 1), torch.tensor([[[float(target)]]])


@pytest.mark.parametrize("target, gamma, expected", [
    (1.0, 2.0, 0.0625 * -math.log(0.75)),   # (1 - 0.75)^2 * -ln 0.75
    (0.0, 2.0, 0.5625 * -math.log(0.25)),   # (1 - 0.25)^2 * -ln 0.25
    (1.0, 0.0, -math.log(0.75)),            # gamma 0 = cross-entropy
    (0.25, 0.0, -(0.75 * math.log(0.25) + 0.25 * math.log(0.75))),  # soft target: cross-entropy to [0.75, 0.25]
])
def test_focal_loss_matches_hand_computed_values(target, gamma, expected):
    logits, t = pixel(target)
    assert focal_loss_map(logits, t, gamma).item() == pytest.approx(expected, rel=1e-6)


def test_label_smoothing_moves_targets_toward_one_half_and_changes_focal_loss():
    assert smooth_labels(torch.tensor([0.0, 1.0]), 0.1).tolist() == pytest.approx([0.05, 0.95])
    logits, t = pixel(1.0)
    expected = 0.05 * 0.5625 * -math.log(0.25) + 0.95 * 0.0625 * -math.log(0.75)
    assert focal_loss_map(logits, smooth_labels(t, 0.1)).item() == pytest.approx(expected, rel=1e-6)


def test_sample_mean_averages_valid_pixels_per_image():
    values = torch.tensor([[1.0, 3.0, 100.0], [2.0, 2.0, 2.0]])
    valid = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    assert sample_mean(values, valid).tolist() == [2.0, 0.0]  # ignored pixel excluded; all-ignored image -> 0


def test_ohem_keeps_the_hardest_share_of_valid_pixels_per_image():
    loss = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 100.0], [6.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    valid = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.float32)
    # image 0: 5 valid pixels, keep ceil(0.4 * 5) = 2 -> (5 + 4) / 2; the ignored 100 is never picked
    # image 1: 6 valid pixels, keep ceil(2.4) = 3 -> (6 + 1 + 1) / 3
    assert ohem_mean(loss, valid, 0.4).tolist() == pytest.approx([4.5, 8.0 / 3.0])


def test_dice_loss_is_per_image_and_ignores_masked_pixels():
    logits = torch.zeros(2, 1, 1, 2)  # p = 0.5 everywhere
    target = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    # image 0: inter 0.5, sum p 1, sum t 1 -> 1 - 2/3; image 1 likewise
    assert dice_loss(logits, target).item() == pytest.approx(1 / 3)
    valid = torch.tensor([[[1.0, 1.0]], [[1.0, 0.0]]])
    # image 1 with its building pixel ignored: p = [0.5], t = [0] -> 1 - 1 / 1.5
    assert dice_loss(logits, target, valid).item() == pytest.approx((1 / 3 + 1 / 3) / 2)
    valid2 = torch.tensor([[[1.0, 1.0]], [[0.0, 1.0]]])
    # image 1 keeps its building pixel: p = [0.5], t = [1] -> 1 - (1 + 1) / (0.5 + 1 + 1) = 0.2
    assert dice_loss(logits, target, valid2).item() == pytest.approx((1 / 3 + 0.2) / 2)


def test_kl_divergence_against_soft_targets():
    logits, _ = pixel(0.0)
    half = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert kl_loss_map(logits, torch.tensor([[[0.5]]])).item() == pytest.approx(half, rel=1e-6)
    assert kl_loss_map(logits, torch.tensor([[[0.75]]])).item() == pytest.approx(0.0, abs=1e-7)
    assert kl_loss_map(logits, torch.tensor([[[1.0]]])).item() == pytest.approx(-math.log(0.75), rel=1e-6)
    # the dice head's single logit: sigmoid(ln 3) = 0.75, same KL
    assert bernoulli_kl_map(torch.full((1, 1, 1, 1), LN3), torch.tensor([[[0.5]]])).item() == pytest.approx(half, rel=1e-6)


def test_entropy_of_two_class_predictions():
    assert entropy_map(torch.zeros(1, 2, 1, 1)).item() == pytest.approx(math.log(2))
    logits, _ = pixel(0.0)
    assert entropy_map(logits).item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))


def test_scale_loss_is_smooth_l1_and_masks_unknown_gsd():
    pred = torch.tensor([[1.0], [2.0], [5.0]])
    target = torch.tensor([1.5, float("nan"), 1.0])
    assert scale_loss(pred, target).tolist() == pytest.approx([0.125, 0.0, 3.5])


def test_soft_to_hard_ignores_the_uncertain_band():
    target = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9])
    hard, ignore = soft_to_hard(target, torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0]), (0.3, 0.7))
    assert hard.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]
    assert ignore.tolist() == [0.0, 0.0, 1.0, 0.0, 1.0]  # the band pixel joins the existing ignore region


def test_building_present_target_looks_only_at_valid_pixels():
    target = torch.tensor([[[0.0, 1.0]], [[0.0, 0.6]], [[0.0, 0.0]]])
    valid = torch.tensor([[[1.0, 0.0]], [[1.0, 1.0]], [[1.0, 1.0]]])
    assert building_present(target, valid).tolist() == [0.0, 1.0, 0.0]


def test_upsampling_stride4_logits_keeps_constant_maps_constant():
    logits = torch.full((1, 2, 4, 4), 0.7)
    up = upsample_to(logits, (16, 16))
    assert up.shape == (1, 2, 16, 16) and torch.allclose(up, torch.full_like(up, 0.7))


def fake_outputs(n=2, size=8, requires_grad=True):
    g = torch.Generator().manual_seed(0)
    out = {SEG: torch.randn(n, 2, size, size, generator=g), DICE: torch.randn(n, 1, size, size, generator=g),
           CLS: torch.randn(n, 2, generator=g), SCALE: torch.randn(n, 1, generator=g)}
    for v in out.values():
        v.requires_grad_(requires_grad)
    return out


def batch_targets(n=2, size=8):
    target = torch.zeros(n, size, size)
    target[:, 2:5, 2:6] = 1.0
    ignore = torch.zeros(n, size, size)
    ignore[:, :, 6:] = 1.0
    return target, ignore


@pytest.mark.parametrize("options", [{}, {"do_ohem": True}, {"label_smoothing": 0.1}])
def test_ignored_pixels_get_no_gradient(options):
    out = fake_outputs()
    target, ignore = batch_targets()
    total, _ = supervised_loss(out, target, ignore, torch.tensor([0.1, float("nan")]), LossConfig(**options))
    total.backward()
    for key in (SEG, DICE):
        assert out[key].grad[..., 6:].abs().max() == 0  # ignored columns
        assert out[key].grad[..., :6].abs().max() > 0


def test_entropy_weight_regularises_only_ignored_pixels():
    out = fake_outputs()
    target, ignore = batch_targets()
    lc = LossConfig(entropy_weight=0.5, seg_weight=0.0, dice_weight=0.0, cls_weight=0.0, scale_weight=0.0)
    total, terms = supervised_loss(out, target, ignore, None, lc)
    total.backward()
    grad = out[SEG].grad
    assert grad[..., :6].abs().max() == 0 and grad[..., 6:].abs().max() > 0
    assert terms["entropy"].item() == pytest.approx(sample_mean(entropy_map(out[SEG]), ignore).mean().item())
    # minimising it makes ignored pixels confident
    logits = out[SEG].detach().clone().requires_grad_(True)
    opt = torch.optim.SGD([logits], lr=100.0)
    before = sample_mean(entropy_map(logits), ignore).mean().item()
    for _ in range(20):
        opt.zero_grad()
        supervised_loss({**out, SEG: logits}, target, ignore, None, lc)[0].backward()
        opt.step()
    assert sample_mean(entropy_map(logits), ignore).mean().item() < 0.5 * before


def test_total_is_the_weighted_sum_of_the_head_losses():
    out = fake_outputs(requires_grad=False)
    target, ignore = batch_targets()
    gsd = torch.tensor([0.15, 0.3])
    lc = LossConfig(seg_weight=2.0, dice_weight=0.5, cls_weight=0.3, scale_weight=0.7, ref_scale=0.3)
    total, terms = supervised_loss(out, target, ignore, gsd, lc)
    assert total.item() == pytest.approx(weighted_total(terms, lc).item(), rel=1e-6)
    assert terms["scale"].item() == pytest.approx(scale_loss(out[SCALE], gsd / 0.3).mean().item())
    assert terms["cls"].item() == pytest.approx(focal_loss_map(out[CLS], torch.ones(2)).mean().item())


def test_ohem_applies_only_in_training():
    out = fake_outputs(requires_grad=False)
    target, ignore = batch_targets()
    lc = LossConfig(do_ohem=True, ohem_ratio=0.1)
    hard = supervised_loss(out, target, ignore, None, lc, train=True)[1]["seg"]
    plain = supervised_loss(out, target, ignore, None, lc, train=False)[1]["seg"]
    assert hard.item() > plain.item()
    assert plain.item() == pytest.approx(supervised_loss(out, target, ignore, None, LossConfig())[1]["seg"].item())


def test_loss_of_a_batch_is_the_mean_of_its_halves():
    """What makes data-parallel training match one process: per-image normalisation."""
    out = fake_outputs(n=4, requires_grad=False)
    target, ignore = batch_targets(n=4)
    ignore[1, :3] = 1.0  # images with different numbers of valid pixels
    gsd = torch.tensor([0.1, 0.2, float("nan"), 0.4])
    lc = LossConfig(do_ohem=True, label_smoothing=0.05, entropy_weight=0.1, ref_scale=0.2)
    whole = supervised_loss(out, target, ignore, gsd, lc)[0]
    halves = [supervised_loss({k: v[i:i + 2] for k, v in out.items()}, target[i:i + 2], ignore[i:i + 2],
                              gsd[i:i + 2], lc)[0] for i in (0, 2)]
    assert whole.item() == pytest.approx((halves[0].item() + halves[1].item()) / 2, rel=1e-6)


def test_soft_label_loss_is_zero_when_predictions_equal_the_soft_targets():
    target = torch.tensor([[[0.25, 0.75], [0.5, 0.9]]])
    p = target.clamp(1e-6, 1 - 1e-6)
    logit = torch.log(p) - torch.log1p(-p)
    out = {SEG: torch.stack([torch.zeros_like(logit), logit], 1), DICE: logit.unsqueeze(1)}
    total, _ = soft_label_loss(out, target, torch.zeros_like(target), LossConfig())
    assert total.item() == pytest.approx(0.0, abs=1e-6)
    total2, _ = soft_label_loss(out, 1 - target, torch.zeros_like(target), LossConfig())
    assert total2.item() > 0.1


# --------------------------------------------------------------------------------------------------
# The instance head: border and contact maps
# --------------------------------------------------------------------------------------------------


def instance_case():
    """One 4x4 chip: a building border of 4 pixels, no contact pixel; nothing ignored."""
    border = torch.zeros(1, 4, 4)
    border[0, 1, :] = 1.0
    return border, torch.zeros(1, 4, 4), torch.ones(1, 4, 4)


def test_instance_terms_have_the_hand_computed_values():
    """Logits 0 (p = 1/2): BCE ln 2 per pixel; dice 1 - (2 I + 1) / (sum p + sum t + 1) with I = 2 (border), 0."""
    border, contact, valid = instance_case()
    logits = torch.zeros(1, 2, 4, 4)
    terms = instance_terms(logits, border, contact, valid, torch.ones(1), LossConfig())
    assert terms["border"].item() == pytest.approx(math.log(2) + 1 - 5 / 13, rel=1e-6)
    assert terms["contact"].item() == pytest.approx(math.log(2) + 1 - 1 / 9, rel=1e-6)
    focal = instance_terms(logits, border, contact, valid, torch.ones(1), LossConfig(instance_loss="focal_dice"))
    assert focal["border"].item() == pytest.approx(0.25 * math.log(2) + 1 - 5 / 13, rel=1e-6)  # (1/2)^2 ln 2


@pytest.mark.parametrize("instance_loss", ["bce_dice", "focal_dice"])
def test_perfect_instance_maps_cost_nothing(instance_loss):
    border, contact, valid = instance_case()
    contact[0, 3, 0] = 1.0
    logits = (torch.stack([border, contact], 1) * 2 - 1) * 40.0
    terms = instance_terms(logits, border, contact, valid, torch.ones(1), LossConfig(instance_loss=instance_loss))
    assert terms["border"].item() < 1e-6 and terms["contact"].item() < 1e-6


def test_contact_is_masked_by_instance_ok_and_both_by_the_ignore_region():
    out = fake_outputs()
    out[INSTANCE] = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    target, ignore = batch_targets()  # labels 8x8: the stride-2 logits are upsampled to them
    border = (target > 0).float()
    contact = torch.zeros_like(target)
    contact[:, 5, 2:6] = 1.0
    ok = torch.tensor([1.0, 0.0])  # the second chip's ids came from the mask: its contact is unknown
    lc = LossConfig(border_weight=0.5, contact_weight=2.0)
    total, terms = supervised_loss(out, target, ignore, None, lc, border=border, contact=contact, instance_ok=ok)
    assert set(terms) >= {"border", "contact"}
    assert total.item() == pytest.approx(weighted_total(terms, lc).item(), rel=1e-6)
    plain, _ = supervised_loss(out, target, ignore, None, lc)
    assert total.item() == pytest.approx(plain.item() + 0.5 * terms["border"].item() + 2.0 * terms["contact"].item(),
                                         rel=1e-6)
    only_first = instance_terms(out[INSTANCE][:1], border[:1], contact[:1], 1 - ignore[:1], ok[:1], lc)["contact"]
    assert terms["contact"].item() == pytest.approx(only_first.item() / 2, rel=1e-6)  # second chip adds 0
    terms["contact"].backward()
    grad = out[INSTANCE].grad
    assert grad[1, 1].abs().max() == 0 and grad[0, 1].abs().max() > 0 and grad[:, 0].abs().max() == 0
    full = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    terms = instance_terms(full, border, contact, 1 - ignore, ok, lc)  # logits at the labels' size
    (terms["border"] + terms["contact"]).backward()
    assert full.grad[..., 6:].abs().max() == 0 and full.grad[:, 0, :, :6].abs().min() > 0  # ignored columns 6-7


def test_instance_terms_need_the_maps_and_soft_labels_have_none():
    out = fake_outputs(requires_grad=False)
    out[INSTANCE] = torch.zeros(2, 2, 8, 8)
    target, ignore = batch_targets()
    assert "border" not in supervised_loss(out, target, ignore, None, LossConfig())[1]
    assert set(soft_label_loss(out, target, ignore, LossConfig())[1]) == {"soft_seg", "soft_dice"}

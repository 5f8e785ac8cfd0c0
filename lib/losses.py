"""Training losses for the model heads, each respecting the ignore region.

The recipe of the Open Cities 3rd-place pipeline: focal loss on the 2-class segmentation head, dice loss on
the dice head, focal loss on the building-present head and a regression on the scale head; optional OHEM
that keeps only the hardest pixels; KL divergence against soft labels for self-training. Added for noisy
labels: label smoothing and entropy minimisation. For models with the instance head (INSTANCE): BCE (or
focal) + dice on each of its border and contact maps, the contact map masked for chips whose instance ids
were derived from the mask (`instance_ok` = 0: touching buildings cannot be told apart there).

Conventions used by every function here:
- `target` is the probability of "building" (0..1, soft allowed), shaped like the logits without the
  channel dimension; 2-class logits get the distribution [1 - t, t].
- `valid` is 1 where a pixel may contribute and 0 in the ignore region (nodata/alpha, uncertain labels).
  Ignored pixels never reach a loss, except the entropy term (`entropy_map`), which needs no label and is
  applied exactly there on purpose (opt-in through `entropy_weight`).
- Pixel losses are averaged over the valid pixels of each image, then over the images of the batch.
  Every chip weighs the same, and the loss of a batch is the mean of its samples' losses, so it splits
  exactly across data-parallel processes. An image with no valid pixel contributes zero (the autograd
  graph is kept, so a step never crashes on an all-nodata chip).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lib.model_contract import CLS, DICE, INSTANCE, SCALE, SEG


def sample_mean(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Per-image weighted mean of [N, ...] values -> [N] (zero for an image whose weights sum to zero)."""
    values = values.flatten(1)
    if weights is None:
        return values.mean(1)
    weights = weights.flatten(1).to(values.dtype)
    return (values * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def smooth_labels(target: torch.Tensor, eps: float) -> torch.Tensor:
    """Pull binary targets toward 0.5 by `eps` (label smoothing for 2 classes): t -> t(1-eps) + eps/2."""
    return target * (1.0 - eps) + 0.5 * eps if eps else target


def two_class(target: torch.Tensor) -> torch.Tensor:
    """Building probability [N, ...] -> class distribution [N, 2, ...] = [1 - t, t]."""
    return torch.stack([1.0 - target, target], dim=1)


def focal_loss_map(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Per-element focal loss of 2-class logits [N, 2, ...] against building probability [N, ...].

    With soft targets this is -sum_c t_c (1 - q_c)^gamma log q_c, which reduces to the usual focal loss
    for hard targets and to cross-entropy for gamma = 0.
    """
    log_q = F.log_softmax(logits.float(), dim=1)
    q = log_q.exp()
    return -(two_class(target.float()) * (1.0 - q).pow(gamma) * log_q).sum(dim=1)


def ohem_mean(loss_map: torch.Tensor, valid: torch.Tensor | None, keep: float) -> torch.Tensor:
    """Online hard example mining: per image, the mean of the hardest `keep` fraction of its valid pixels.

    Returns [N]; images without valid pixels give zero.
    """
    flat = loss_map.flatten(1)
    ok = torch.ones_like(flat, dtype=torch.bool) if valid is None else valid.flatten(1) > 0.5
    out = []
    for values, mask in zip(flat, ok):
        values = values[mask]
        if values.numel() == 0:
            out.append(values.sum() * 0.0)
            continue
        k = max(1, math.ceil(keep * values.numel()))
        out.append(values.topk(k, sorted=False).values.mean())
    return torch.stack(out)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None,
              smooth: float = 1.0) -> torch.Tensor:
    """Soft dice loss of 1-channel logits [N, 1, H, W], computed per image and averaged over the batch.

    Per image (not over the whole batch) so that the loss of a batch is the mean of its samples: the
    loss then splits exactly across data-parallel processes. `smooth` keeps empty images well defined
    (their loss falls to 0 as the predicted area falls to 0).
    """
    p = torch.sigmoid(logits.float()).flatten(1)
    t = target.float().flatten(1)
    if valid is not None:
        v = valid.float().flatten(1)
        p, t = p * v, t * v
    inter = (p * t).sum(1)
    return (1.0 - (2.0 * inter + smooth) / (p.sum(1) + t.sum(1) + smooth)).mean()


def kl_loss_map(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-element KL(target || softmax(logits)) for 2-class logits against building probability."""
    log_q = F.log_softmax(logits.float(), dim=1)
    return F.kl_div(log_q, two_class(target.float()), reduction="none").sum(dim=1)


def bernoulli_kl_map(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-element KL(Bernoulli(target) || Bernoulli(sigmoid(logits))), logits [N, 1, ...], target [N, ...].

    sigmoid(z) is the class-1 probability of the 2-class logits [0, z], so the 2-class KL applies.
    """
    return kl_loss_map(torch.cat([torch.zeros_like(logits), logits], dim=1), target)


def entropy_map(logits: torch.Tensor) -> torch.Tensor:
    """Per-element Shannon entropy (nats) of softmax(logits) over dim 1."""
    log_q = F.log_softmax(logits.float(), dim=1)
    return -(log_q.exp() * log_q).sum(dim=1)


def scale_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Smooth-L1 between the scale head [N, 1] and target scales [N] -> [N]; NaN targets (unknown GSD) give 0."""
    pred = pred.float().reshape(-1)
    target = target.float().reshape(-1).to(pred.device)
    known = torch.isfinite(target)
    per = F.smooth_l1_loss(pred, torch.where(known, target, torch.zeros_like(target)), reduction="none")
    return per * known.to(per.dtype)


def soft_to_hard(target: torch.Tensor, ignore: torch.Tensor, band: tuple[float, float]):
    """Harden soft labels: <= band[0] -> 0, >= band[1] -> 1, in between -> added to the ignore region."""
    low, high = float(band[0]), float(band[1])
    uncertain = (target > low) & (target < high)
    hard = (target >= high).to(target.dtype)
    return hard, torch.maximum(ignore, uncertain.to(ignore.dtype))


def upsample_to(logits: torch.Tensor, size) -> torch.Tensor:
    """Bilinear upsampling of stride-4 head logits to the label resolution (no-op when already there)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits.float(), size=tuple(size), mode="bilinear", align_corners=False)


@dataclass
class LossConfig:
    """Loss options, read from the flat training config by `from_cfg`."""

    focal_gamma: float = 2.0
    seg_weight: float = 1.0
    dice_weight: float = 1.0
    cls_weight: float = 0.1
    scale_weight: float = 0.1
    do_ohem: bool = False
    ohem_ratio: float = 0.25
    label_smoothing: float = 0.0
    entropy_weight: float = 0.0
    ref_scale: float | None = None
    instance_loss: str = "bce_dice"  # bce_dice | focal_dice (focal with focal_gamma), border and contact maps
    border_weight: float = 1.0
    contact_weight: float = 1.0

    @classmethod
    def from_cfg(cls, cfg) -> LossConfig:
        return cls(**{k: cfg[k] for k in cls.__dataclass_fields__})


def building_present(target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Chip-level target of the classification head: any valid pixel at least half building."""
    return ((target * valid).flatten(1).amax(1) >= 0.5).to(target.dtype)


def scale_target(gsd: torch.Tensor | None, ref_scale: float | None) -> torch.Tensor | None:
    """Scale-head target: the chip's GSD relative to `ref_scale` (plain m/px when no reference is set)."""
    if gsd is None:
        return None
    return gsd.float() / float(ref_scale or 1.0)


INSTANCE_LOSSES = ("bce_dice", "focal_dice")


def binary_map_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, lc: LossConfig) -> torch.Tensor:
    """BCE (or focal, gamma = focal_gamma) + dice of one-channel logits [N, 1, H, W] against 0/1 [N, H, W].

    Pixel terms are averaged over each image's valid pixels, dice is taken over them: a chip with no
    valid pixel adds zero. Focal is the 2-class focal loss of the logits [0, z] (sigmoid(z) = softmax[1]).
    """
    if lc.instance_loss == "focal_dice":
        pixel = focal_loss_map(torch.cat([torch.zeros_like(logits), logits], 1), target, lc.focal_gamma)
    else:
        pixel = F.binary_cross_entropy_with_logits(logits[:, 0].float(), target.float(), reduction="none")
    return sample_mean(pixel, valid).mean() + dice_loss(logits, target, valid)


def instance_terms(logits: torch.Tensor, border: torch.Tensor, contact: torch.Tensor, valid: torch.Tensor,
                   instance_ok: torch.Tensor | None, lc: LossConfig) -> dict:
    """{"border", "contact"} losses of the instance head [N, 2, h, w] (upsampled to the targets' size).

    Contact is masked per sample by `instance_ok` (1 = ids from an instances.png, 0 = from the mask's
    connected components, where touching buildings are one id and contact is unknown).
    """
    logits = upsample_to(logits, border.shape[-2:])
    ok = valid if instance_ok is None else valid * instance_ok.float().to(valid.device).view(-1, 1, 1)
    return {"border": binary_map_loss(logits[:, 0:1], border, valid, lc),
            "contact": binary_map_loss(logits[:, 1:2], contact, ok, lc)}


def supervised_loss(out: dict, target: torch.Tensor, ignore: torch.Tensor, gsd: torch.Tensor | None,
                    lc: LossConfig, train: bool = True, *, border: torch.Tensor | None = None,
                    contact: torch.Tensor | None = None, instance_ok: torch.Tensor | None = None):
    """Weighted sum of the head losses for a labelled batch; returns (total, {term: float tensor}).

    The stride-4 logits are upsampled to the label resolution: losses then see exact masks and ignore
    regions (no target quantisation at building edges), at the same resolution validation is scored.
    `train=False` disables OHEM so validation losses are comparable between runs. The instance terms
    ("border", "contact") are added when the output has INSTANCE and the batch its `border`/`contact` maps.
    """
    size = target.shape[-2:]
    valid = 1.0 - ignore.float()
    smoothed = smooth_labels(target.float(), lc.label_smoothing)
    seg = upsample_to(out[SEG], size)
    seg_map = focal_loss_map(seg, smoothed, lc.focal_gamma)
    if lc.do_ohem and train:
        seg_term = ohem_mean(seg_map, valid, lc.ohem_ratio).mean()
    else:
        seg_term = sample_mean(seg_map, valid).mean()
    terms = {"seg": seg_term, "dice": dice_loss(upsample_to(out[DICE], size), target, valid)}
    has_valid = (valid.flatten(1).amax(1) > 0).float()
    cls_t = smooth_labels(building_present(target.float(), valid), lc.label_smoothing)
    terms["cls"] = (focal_loss_map(out[CLS], cls_t, lc.focal_gamma) * has_valid).mean()
    st = scale_target(gsd, lc.ref_scale)
    terms["scale"] = scale_loss(out[SCALE], st).mean() if st is not None else out[SCALE].sum() * 0.0
    if lc.entropy_weight:
        terms["entropy"] = sample_mean(entropy_map(seg), ignore.float()).mean()
    if INSTANCE in out and border is not None and contact is not None:
        terms.update(instance_terms(out[INSTANCE], border, contact, valid, instance_ok, lc))
    return weighted_total(terms, lc), terms


def weighted_total(terms: dict, lc: LossConfig) -> torch.Tensor:
    """The training objective: head losses times their weights (entropy, border, contact when present)."""
    total = (lc.seg_weight * terms["seg"] + lc.dice_weight * terms["dice"] + lc.cls_weight * terms["cls"]
             + lc.scale_weight * terms["scale"])
    if "entropy" in terms:
        total = total + lc.entropy_weight * terms["entropy"]
    if "border" in terms:
        total = total + lc.border_weight * terms["border"] + lc.contact_weight * terms["contact"]
    return total


def soft_label_loss(out: dict, target: torch.Tensor, ignore: torch.Tensor, lc: LossConfig):
    """Self-training loss against soft labels: KL divergence on the segmentation and dice heads.

    Soft labels carry no instances, so the instance head gets no loss from them.
    """
    size = target.shape[-2:]
    valid = 1.0 - ignore.float()
    seg = upsample_to(out[SEG], size)
    terms = {
        "soft_seg": sample_mean(kl_loss_map(seg, target), valid).mean(),
        "soft_dice": sample_mean(bernoulli_kl_map(upsample_to(out[DICE], size), target), valid).mean(),
    }
    total = lc.seg_weight * terms["soft_seg"] + lc.dice_weight * terms["soft_dice"]
    if lc.entropy_weight:
        terms["soft_entropy"] = sample_mean(entropy_map(seg), ignore.float()).mean()
        total = total + lc.entropy_weight * terms["soft_entropy"]
    return total, terms

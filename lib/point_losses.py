"""The point detector's training loss (xView3 1st place, after CenterNet): one term per CircleNet head.

    objectness  penalty-reduced focal loss of CenterNet on the fixed-radius heatmap: at an object's
                cell (heatmap 1) -(1 - p)^alpha log p, elsewhere -(1 - h)^beta p^alpha log(1 - p); the
                sum over the batch divided by the number of objects (at least 1, so a chip without
                objects is penalised for its false positives only, finitely).
    vessel,     BCE with label smoothing (t -> t (1 - eps) + eps / 2, lib.losses.smooth_labels), weighted
    fishing     by the targets' per-cell weights (1 at the centre, falling to 0 at CLASS_RADIUS): the
                seed's trick that gives the classifiers ~40x more samples than the centre cell alone.
    entropy     Shannon entropy (nats) of the vessel and fishing probabilities, weighted by the
                `*_unknown` maps where the label is unknown: minimising it pushes those predictions to
                0 or 1 (the seed's self-supervision for missing labels). One term for both classifiers.
    length      MSE in input pixels, weighted by the length weights (0 where the length is unknown).
    offset      squared distance (dy^2 + dx^2, output cells) between predicted and true offsets,
                weighted by the offset weights.

Every cell is also weighted by `valid` (nodata cells count nowhere); NaN targets (unknown) are read
as 0, so they must have weight 0. A weighted term is its weighted sum divided by its weight sum
(clamped at 1e-6), so a batch without any weight gives 0, not NaN. The terms are the unweighted values
above; the total is sum(weight x term), computed in float32 whatever autocast is active (the heads may
come in bfloat16/float16). A loss weight of 0 keeps its term in the graph with exactly zero gradient,
so every head's parameters still take part (as DDP requires).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lib.losses import entropy_map, smooth_labels
from lib.point_contract import (
    FISHING,
    LENGTH,
    OBJECTNESS,
    OFFSET,
    T_FISHING,
    T_FISHING_UNKNOWN,
    T_FISHING_W,
    T_HEATMAP,
    T_LENGTH,
    T_LENGTH_W,
    T_OFFSET,
    T_OFFSET_W,
    T_VALID,
    T_VESSEL,
    T_VESSEL_UNKNOWN,
    T_VESSEL_W,
    VESSEL,
)

TERMS = ("objectness", "vessel", "fishing", "entropy", "length", "offset")
WEIGHT_EPS = 1e-6  # smallest weight sum a weighted mean divides by


def weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum(values x weights) / max(sum(weights), WEIGHT_EPS) over the whole batch (weights broadcast)."""
    weights = weights.expand_as(values)
    return (values * weights).sum() / weights.sum().clamp_min(WEIGHT_EPS)


def reduced_focal_loss(logits: torch.Tensor, heatmap: torch.Tensor, valid: torch.Tensor,
                       alpha: float = 2.0, beta: float = 4.0) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss of objectness logits against a heatmap, per object.

    Object cells are those where the heatmap is 1 (to float rounding); log-sigmoids keep the logs
    finite for confident logits.
    """
    p = torch.sigmoid(logits)
    pos = (heatmap >= 1.0 - 1e-6).to(logits.dtype) * valid
    neg = (1.0 - pos) * valid
    pos_loss = -(1.0 - p).pow(alpha) * F.logsigmoid(logits) * pos
    neg_loss = -(1.0 - heatmap).pow(beta) * p.pow(alpha) * F.logsigmoid(-logits) * neg
    return (pos_loss.sum() + neg_loss.sum()) / pos.sum().clamp_min(1.0)


def bernoulli_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-element entropy (nats) of sigmoid(logits), any shape: the 2-class entropy of the logits [0, z]."""
    return entropy_map(torch.stack([torch.zeros_like(logits), logits], dim=1))


class PointLoss:
    """Loss weights and shape parameters; `loss(outputs, targets) -> (total, {term: tensor})` (see module doc).

    `outputs` are CircleNet's heads (lib.point_contract.HEADS), `targets` the T_* maps of
    lib.point_targets batched to [N, C, H/2, W/2]; both at the same resolution. The weights are the
    seed's (length 0.1, offset 0.001, smoothing 0.05); it gives none for the entropy term, and 0.1
    keeps it well below the classifiers' BCE (at most ln 2 = 0.69 per cell).
    """

    def __init__(self, objectness: float = 1.0, vessel: float = 1.0, fishing: float = 1.0, entropy: float = 0.1,
                 length: float = 0.1, offset: float = 0.001, label_smoothing: float = 0.05,
                 focal_alpha: float = 2.0, focal_beta: float = 4.0):
        self.weights = {"objectness": float(objectness), "vessel": float(vessel), "fishing": float(fishing),
                        "entropy": float(entropy), "length": float(length), "offset": float(offset)}
        self.label_smoothing = float(label_smoothing)
        self.focal_alpha, self.focal_beta = float(focal_alpha), float(focal_beta)

    def __call__(self, outputs: dict, targets: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        heat = targets[T_HEATMAP]
        if tuple(outputs[OBJECTNESS].shape[-2:]) != tuple(heat.shape[-2:]):
            raise ValueError(f"heads at {tuple(outputs[OBJECTNESS].shape[-2:])} but targets at "
                             f"{tuple(heat.shape[-2:])}: both must be at the output stride")
        with torch.autocast(device_type=heat.device.type, enabled=False):
            out = {k: v.float() for k, v in outputs.items()}
            t = {k: torch.nan_to_num(v.float()) for k, v in targets.items()}  # NaN = unknown, weight 0
            terms = self.terms(out, t)
            total = sum(self.weights[name] * terms[name] for name in TERMS)
        return total, terms

    def terms(self, out: dict, t: dict) -> dict[str, torch.Tensor]:
        """The unweighted terms from float32 heads and targets."""
        valid = t[T_VALID]
        terms = {"objectness": reduced_focal_loss(out[OBJECTNESS], t[T_HEATMAP], valid,
                                                  self.focal_alpha, self.focal_beta)}
        for head, target, weight in ((VESSEL, T_VESSEL, T_VESSEL_W), (FISHING, T_FISHING, T_FISHING_W)):
            bce = F.binary_cross_entropy_with_logits(out[head], smooth_labels(t[target], self.label_smoothing),
                                                     reduction="none")
            terms[head] = weighted_mean(bce, t[weight] * valid)
        unknown = torch.cat([t[T_VESSEL_UNKNOWN], t[T_FISHING_UNKNOWN]], 1) * valid
        terms["entropy"] = weighted_mean(bernoulli_entropy(torch.cat([out[VESSEL], out[FISHING]], 1)), unknown)
        terms["length"] = weighted_mean(F.mse_loss(out[LENGTH], t[T_LENGTH], reduction="none"),
                                        t[T_LENGTH_W] * valid)
        squared = F.mse_loss(out[OFFSET], t[T_OFFSET], reduction="none").sum(1, keepdim=True)
        terms["offset"] = weighted_mean(squared, t[T_OFFSET_W] * valid)
        return terms

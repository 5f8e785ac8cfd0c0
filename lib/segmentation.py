"""The building-segmentation task as the tiling engine sees it: which named maps and scores its models give.

The engine is task-neutral: it tiles, batches, un-transforms, blends and hands out named maps. What a
model's raw outputs mean lives here, in a small decoder object, so another task (e.g. point detection
with heatmaps) plugs in its own decoder and its own sink without touching the tiler.

A decoder has `maps` (names of per-pixel maps, blended across windows) and `scores` (names of
per-window values, averaged over passes and reduced to their maximum over the scene), a `__call__`
that turns a model's output into `[N, len(maps), h, w]` and `[N, len(scores)]` float tensors (NaN
scores for models without that output), and `agreement(ref, low)`, the share of the reference result
that a reduced-precision run reproduces (used by `precision=auto`). Optional: `prepare_input(t)` turns
the windows [N, C, H, W] as the source read them into model input (default: ImageNet normalisation of
uint8 RGB), and `vectors`, pairs of map names (dy, dx) holding displacements, whose signs and order
the engine restores after flip/transpose TTA.

With the instance head (`SegmentationDecoder(instance=True)`, models whose output has
lib.model_contract's INSTANCE logits) the maps are (BUILDING, BORDER, CONTACT): the border and
contact probabilities are blended and TTA-averaged like the building probability, and seeds +
watershed (lib.instances) split touching buildings at inference.
"""

from __future__ import annotations

import torch

from lib.model_contract import CLS, INSTANCE, SEG

BUILDING = "building"  # map: building probability 0..1
BORDER = "border"  # map (instance head): probability of a building pixel next to another building / background
CONTACT = "contact"  # map (instance head): probability of a background pixel between two buildings
BUILDING_PRESENT = "building_present"  # score: the classification head's building-present probability
MASK_THRESHOLD = 0.5  # the threshold at which reduced precision must reproduce fp32's masks


class SegmentationDecoder:
    """Building probability (softmax of the 2-class SEG head) and building-present probability (CLS);
    with `instance`, also border and contact probabilities (sigmoid of the INSTANCE head's 2 channels)."""

    scores = (BUILDING_PRESENT,)

    def __init__(self, instance: bool = False):
        self.instance = bool(instance)
        self.maps = (BUILDING, BORDER, CONTACT) if self.instance else (BUILDING,)

    def __call__(self, out, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        seg = out[SEG] if isinstance(out, dict) else out
        seg = seg.float()
        prob = torch.softmax(seg, 1)[:, 1] if seg.shape[1] >= 2 else torch.sigmoid(seg[:, 0])
        cls = out.get(CLS) if isinstance(out, dict) else None
        cls_prob = (torch.softmax(cls.float(), 1)[:, 1] if cls is not None
                    else torch.full((n,), float("nan"), device=device))
        maps = prob[:, None]
        if self.instance:
            maps = torch.cat([maps, torch.sigmoid(out[INSTANCE].float()[:, :2])], 1)
        return maps, cls_prob[:, None]

    def agreement(self, ref: torch.Tensor, low: torch.Tensor) -> float:
        """Share of pixels whose mask (building probability >= 0.5) is the same in both results."""
        ref, low = ref[:, :1], low[:, :1]
        return ((ref >= MASK_THRESHOLD) == (low >= MASK_THRESHOLD)).float().mean().item()


def has_instance_head(model) -> bool:
    """Whether a model gives INSTANCE logits: an exported graph by its heads, a torch model by its
    config's `instance_head` or, for a module without such a config, by the keys of a tiny dry run."""
    heads = getattr(model, "heads", None)
    if heads is not None or (getattr(model, "config", None) or {}).get("exported"):
        return INSTANCE in [h[1] for h in heads or []]
    config = getattr(model, "config", None) or {}
    if "instance_head" in config or "model_name" in config:  # model.py's configs name the head only when on
        return bool(config.get("instance_head"))
    try:
        param = next(model.parameters())
    except (StopIteration, AttributeError, TypeError):
        return False
    x = torch.zeros((1, int(config.get("in_channels", 3)), 64, 64), device=param.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        model.train(was_training)
    return isinstance(out, dict) and INSTANCE in out

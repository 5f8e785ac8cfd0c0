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
"""

from __future__ import annotations

import torch

from lib.model_contract import CLS, SEG

BUILDING = "building"  # map: building probability 0..1
BUILDING_PRESENT = "building_present"  # score: the classification head's building-present probability
MASK_THRESHOLD = 0.5  # the threshold at which reduced precision must reproduce fp32's masks


class SegmentationDecoder:
    """Building probability (softmax of the 2-class SEG head) and building-present probability (CLS)."""

    maps = (BUILDING,)
    scores = (BUILDING_PRESENT,)

    def __call__(self, out, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        seg = out[SEG] if isinstance(out, dict) else out
        seg = seg.float()
        prob = torch.softmax(seg, 1)[:, 1] if seg.shape[1] >= 2 else torch.sigmoid(seg[:, 0])
        cls = out.get(CLS) if isinstance(out, dict) else None
        cls_prob = (torch.softmax(cls.float(), 1)[:, 1] if cls is not None
                    else torch.full((n,), float("nan"), device=device))
        return prob[:, None], cls_prob[:, None]

    def agreement(self, ref: torch.Tensor, low: torch.Tensor) -> float:
        """Share of pixels whose mask (probability >= 0.5) is the same in both results."""
        return ((ref >= MASK_THRESHOLD) == (low >= MASK_THRESHOLD)).float().mean().item()

"""Test-time augmentation: the eight dihedral transforms of a tile, each undone exactly.

The tiling engine and the exported TTA ensemble both go through these functions, so a transform means
the same thing in `inference.py tta=[...]`, in an exported graph and in the original pipeline's
one-transform-per-run keys (`flip`, `transpose`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lib.errors import UserError

# `transpose_*` = transpose first, then flip (the original pipeline's `flip=3 transpose=True`).
TTA_NAMES = ("none", "hflip", "vflip", "hvflip", "transpose", "transpose_hflip", "transpose_vflip",
             "transpose_hvflip")
# The original pipeline's `flip` key: the tensor dimensions it flipped (2 = height, 3 = width).
_SEED_FLIPS = {0: "none", 2: "vflip", 3: "hflip", 23: "hvflip", 32: "hvflip"}


def seed_tta_name(flip: int | str = 0, transpose: bool = False) -> str:
    """Name of the TTA that the original pipeline's `flip` (0|2|3|23) and `transpose` keys select."""
    try:
        name = _SEED_FLIPS[int(flip)]
    except (KeyError, ValueError):
        raise UserError(f"flip={flip}: must be 0, 2 (vertical), 3 (horizontal) or 23 (both)") from None
    if transpose:
        return "transpose" if name == "none" else f"transpose_{name}"
    return name


def parse_tta(tta: Sequence[str] | str | None, flip: int | str = 0, transpose: bool = False) -> list[str]:
    """Validated list of TTA names without repeats; without `tta` the seed keys select one transform."""
    if tta is None:
        return [seed_tta_name(flip, transpose)]
    names = [tta] if isinstance(tta, str) else list(tta)
    for name in names:
        if name not in TTA_NAMES:
            raise UserError(f"tta={name}: unknown transform; choose from {', '.join(TTA_NAMES)}")
    if not names:
        raise UserError("tta=[]: give at least one transform, e.g. tta=[none]")
    return list(dict.fromkeys(names))


def tta_forward(x: torch.Tensor, name: str) -> torch.Tensor:
    """Apply a TTA transform to the last two (H, W) dimensions."""
    if name.startswith("transpose"):
        x = x.transpose(-2, -1)
        name = name[len("transpose"):].lstrip("_") or "none"
    if name == "hflip":
        return x.flip(-1)
    if name == "vflip":
        return x.flip(-2)
    if name == "hvflip":
        return x.flip(-2, -1)
    return x


def tta_inverse(y: torch.Tensor, name: str) -> torch.Tensor:
    """Undo `tta_forward(., name)` on a prediction (flips are self-inverse; transpose comes last)."""
    flip = name[len("transpose"):].lstrip("_") if name.startswith("transpose") else name
    y = tta_forward(y, flip or "none")
    return y.transpose(-2, -1) if name.startswith("transpose") else y


def tta_inverse_vectors(y: torch.Tensor, name: str, pairs: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Undo the transform on displacement maps too: channels (dy, dx) of each pair in `y` [N, C, H, W],
    already moved back to the original grid by `tta_inverse`, get their signs and order back.

    A displacement seen in the transformed frame had its x negated by hflip, its y by vflip and its
    components swapped by a transpose (applied first, so undone last).
    """
    if not pairs or name == "none":
        return y
    flip = name[len("transpose"):].lstrip("_") if name.startswith("transpose") else name
    y = y.clone()
    for iy, ix in pairs:
        if flip in ("hflip", "hvflip"):
            y[:, ix] = -y[:, ix]
        if flip in ("vflip", "hvflip"):
            y[:, iy] = -y[:, iy]
        if name.startswith("transpose"):
            y[:, [iy, ix]] = y[:, [ix, iy]]
    return y

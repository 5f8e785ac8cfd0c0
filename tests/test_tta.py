"""lib/tta.py: the eight dihedral transforms, their exact inverses and the seed's flip/transpose keys."""

import pytest
import torch

from lib.errors import UserError
from lib.tta import TTA_NAMES, parse_tta, seed_tta_name, tta_forward, tta_inverse


@pytest.mark.parametrize("name", TTA_NAMES)
def test_every_tta_transform_inverts_exactly(name):
    x = torch.arange(2 * 3 * 5 * 7, dtype=torch.float32).reshape(2, 3, 5, 7)  # non-square
    y = tta_forward(x, name)
    assert torch.equal(tta_inverse(y, name), x)
    assert (y.shape[-2:] == (7, 5)) == name.startswith("transpose")


def test_tta_transforms_are_the_eight_distinct_symmetries_of_a_tile():
    x = torch.arange(36, dtype=torch.float32).reshape(1, 1, 6, 6)
    outs = {tuple(tta_forward(x, n).flatten().tolist()) for n in TTA_NAMES}
    assert len(outs) == len(TTA_NAMES) == 8


def test_seed_flip_and_transpose_keys_select_the_matching_transforms():
    assert seed_tta_name(0, False) == "none"
    assert seed_tta_name(3, False) == "hflip"  # dim 3 = width
    assert seed_tta_name(2, False) == "vflip"
    assert seed_tta_name(23, False) == "hvflip"
    assert seed_tta_name(0, True) == "transpose"
    assert seed_tta_name(3, True) == "transpose_hflip"
    x = torch.rand(1, 3, 8, 8)
    assert torch.equal(tta_forward(x, "hflip"), x.flip(3))
    assert torch.equal(tta_forward(x, "transpose_hflip"), x.transpose(2, 3).flip(3))
    with pytest.raises(UserError, match="flip=5"):
        seed_tta_name(5)


def test_parse_tta_drops_repeats_and_refuses_unknown_or_empty_lists():
    assert parse_tta(["hflip", "none", "hflip"]) == ["hflip", "none"]
    assert parse_tta("vflip") == ["vflip"]
    assert parse_tta(None, flip=23, transpose=True) == ["transpose_hvflip"]
    with pytest.raises(UserError, match="unknown transform"):
        parse_tta(["rot45"])
    with pytest.raises(UserError, match="at least one"):
        parse_tta([])


def _displacement_to_peak(x: torch.Tensor) -> torch.Tensor:
    """A 'model' whose maps are (dy, dx) from every pixel to the brightest pixel of its input."""
    n, _, h, w = x.shape
    flat = x[:, 0].reshape(n, -1).argmax(1)
    py, px = (flat // w).float(), (flat % w).float()
    yy, xx = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    return torch.stack([py[:, None, None] - yy, px[:, None, None] - xx], 1)


@pytest.mark.parametrize("name", TTA_NAMES)
def test_displacement_maps_come_back_with_their_signs(name):
    from lib.tta import tta_inverse_vectors
    x = torch.zeros(1, 1, 6, 9)
    x[0, 0, 1, 7] = 1.0
    ref = _displacement_to_peak(x)
    seen = _displacement_to_peak(tta_forward(x, name))
    back = tta_inverse_vectors(tta_inverse(seen, name), name, [(0, 1)])
    assert torch.equal(back, ref)

"""What every segmentation model takes and gives: input normalisation and the names of its outputs.

Data loading, training, the tiling engine and export all go through these names, so a model (the seed's
FPN, an exported graph, a future task's network) plugs in by honouring this contract alone.
"""

from __future__ import annotations

import torch

from lib.errors import UserError

SEG = "seg"  # [N, 2, H/4, W/4] logits; softmax(...)[:, 1] is the building probability
DICE = "dice"  # [N, 1, H/4, W/4] logits trained with the dice loss
CLS = "cls"  # [N, 2] building-present logits (used for negative mining)
SCALE = "scale"  # [N, 1] scale regression
OUTPUT_KEYS = (SEG, DICE, CLS, SCALE)  # what every segmentation model returns (the seed's four heads)
# Optional, only from models built with instance_head=True: [N, 2, H/4, W/4] logits, channel 0 = border of a
# building, 1 = contact zone between buildings (sigmoid = probability). Not in OUTPUT_KEYS: seed and older
# checkpoints lack it and stay valid models.
INSTANCE = "instance"
INSTANCE_CHANNELS = ("border", "contact")

STRIDE = 32  # input height and width must be multiples of this
OUTPUT_STRIDE = 4  # segmentation maps are 1/4 of the input size

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalization(channels: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of 0..1 images: ImageNet's for RGB, and for channels beyond
    RGB the mean of the RGB statistics. `normalize` uses them; a graph that normalises its own input
    (lib.openvino_backend) is built with them."""
    mean = list(IMAGENET_MEAN[:channels]) + [sum(IMAGENET_MEAN) / 3] * max(0, channels - 3)
    std = list(IMAGENET_STD[:channels]) + [sum(IMAGENET_STD) / 3] * max(0, channels - 3)
    return mean, std


def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 (or 0..255 float) images [N,C,H,W] or [C,H,W] -> float32 ImageNet-normalised input.

    Every caller (training data, inference, export) goes through it, so the model always sees what the
    pretrained encoder expects. Channels beyond RGB are normalised with the mean of the RGB statistics.
    """
    mean, std = normalization(x.shape[-3])
    shape = (len(mean), 1, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=x.device).view(shape) * 255.0
    std_t = torch.tensor(std, dtype=torch.float32, device=x.device).view(shape) * 255.0
    return (x.float() - mean_t) / std_t


def model_input(model, images: torch.Tensor) -> torch.Tensor:
    """uint8 images [N, C, H, W] -> what `model` takes: themselves when it normalises its own input
    (`uint8_input`; a quarter of the bytes to flip for TTA, batch and copy into the graph), else
    `normalize(images)`."""
    if getattr(model, "uint8_input", False):
        if images.dtype != torch.uint8:
            raise ValueError(f"this model takes uint8 images (it normalises them itself), not {images.dtype}")
        return images
    return normalize(images)


def check_input_multiple(name: str, value: int) -> int:
    """Model input sides (width=, tile sizes) must be positive multiples of STRIDE; say so in one line."""
    value = int(value)
    if value <= 0 or value % STRIDE:
        raise UserError(f"{name}={value}: must be a positive multiple of {STRIDE} (e.g. 256, 512, 672, 1024)")
    return value


class InputSizeError(UserError, ValueError):
    """An input whose height or width is not a multiple of STRIDE (callers that tile should pad)."""


def check_input_size(x: torch.Tensor) -> None:
    """Reject inputs the encoder cannot reduce 32x exactly (the FPN's top-down adds would misalign)."""
    h, w = x.shape[-2:]
    if h % STRIDE or w % STRIDE:
        up = [-(-int(v) // STRIDE) * STRIDE for v in (h, w)]
        raise InputSizeError(
            f"input of {h}x{w} pixels: height and width must be multiples of {STRIDE}; "
            f"pad it to {up[0]}x{up[1]} or choose a tile width that is a multiple of {STRIDE}"
        )

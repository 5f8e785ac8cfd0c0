"""CircleNet, the point detector of the xView3 1st-place system: EfficientNet -> U-Net to stride 2 -> heads.

A single-stage detector for objects of a few pixels lying close together (vessels in 10 m SAR,
building centroids): every output cell of the stride-2 map says whether an object's centre lies in
it, where exactly (offset), how long the object is and what it is (see lib.point_contract).

    encoder   model.py's EfficientNetEncoder (efficientnet-pytorch b0-b8/l2, stem adapted to
              `in_channels`, default 2: VV, VH), read at the last block of each stride 2, 4, 8, 16, 32.
              Swish after the stem, the activation the ImageNet weights were trained with (the
              segmentation model's Mish there is the Open Cities pipeline's choice, kept for its
              published checkpoints); the 1x1 head conv is dropped, nothing here uses it.
    decoder   U-Net: from stride 32, per step x2 upsampling, concatenation with the encoder feature
              of that stride and two 3x3 conv-BN-ReLU (BatchNorm, so SyncBN applies under DDP). The
              steps to strides 16, 8 and 4 upsample by nearest neighbour; the last, to stride 2, by
              PixelShuffle (a 1x1 conv to 4x the channels, ICNR-initialised so it starts as nearest
              upsampling): at the output resolution neighbouring cells must be able to differ, which
              a learned sub-pixel upsampling allows before the stride-2 skip is added.
    heads     decoupled, one branch per output (objectness, length, offset, vessel, fishing), each
              3x3 conv-GroupNorm-ReLU then a 1x1 conv, at stride 2. GroupNorm keeps the heads
              independent of the batch size. The objectness bias starts at -2.19 (CenterNet's prior
              of 0.1), so the focal loss does not begin with every cell predicting an object.

The network describes itself: `.config` (from `circlenet_config`, with "arch": "circlenet" and "task":
"points") is stored in checkpoints by lib.checkpoints.save_checkpoint, and importing this module
registers the rebuild with model.py, so `model.load_models` returns a CircleNet for such a checkpoint
with no architecture flags.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

import model as model_lib
from lib.errors import UserError
from lib.model_contract import check_input_size
from lib.point_contract import FISHING, LENGTH, OBJECTNESS, OFFSET, VESSEL

ARCH = "circlenet"
TASK = "points"
FEATURE_STRIDES = (2, 4, 8, 16, 32)
HEAD_OUTPUTS = {OBJECTNESS: 1, LENGTH: 1, OFFSET: 2, VESSEL: 1, FISHING: 1}  # channels of each head
OBJECTNESS_BIAS = -2.19  # CenterNet: log(0.1 / 0.9), an initial object probability of 0.1 per cell
GN_GROUPS = 8
CONFIG_KEYS = ("model_name", "in_channels", "decoder_channels", "head_channels", "drop_connect_rate")
STRUCTURAL_KEYS = ("model_name", "in_channels")  # overrides that must agree with a checkpoint


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------


def circlenet_config(model_name: str = "efficientnet-b4", in_channels: int = 2,
                     decoder_channels: Sequence[int] = (256, 128, 64, 32), head_channels: int = 32,
                     drop_connect_rate: float = 0.2) -> dict:
    """The validated architecture of a CircleNet as plain data, stored in its checkpoints.

    `decoder_channels` are the widths after the steps to strides 16, 8, 4 and 2; `head_channels` is
    the width of each head branch (a multiple of GN_GROUPS). b4 is the seed's smallest encoder.
    """
    model_lib.encoder_layout(str(model_name))  # one-line error for an unknown encoder
    if int(in_channels) < 1:
        raise UserError(f"in_channels={in_channels}: must be at least 1")
    decoder = [int(c) for c in decoder_channels]
    if len(decoder) != len(FEATURE_STRIDES) - 1 or min(decoder) < 1:
        raise UserError(f"decoder_channels={list(decoder_channels)}: give 4 positive widths "
                        "(after the steps to strides 16, 8, 4 and 2), e.g. [256, 128, 64, 32]")
    if int(head_channels) < GN_GROUPS or int(head_channels) % GN_GROUPS:
        raise UserError(f"head_channels={head_channels}: must be a positive multiple of {GN_GROUPS} (GroupNorm groups)")
    if not 0.0 <= float(drop_connect_rate) < 1.0:
        raise UserError(f"drop_connect_rate={drop_connect_rate}: must be in [0, 1)")
    return {"arch": ARCH, "task": TASK, "model_name": str(model_name), "in_channels": int(in_channels),
            "decoder_channels": decoder, "head_channels": int(head_channels),
            "drop_connect_rate": float(drop_connect_rate)}


def build_circlenet(config: dict | None = None, *, pretrained: bool = False, **kwargs) -> CircleNet:
    """A CircleNet from a stored config dict (a checkpoint's) or from `circlenet_config` keyword arguments."""
    if config is not None and kwargs:
        raise TypeError("build_circlenet(): give a config dict or keyword arguments, not both")
    given = dict(config if config is not None else kwargs)
    arch = given.pop("arch", ARCH)
    given.pop("task", None)
    if arch != ARCH:
        raise UserError(f"arch={arch}: not a CircleNet config")
    unknown = sorted(set(given) - set(CONFIG_KEYS))
    if unknown:
        raise UserError(f"unknown CircleNet option(s) {', '.join(unknown)}; known: {', '.join(CONFIG_KEYS)}")
    return CircleNet(circlenet_config(**given), pretrained=pretrained)


# ----------------------------------------------------------------------------------------------
# Encoder
# ----------------------------------------------------------------------------------------------


class UNetEncoder(model_lib.EfficientNetEncoder):
    """The EfficientNet trunk read at the last block of each stride 2..32 (see the module docstring)."""

    def __init__(self, model_name: str, in_channels: int, pretrained: bool, drop_connect_rate: float):
        super().__init__(model_name, in_channels, pretrained, drop_connect_rate)
        del self._conv_head, self._bn1  # unused here; unused parameters would also trouble DDP
        layout = model_lib.encoder_layout(model_name)
        last = {s: i for i, s in enumerate(layout["block_strides"])}
        self.feature_indices = [last[s] for s in FEATURE_STRIDES]
        self.out_channels = [layout["block_channels"][i] for i in self.feature_indices]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Features at strides 2, 4, 8, 16 and 32."""
        x = F.silu(self._bn0(self._conv_stem(x)))
        features = []
        for idx, block in enumerate(self._blocks):
            x = block(x, drop_connect_rate=self.drop_connect[idx])
            if idx in self.feature_indices:
                features.append(x)
        return features


# ----------------------------------------------------------------------------------------------
# Decoder and heads
# ----------------------------------------------------------------------------------------------


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class PixelShuffleUp(nn.Module):
    """x2 sub-pixel upsampling: 1x1 conv to 4x channels, PixelShuffle; ICNR init = nearest upsampling at start."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels * 4, 1)
        with torch.no_grad():  # ICNR: the four sub-pixels of each output channel share one filter
            self.conv.weight.copy_(self.conv.weight[:channels].repeat_interleave(4, dim=0))
            self.conv.bias.copy_(self.conv.bias[:channels].repeat_interleave(4))
        self.shuffle = nn.PixelShuffle(2)

    def forward(self, x):
        return self.shuffle(self.conv(x))


class UNetBlock(nn.Module):
    """Upsample x2, concatenate the skip feature, two 3x3 conv-BN-ReLU."""

    def __init__(self, cin: int, skip: int, cout: int, pixel_shuffle: bool = False):
        super().__init__()
        self.up = PixelShuffleUp(cin) if pixel_shuffle else None
        self.convs = nn.Sequential(*_conv_bn_relu(cin + skip, cout), *_conv_bn_relu(cout, cout))

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x) if self.up is not None else F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.convs(torch.cat([x, skip], 1))


class UNetDecoder(nn.Module):
    """Encoder features at strides 2..32 -> one map at stride 2 with `channels[-1]` channels."""

    def __init__(self, encoder_channels: Sequence[int], channels: Sequence[int]):
        super().__init__()
        *skips, deepest = encoder_channels
        cins = [deepest, *channels[:-1]]
        skips = list(reversed(skips))  # strides 16, 8, 4, 2
        self.blocks = nn.ModuleList(
            UNetBlock(cin, skip, cout, pixel_shuffle=(i == len(channels) - 1))
            for i, (cin, skip, cout) in enumerate(zip(cins, skips, channels)))

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        *skips, x = features
        for block, skip in zip(self.blocks, reversed(skips)):
            x = block(x, skip)
        return x


class Head(nn.Module):
    """One decoupled output branch: 3x3 conv-GroupNorm-ReLU, 1x1 conv to the output's channels."""

    def __init__(self, cin: int, channels: int, outputs: int, bias: float = 0.0):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(cin, channels, 3, padding=1, bias=False),
                                  nn.GroupNorm(GN_GROUPS, channels), nn.ReLU(inplace=True))
        self.out = nn.Conv2d(channels, outputs, 1)
        nn.init.constant_(self.out.bias, bias)

    def forward(self, x):
        return self.out(self.body(x))


class CircleNet(nn.Module):
    """EfficientNet -> U-Net -> decoupled heads; `forward(x)` returns the point_contract.HEADS at stride 2."""

    def __init__(self, config: dict, pretrained: bool = False):
        super().__init__()
        self.config = dict(config)
        self.meta: dict = {}
        self.encoder = UNetEncoder(config["model_name"], config["in_channels"], pretrained,
                                   config["drop_connect_rate"])
        self.decoder = UNetDecoder(self.encoder.out_channels, config["decoder_channels"])
        width = config["decoder_channels"][-1]
        self.heads = nn.ModuleDict({
            name: Head(width, config["head_channels"], n, OBJECTNESS_BIAS if name == OBJECTNESS else 0.0)
            for name, n in HEAD_OUTPUTS.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Inputs [N, in_channels, H, W] (SAR: uint8 / 255; H, W multiples of 32) -> {head: [N, C, H/2, W/2]}."""
        if not torch.jit.is_tracing():
            check_input_size(x)
        y = self.decoder(self.encoder(x))
        return {name: head(y) for name, head in self.heads.items()}


# ----------------------------------------------------------------------------------------------
# Loading (through model.load_model / load_models)
# ----------------------------------------------------------------------------------------------


def from_checkpoint(ckpt, path, overrides: dict) -> CircleNet:
    """model.load_model's loader for a CircleNet checkpoint (a lib.checkpoints.Checkpoint), in eval mode.

    The stored config rebuilds the network; `model_name`/`in_channels` may be given only when they agree
    with it, `drop_connect_rate` replaces the stored one (fine-tuning), and the segmentation model's
    options do not apply. Weights go through model.py's strict loader (one line per mismatch).
    """
    config = dict(ckpt.model_config)
    foreign = [k for k in overrides if k not in CONFIG_KEYS]
    if foreign:
        given = ", ".join(f"{k}={overrides[k]}" for k in foreign)
        raise UserError(f"{path}: {given} does not apply to a CircleNet checkpoint; drop it")
    mismatch = [k for k in STRUCTURAL_KEYS if k in overrides and model_lib._differs(overrides[k], config.get(k))]
    if mismatch:
        given = ", ".join(f"{k}={overrides[k]}" for k in mismatch)
        found = ", ".join(f"{k}={config.get(k)}" for k in mismatch)
        raise UserError(f"{path}: {given} does not match the checkpoint ({found} from its config); "
                        "drop these overrides, the checkpoint describes its architecture")
    if "drop_connect_rate" in overrides:
        config["drop_connect_rate"] = float(overrides["drop_connect_rate"])
    try:
        net = build_circlenet(config, pretrained=False)
    except UserError as err:
        raise UserError(f"{path}: stored CircleNet config is invalid ({err})") from None
    model_lib._load_weights(net, ckpt.state_dict, path)
    net.meta = ckpt.model_meta(ARCH)
    return net.eval()


model_lib.ARCHITECTURES[ARCH] = from_checkpoint

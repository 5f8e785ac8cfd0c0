"""The FPN decoder's building blocks (model.FPNDecoder wires them): the upsampling step, the GCNet
context block and ASPP, each laid out as in the original pipeline so its checkpoints' names and weights fit."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ASPP_RATES = (4, 8, 12)


class Dropout(nn.Dropout):
    """nn.Dropout whose CPU training mask comes from `torch.rand_like`: the same function (each element kept
    with probability 1 - p, scaled by 1 / (1 - p)) about 1.7x faster forward + backward on a 2-core CPU.

    PyTorch's CPU dropout draws its mask with `bernoulli_`, which took 58 ms for the decoder's [8, 192, 64, 64]
    tensor (b0 at 256 px, batch 8) against 22 ms for a uniform draw and a comparison: about 2.5 % of a b0 fp32
    training step, which has two such dropouts. Elsewhere (CUDA's fused kernel, eval, p = 0) it is nn.Dropout.
    A module without parameters, so checkpoints and state_dict names are unchanged.
    """

    def forward(self, x):
        if not self.training or self.p == 0 or x.device.type != "cpu" or self.inplace:
            return super().forward(x)
        if self.p == 1:
            return x * 0.0
        keep = torch.rand_like(x, dtype=torch.float32) >= self.p  # float32 draws: exact p under bf16 autocast too
        return x * keep * (1.0 / (1.0 - self.p))


class ConvGNUp(nn.Module):
    """3x3 conv (no bias) -> GroupNorm(32) -> ReLU -> bilinear x2: one step toward stride 4.

    `norm=False` (decoder_norm=none): a 3x3 conv with bias -> ReLU, the plain FPN block of arch=light.
    """

    def __init__(self, channels: int, groups: int = 32, norm: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=not norm)
        self.gn = nn.GroupNorm(groups, channels) if norm else nn.Identity()

    def forward(self, x):
        x = F.relu(self.gn(self.conv(x)))
        return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)


class ContextBlock(nn.Module):
    """GCNet global context block (attention pooling, channel-add fusion)."""

    def __init__(self, channels: int, hidden: int = 8):
        super().__init__()
        self.conv_mask = nn.Conv2d(channels, 1, 1)
        self.channel_add_conv = nn.Sequential(
            nn.Conv2d(channels, hidden, 1),
            nn.LayerNorm([hidden, 1, 1]),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1),
        )
        nn.init.zeros_(self.channel_add_conv[-1].weight)  # starts as the identity, as in GCNet
        nn.init.zeros_(self.channel_add_conv[-1].bias)

    def forward(self, x):
        n, c = x.shape[:2]
        weights = torch.softmax(self.conv_mask(x).reshape(n, 1, -1), dim=2)  # [N, 1, HW]
        context = torch.bmm(x.reshape(n, c, -1), weights.transpose(1, 2)).reshape(n, c, 1, 1)
        return x + self.channel_add_conv(context)


def _conv_bn_relu(cin: int, cout: int, kernel: int = 1, dilation: int = 1) -> nn.Sequential:
    padding = dilation * (kernel // 2)
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1, three dilated 3x3 and an image-pooling branch, projected.

    The projection is applied without concatenating the branches: a 1x1 conv over a concatenation is
    the sum of 1x1 convs over its parts (the weight split by input channel), and the pooled branch,
    constant over the map, becomes a per-image bias. The same function (and the same gradients) up to
    float rounding, without the five-branch (960-channel, stride-4) tensor, the broadcast pooled map and
    their backward: on a 2-core CPU, b0 at 672 px ran about 5 % faster in OpenVINO fp32, and a b0
    training step at 256 px (channels_last) about 15 % faster in bf16. Under autocast the partial projections are summed
    in fp32, so the sum is rounded once, as the single convolution's output was. `concatenated` keeps
    the original form.
    """

    def __init__(self, channels: int, rates=ASPP_RATES, dropout: float = 0.1):
        super().__init__()
        self.convs = nn.ModuleList([_conv_bn_relu(channels, channels)])
        self.convs.extend(_conv_bn_relu(channels, channels, 3, r) for r in rates)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), *_conv_bn_relu(channels, channels))
        self.project = nn.Sequential(*_conv_bn_relu(channels * (len(rates) + 2), channels), Dropout(dropout))

    def forward(self, x):
        conv, *after = self.project  # 1x1 conv (no bias), BN, ReLU, dropout
        parts = conv.weight.split(x.shape[1], dim=1)
        y = F.conv2d(self.pool(x), parts[-1])  # [N, C, 1, 1]: broadcast over the map
        if y.dtype in (torch.bfloat16, torch.float16):  # autocast: accumulate the parts in fp32
            y = y.float()
        for branch, weight in zip(self.convs, parts[:-1]):
            y = y + F.conv2d(branch(x), weight)
        for layer in after:
            y = layer(y)
        return y

    def concatenated(self, x):
        """The original computation: the five branches concatenated, then projected (the seed loop's
        emulation in benchmarks/ runs this, the seed's code, not the module's faster form)."""
        pooled = self.pool(x).expand(-1, -1, x.shape[2], x.shape[3])
        return self.project(torch.cat([conv(x) for conv in self.convs] + [pooled], 1))

"""The segmentation network: EfficientNet encoder -> FPN decoder -> heads, and its checkpoints.

The architecture is the Open Cities AI Challenge 3rd-place `EfficientFPN`, numerically the same, so
the original pipeline's published checkpoints (`m40000.pth`, `ave.pth`, ...) load and give the same
outputs. The code is laid out the way segmentation_models_pytorch lays out a model: an encoder that
exposes its feature channels, a decoder that turns a list of features into one map, small heads, and
a model class that only wires them together.

    encoder   EfficientNet (efficientnet-pytorch); Mish after the stem and the head conv, as the
              original forward did; features after the last block at strides 4, 8, 16 and after the
              1x1 head conv (stride 32).
    decoder   lateral 1x1 convs to 64 ch, top-down nearest upsampling + add, three branches brought
              to stride 4 (conv-GroupNorm-ReLU-bilinear x2 blocks), concatenation (192 ch), dropout,
              optional GCNet context block, optional ASPP (rates 4/8/12), conv-BN-ReLU|Mish to 64 ch,
              optional tanh attention gate.
    heads     1x1 convs: 2-class segmentation logits (focal loss) and 1-ch dice logits at stride 4;
              linear building-present (2 logits) and scale-regression (1 value) heads on the pooled,
              dropped-out encoder head features. Optional (`instance_head`, not in the original):
              a 1x1 conv to border/contact logits (INSTANCE) on the same map as the segmentation head.

Reading and writing files is lib.checkpoints' job (every format, weights-only) and lib.exported's
(TorchScript/ONNX graphs); this module turns what they read into a network: `load_model` rebuilds one
from a checkpoint, inferring the architecture of the original pipeline's files from their parameter
names and shapes, and `load_models` opens any `model=<path>` a user can give.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lib.checkpoints import SEED_PREFIXES, exported_kind, from_seed_names, read_checkpoint, to_seed_names  # noqa: F401
from lib.decoder_blocks import ASPP, ContextBlock, ConvGNUp, Dropout
from lib.errors import UserError, one_line
from lib.exported import load_exported

# the model contract, re-exported for callers of the model
from lib.model_contract import (  # noqa: F401
    CLS,
    DICE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    INSTANCE,
    OUTPUT_KEYS,
    SCALE,
    SEG,
    STRIDE,
    check_input_size,
    normalize,
)

# ----------------------------------------------------------------------------------------------
# Model options
# ----------------------------------------------------------------------------------------------

MODEL_KEYS = ("model_name", "in_channels", "use_context_block", "use_mish", "use_attention", "use_ASPP",
              "drop_connect_rate")
# Architecture keys a user may give for an original checkpoint, where the weights cannot tell them
ARCH_OVERRIDES = ("model_name", "use_mish", "use_context_block", "use_attention")
DECODER_CHANNELS = 64
INSTANCE_HEAD = "instance_head"  # build/config key and parameter prefix of the optional border/contact head
DECODER_NORM = "decoder_norm"  # build/config key: groupnorm (the seed's, default) | none (arch=light)
DECODER_NORMS = ("groupnorm", "none")


# ----------------------------------------------------------------------------------------------
# Encoder
# ----------------------------------------------------------------------------------------------


def encoder_layout(model_name: str) -> dict:
    """Block count, per-block output channels/strides and head width of an EfficientNet, without weights.

    Used to pick the feature blocks and to recognise an encoder from a checkpoint's shapes.
    """
    from efficientnet_pytorch.model import VALID_MODELS
    from efficientnet_pytorch.utils import get_model_params, round_filters, round_repeats

    if model_name not in VALID_MODELS:
        raise UserError(f"model_name={model_name}: unknown encoder; use one of {', '.join(VALID_MODELS)}")
    blocks_args, gp = get_model_params(model_name, {})
    channels, strides, stride = [], [], 2
    for args in blocks_args:
        stride *= args.stride[0] if isinstance(args.stride, (list, tuple)) else args.stride
        n = round_repeats(args.num_repeat, gp)
        channels += [round_filters(args.output_filters, gp)] * n
        strides += [stride] * n
    return {
        "stem": round_filters(32, gp),
        "block_channels": channels,
        "block_strides": strides,
        "head": round_filters(1280, gp),
    }


def feature_blocks(layout: dict) -> list[int]:
    """Indices of the last block at strides 4, 8 and 16 (b1: outputs of 24, 40 and 112 channels)."""
    last = {}
    for idx, s in enumerate(layout["block_strides"]):
        last[s] = idx
    return [last[4], last[8], last[16]]


def adapt_stem_weight(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Reuse RGB stem filters for `in_channels` inputs, keeping the activation scale roughly unchanged.

    One channel gets the sum of the RGB filters (a grey image gives the RGB response); more than
    three reuse RGB and give extra channels the mean RGB filter, all scaled by 3 / in_channels.
    """
    if in_channels == 3:
        return weight
    if in_channels == 1:
        return weight.sum(1, keepdim=True)
    extra = weight.mean(1, keepdim=True).expand(-1, max(0, in_channels - 3), -1, -1)
    return torch.cat([weight[:, :in_channels], extra], 1) * (3.0 / in_channels)


class EfficientNetEncoder(nn.Module):
    """EfficientNet trunk with the original pipeline's forward: Mish after stem and head conv.

    efficientnet-pytorch's own forward uses Swish there, so the loop over blocks is written here. The
    blocks' internal Swish is kept (as nn.SiLU: same function, traceable, ONNX-exportable).
    Drop-connect: 0.2 for the first four blocks, `drop_connect_rate` after, scaled by depth.
    (The original also ran the b2 stem under `no_grad`, freezing it in training; that is not copied:
    it changes no output, and a trainable stem is what the other encoders had.)
    """

    def __init__(self, model_name: str, in_channels: int = 3, pretrained: bool = False,
                 drop_connect_rate: float = 0.2):
        super().__init__()
        net = _efficientnet(model_name, pretrained)
        self._conv_stem = net._conv_stem
        if in_channels != 3:
            self._conv_stem.weight = nn.Parameter(adapt_stem_weight(net._conv_stem.weight.detach(), in_channels))
            self._conv_stem.in_channels = in_channels
        self._bn0 = net._bn0
        self._blocks = net._blocks
        self._conv_head = net._conv_head
        self._bn1 = net._bn1
        for block in self._blocks:
            block._swish = nn.SiLU()
        layout = encoder_layout(model_name)
        self.feature_indices = feature_blocks(layout)
        self.out_channels = [layout["block_channels"][i] for i in self.feature_indices] + [layout["head"]]
        n = len(self._blocks)
        self.drop_connect = [(0.2 if idx < 4 else drop_connect_rate) * idx / n for idx in range(n)]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Features at strides 4, 8, 16 and 32 (the last one is the 1x1 head conv's output)."""
        x = F.mish(self._bn0(self._conv_stem(x)))
        features = []
        for idx, block in enumerate(self._blocks):
            x = block(x, drop_connect_rate=self.drop_connect[idx])
            if idx in self.feature_indices:
                features.append(x)
        features.append(F.mish(self._bn1(self._conv_head(x))))
        return features


def _efficientnet(model_name: str, pretrained: bool):
    """An efficientnet-pytorch model, with ImageNet weights when asked.

    Built with the library's per-model image size, which fixes each conv's static "same" padding; the
    original pipeline's checkpoints (and the reference vectors) depend on exactly that padding.
    """
    from efficientnet_pytorch import EfficientNet

    encoder_layout(model_name)  # validates the name with a one-line error
    if not pretrained:
        return EfficientNet.from_name(model_name)
    try:
        return EfficientNet.from_pretrained(model_name)
    except Exception as err:  # noqa: BLE001 - any download/cache failure means the same to the user
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(
            f"could not download ImageNet weights for {model_name} ({reason}); "
            "train from scratch with pretrained=false, or start from a checkpoint with model=<path>"
        ) from None


# ----------------------------------------------------------------------------------------------
# Decoder
# ----------------------------------------------------------------------------------------------


class FPNDecoder(nn.Module):
    """Features at strides 4/8/16/32 -> one 64-channel map at stride 4 (see the module docstring)."""

    def __init__(self, encoder_channels: list[int], channels: int = DECODER_CHANNELS, *,
                 use_context_block: bool = False, use_mish: bool = False, use_attention: bool = True,
                 use_ASPP: bool = True, context_hidden: int = 8, fuse_context: bool = False,
                 norm: bool = True):
        super().__init__()
        # deepest first, as the top-down pass consumes them
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in reversed(encoder_channels))
        self.branches = nn.ModuleList([
            nn.Sequential(ConvGNUp(channels, norm=norm), ConvGNUp(channels, norm=norm)),  # stride 16 -> 4
            nn.Sequential(ConvGNUp(channels, norm=norm)),  # stride 8 -> 4
            nn.Conv2d(channels, channels, 3, padding=1),  # stride 4
        ])
        merged = channels * len(self.branches)
        self.dropout = Dropout(0.2)
        self.context = ContextBlock(merged, context_hidden) if use_context_block else None
        self.aspp = ASPP(merged) if use_ASPP else None
        fuse = [nn.Conv2d(merged, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
                nn.Mish() if use_mish else nn.ReLU(inplace=True)]
        if fuse_context:  # layout of the original pipeline's non-b2 context models
            fuse.insert(0, ContextBlock(merged, 8))
        self.fuse = nn.Sequential(*fuse)
        self.attention = nn.Conv2d(channels, channels, 1, bias=False) if use_attention else None

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        deepest, *rest = reversed(features)
        top = self.lateral[0](deepest)
        pyramid = []
        for lateral, feature in zip(self.lateral[1:], rest):
            top = F.interpolate(top, scale_factor=2.0, mode="nearest") + lateral(feature)
            pyramid.append(top)  # strides 16, 8, 4
        x = torch.cat([branch(p) for branch, p in zip(self.branches, pyramid)], 1)
        x = self.dropout(x)
        if self.context is not None:
            x = self.context(x)
        if self.aspp is not None:
            x = self.aspp(x)
        x = self.fuse(x)
        if self.attention is not None:
            x = x * torch.tanh(self.attention(x))
        return x


# ----------------------------------------------------------------------------------------------
# Heads and the model
# ----------------------------------------------------------------------------------------------


class ImageHeads(nn.Module):
    """Building-present logits and scale regression from globally pooled encoder head features."""

    def __init__(self, channels: int, dropout: float = 0.2):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.cls = nn.Linear(channels, 2)
        self.scale = nn.Linear(channels, 1)

    def forward(self, x):
        x = self.dropout(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
        return self.cls(x), self.scale(x)


class EfficientFPN(nn.Module):
    """EfficientNet encoder -> FPN decoder -> heads; `forward(x)` returns {SEG, DICE, CLS, SCALE}."""

    def __init__(self, config: dict, pretrained: bool = False):
        super().__init__()
        self.config = dict(config)
        self.meta: dict = {}
        self.encoder = EfficientNetEncoder(config["model_name"], config["in_channels"], pretrained,
                                           config["drop_connect_rate"])
        self.decoder = FPNDecoder(
            self.encoder.out_channels,
            use_context_block=config["use_context_block"],
            use_mish=config["use_mish"],
            use_attention=config["use_attention"],
            use_ASPP=config["use_ASPP"],
            context_hidden=config.get("context_hidden", 8),
            fuse_context=config.get("fuse_context", False),
            norm=config.get(DECODER_NORM, "groupnorm") == "groupnorm",  # absent from older configs
        )
        self.seg_head = nn.Conv2d(DECODER_CHANNELS, 2, 1)
        self.dice_head = nn.Conv2d(DECODER_CHANNELS, 1, 1, bias=False)
        self.image_heads = ImageHeads(self.encoder.out_channels[-1])
        if config.get(INSTANCE_HEAD):  # absent from the seed's and older checkpoints' configs
            self.instance_head = new_instance_head()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Normalised images [N, in_channels, H, W] (H, W multiples of 32) -> dict of logits (see SEG...)."""
        if not torch.jit.is_tracing():
            check_input_size(x)
        features = self.encoder(x)
        cls, scale = self.image_heads(features[-1])
        y = self.decoder(features)
        out = {SEG: self.seg_head(y), DICE: self.dice_head(y), CLS: cls, SCALE: scale}
        if hasattr(self, INSTANCE_HEAD):
            out[INSTANCE] = self.instance_head(y)
        return out


def new_instance_head() -> nn.Conv2d:
    """Border/contact logits (contract: lib.model_contract.INSTANCE) from the 64-channel decoder map."""
    return nn.Conv2d(DECODER_CHANNELS, 2, 1)


def set_instance_head(net: EfficientFPN, on: bool) -> str | None:
    """Give `net` a freshly initialised instance head, or take it away; returns what changed (None: nothing).

    Starting training from a checkpoint without the head (the seed's) keeps every other weight.
    """
    if bool(on) == hasattr(net, INSTANCE_HEAD):
        return None
    if on:
        net.instance_head = new_instance_head()
        net.config[INSTANCE_HEAD] = True
        return "added a freshly initialised instance head (border/contact); every other weight is the checkpoint's"
    del net.instance_head
    net.config.pop(INSTANCE_HEAD, None)
    return "dropped the checkpoint's instance head (instance_head=false)"


def build_model(model_name: str = "efficientnet-b1", *, pretrained: bool = False, in_channels: int = 3,
                use_context_block: bool = False, use_mish: bool = False, use_attention: bool = True,
                use_ASPP: bool = True, drop_connect_rate: float = 0.2, instance_head: bool = False,
                decoder_norm: str = "groupnorm", **layout) -> EfficientFPN:
    """Build the network; defaults are the original pipeline's (b1, attention and ASPP on, no instance head).

    `instance_head` is stored in the config only when on, and `decoder_norm` only when not the seed's
    groupnorm, so the seed architecture's configs are exactly the old ones.

    `layout` takes only the internal keys `context_hidden`/`fuse_context` that `load_model` uses to
    rebuild the original pipeline's non-b2 context models; new models never need them.
    """
    unknown = set(layout) - {"context_hidden", "fuse_context"}
    if unknown:
        raise TypeError(f"build_model() got unexpected arguments: {', '.join(sorted(unknown))}")
    if int(in_channels) < 1:
        raise UserError(f"in_channels={in_channels}: must be at least 1")
    if not 0.0 <= float(drop_connect_rate) < 1.0:
        raise UserError(f"drop_connect_rate={drop_connect_rate}: must be in [0, 1)")
    if decoder_norm not in DECODER_NORMS:
        raise UserError(f"decoder_norm={decoder_norm}: use {' or '.join(DECODER_NORMS)}")
    config = {
        "model_name": str(model_name),
        "in_channels": int(in_channels),
        "use_context_block": bool(use_context_block),
        "use_mish": bool(use_mish),
        "use_attention": bool(use_attention),
        "use_ASPP": bool(use_ASPP),
        "drop_connect_rate": float(drop_connect_rate),
    }
    if layout.get("context_hidden", 8) != 8 or layout.get("fuse_context", False):
        config["context_hidden"] = int(layout.get("context_hidden", 8))
        config["fuse_context"] = bool(layout.get("fuse_context", False))
    if instance_head:
        config[INSTANCE_HEAD] = True
    if decoder_norm != "groupnorm":
        config[DECODER_NORM] = str(decoder_norm)
    return EfficientFPN(config, pretrained=pretrained)


def model_kwargs_from_cfg(cfg) -> dict:
    """`build_model` keyword arguments from a flat Hydra config (MODEL_KEYS, instance_head, decoder_norm,
    pretrained), None = unset."""
    out = {}
    for key in (*MODEL_KEYS, INSTANCE_HEAD, DECODER_NORM, "pretrained"):
        try:
            value = cfg.get(key)
        except Exception:  # noqa: BLE001 - struct configs without the key
            value = None
        if value is not None:
            out[key] = value
    return out


def infer_config(state_dict: dict, path, overrides: dict) -> dict:
    """Architecture of a checkpoint that does not describe itself, from its (our-named) keys and shapes.

    Encoder from the stem/head widths and block count, context block, ASPP, attention, the decoder's
    GroupNorm and the instance head from the keys present. Only Mish in the fusion conv without a context
    block is invisible in the weights: it comes from `use_mish` (default off). With a context block the
    original pipeline always used Mish there.
    """
    from efficientnet_pytorch.model import VALID_MODELS

    def need(key):
        if key not in state_dict:
            raise UserError(f"{path}: not a model checkpoint of this architecture (no '{key}'); "
                            "pass a checkpoint saved by train.py or by the Open Cities 3rd-place pipeline")
        return state_dict[key].shape

    stem = need("encoder._conv_stem.weight")
    head = need("encoder._conv_head.weight")
    blocks = {int(k.split(".")[2]) for k in state_dict if k.startswith("encoder._blocks.")}
    widths = [state_dict[f"decoder.lateral.{i}.weight"].shape[1] for i in range(4)
              if f"decoder.lateral.{i}.weight" in state_dict]
    found = None
    for name in VALID_MODELS:
        layout = encoder_layout(name)
        feats = [layout["block_channels"][i] for i in feature_blocks(layout)]
        if (layout["stem"], layout["head"], len(layout["block_channels"])) == (stem[0], head[0], len(blocks)) \
                and widths == [layout["head"], *reversed(feats)]:
            found = name
            break
    if found is None:
        raise UserError(f"{path}: encoder with {len(blocks)} blocks and a {head[0]}-channel head matches no "
                        "EfficientNet b0-b8/l2 of this architecture; is it a checkpoint of another model?")
    ctx = "decoder.context.conv_mask.weight" in state_dict
    config = {
        "model_name": found,
        "in_channels": int(stem[1]),
        "use_context_block": ctx,
        "use_mish": True if ctx else bool(overrides.get("use_mish", False)),
        "use_attention": "decoder.attention.weight" in state_dict,
        "use_ASPP": any(k.startswith("decoder.aspp.") for k in state_dict),
        "drop_connect_rate": 0.2,
    }
    if ctx:
        hidden = int(state_dict["decoder.context.channel_add_conv.0.weight"].shape[0])
        fuse_ctx = "decoder.fuse.0.conv_mask.weight" in state_dict
        if hidden != 8 or fuse_ctx:
            config["context_hidden"], config["fuse_context"] = hidden, fuse_ctx
    if f"{INSTANCE_HEAD}.weight" in state_dict:
        config[INSTANCE_HEAD] = True
    if "decoder.branches.0.0.gn.weight" not in state_dict:
        config[DECODER_NORM] = "none"
    return config


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


_NON_STRUCTURAL = ("drop_connect_rate",)
# Other tasks' networks (circlenet.py) import this module, so it cannot import them; each registers
# ARCHITECTURES[arch] = load(ckpt, path, overrides) for the checkpoints whose stored config names that arch.
ARCHITECTURES: dict = {}


def load_model(path, **overrides) -> EfficientFPN:
    """Rebuild a model from a checkpoint alone, in eval mode, with `.config` and `.meta`.

    Our checkpoints carry their config; the original pipeline's are recognised from their parameter
    names and shapes. `overrides` (MODEL_KEYS; None = unset) may set what the weights cannot tell
    (`use_mish` for an original checkpoint without context block) and `drop_connect_rate` for
    fine-tuning; an override contradicting the checkpoint is an error rather than a silent rebuild.
    """
    unknown = set(overrides) - set(MODEL_KEYS) - {"pretrained"}
    if unknown:
        raise TypeError(f"load_model() got unexpected arguments: {', '.join(sorted(unknown))}")
    overrides = {k: v for k, v in overrides.items() if v is not None and k != "pretrained"}
    ckpt = read_checkpoint(path)
    arch = (ckpt.model_config or {}).get("arch")
    if arch is not None:
        if arch not in ARCHITECTURES:
            raise UserError(f"{path}: a checkpoint of the '{arch}' network, which this program does not load")
        return ARCHITECTURES[arch](ckpt, path, overrides)
    state_dict = from_seed_names(ckpt.state_dict)
    if ckpt.model_config is not None:
        config = dict(ckpt.model_config)
        source = "checkpoint"
        mismatch = [k for k in MODEL_KEYS if k in overrides and k not in _NON_STRUCTURAL
                    and _differs(overrides[k], config.get(k))]
    else:
        config = infer_config(state_dict, path, overrides)
        source = "weights"
        # use_mish is honoured as given (or ignored with a context block, as the original pipeline did)
        mismatch = [k for k in MODEL_KEYS if k in overrides and k not in (*_NON_STRUCTURAL, "use_mish")
                    and _differs(overrides[k], config.get(k))]
    if mismatch:
        given = ", ".join(f"{k}={overrides[k]}" for k in mismatch)
        found = ", ".join(f"{k}={config.get(k)}" for k in mismatch)
        raise UserError(f"{path}: {given} does not match the checkpoint ({found} from its {source}); "
                        "drop these overrides, the checkpoint describes its architecture")
    for key in _NON_STRUCTURAL:
        if key in overrides:
            config[key] = float(overrides[key])
    kwargs = {k: v for k, v in config.items() if k != "model_name"}
    model = build_model(config["model_name"], pretrained=False, **kwargs)
    _load_weights(model, state_dict, path)
    model.meta = ckpt.model_meta("efficient-fpn" if source == "checkpoint" else "open-cities-3rd-place")
    return model.eval()


def load_models(paths: Sequence[str | os.PathLike], **overrides) -> list[nn.Module]:
    """Every `model=<path>` a user can give, as modules in eval mode: checkpoints of any format through
    `load_model`, exported TorchScript/ONNX files through lib.exported (they answer like the network).

    Only non-None architecture overrides apply; giving one for an exported graph is an error, not
    ignored. Weights that do not fit the architecture become a one-line UserError.
    """
    kwargs = {k: v for k, v in overrides.items() if v is not None}
    return [_load_any(path, kwargs) for path in paths]


def _load_any(path, overrides: dict) -> nn.Module:
    if exported_kind(path):
        given = {k: v for k, v in overrides.items() if k != "pretrained"}
        if given:
            names = ", ".join(f"{k}={v}" for k, v in given.items())
            raise UserError(f"{path}: {names} cannot change an exported model; drop these overrides")
        return load_exported(path)
    try:
        return load_model(path, **overrides)
    except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as err:
        if isinstance(err, UserError):
            raise
        hint = ", ".join(f"{k}=" for k in ARCH_OVERRIDES)
        raise UserError(f"{path}: checkpoint does not match the model ({one_line(err)}); check {hint}") from None


def _differs(given, stored) -> bool:
    if isinstance(stored, float) or isinstance(given, float):
        try:
            return not math.isclose(float(given), float(stored))
        except (TypeError, ValueError):
            return True
    if isinstance(stored, bool):
        return bool(given) != stored
    return given != stored


def _load_weights(model: nn.Module, state_dict: dict, path) -> None:
    """Strict load with float16/float32 casting, reporting mismatches in one line."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [k for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {keys[0]})")
        raise UserError(f"{path}: weights do not fit the model {model.config['model_name']} "
                        f"({', '.join(parts)}); check the architecture overrides or the file")
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(state_dict[k].to(v.dtype))

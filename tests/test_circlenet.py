"""circlenet.py: output heads at stride 2, self-describing checkpoints through model.load_models, export."""

import io
import json

import pytest
import torch
from torch import nn

import circlenet as C
import model as M
from lib import point_contract as P
from lib.checkpoints import save_checkpoint
from lib.errors import UserError
from lib.point_losses import PointLoss

SMALL = {"model_name": "efficientnet-b0", "decoder_channels": (64, 32, 32, 16), "head_channels": 16}


def _net(**kwargs) -> C.CircleNet:
    """A small b0 CircleNet in eval mode with non-trivial BatchNorm statistics (so dropped buffers would show)."""
    net = C.build_circlenet(**{**SMALL, **kwargs})
    g = torch.Generator().manual_seed(0)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return net.eval()


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in P.HEADS)


def test_heads_at_stride_2_for_two_channel_sar():
    net = C.build_circlenet(model_name="efficientnet-b0", pretrained=False).eval()
    assert net.encoder._conv_stem.weight.shape[1] == 2  # VV, VH by default
    with torch.no_grad():
        out = net(torch.rand(2, 2, 64, 96))
    assert list(out) == list(P.HEADS)
    channels = {P.OBJECTNESS: 1, P.LENGTH: 1, P.OFFSET: 2, P.VESSEL: 1, P.FISHING: 1}
    assert {k: tuple(v.shape) for k, v in out.items()} == {k: (2, c, 32, 48) for k, c in channels.items()}
    assert net.encoder.out_channels == [16, 24, 40, 112, 320]  # b0 at strides 2, 4, 8, 16, 32
    assert net.heads[P.OBJECTNESS].out.bias.item() == pytest.approx(-2.19)
    assert net.heads[P.LENGTH].out.bias.item() == 0.0
    assert isinstance(net.decoder.blocks[-1].up.shuffle, nn.PixelShuffle)  # the step to stride 2
    assert not hasattr(net.encoder, "_conv_head")


def test_pixel_shuffle_step_starts_as_nearest_upsampling():
    up = C.PixelShuffleUp(8)
    x = torch.randn(1, 8, 3, 5)
    with torch.no_grad():
        y = up(x)
        expected = nn.functional.interpolate(up.conv(x)[:, ::4], scale_factor=2.0, mode="nearest")
    assert y.shape == (1, 8, 6, 10) and torch.allclose(y, expected, atol=1e-6)


def test_config_describes_the_network_and_bad_options_are_one_line_errors():
    cfg = C.circlenet_config(model_name="efficientnet-b0", decoder_channels=(64, 32, 32, 16), head_channels=16)
    assert cfg == {"arch": "circlenet", "task": "points", "model_name": "efficientnet-b0", "in_channels": 2,
                   "decoder_channels": [64, 32, 32, 16], "head_channels": 16, "drop_connect_rate": 0.2}
    assert C.build_circlenet(cfg).config == cfg
    for bad, match in (({"model_name": "efficientnet-b9"}, "unknown encoder"),
                       ({"decoder_channels": (64, 32)}, "4 positive widths"),
                       ({"head_channels": 12}, "multiple of 8"),
                       ({"in_channels": 0}, "at least 1"),
                       ({"drop_connect_rate": 1.0}, r"\[0, 1\)")):
        with pytest.raises(UserError, match=match) as err:
            C.circlenet_config(**bad)
        assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="unknown CircleNet option"):
        C.build_circlenet({**cfg, "use_mish": True})
    with pytest.raises(UserError, match="not a CircleNet config"):
        C.build_circlenet({**cfg, "arch": "efficient-fpn"})


def test_input_size_not_multiple_of_32_rejected():
    with pytest.raises(UserError, match="multiples of 32"):
        _net()(torch.zeros(1, 2, 64, 80))


def test_checkpoint_round_trip_through_load_models(tmp_path):
    net = _net()
    x = torch.rand(1, 2, 64, 64)
    with torch.no_grad():
        before = net(x)
    path = tmp_path / "points.pth"
    save_checkpoint(path, net, step=12, meta={"task": "points"})
    raw = torch.load(path, weights_only=True)  # data only
    assert raw["model_config"] == net.config and raw["model_config"]["arch"] == "circlenet"
    # what export.py / inference.py pass: the segmentation overrides, unset
    (loaded,) = M.load_models([path], model_name=None, use_mish=None, use_context_block=None, use_attention=None)
    assert isinstance(loaded, C.CircleNet) and not loaded.training and loaded.config == net.config
    assert loaded.meta["step"] == 12 and loaded.meta["source"] == "circlenet"
    with torch.no_grad():
        after = loaded(x)
    assert all(torch.equal(before[k], after[k]) for k in P.HEADS)
    # train.py's fine-tuning override replaces the stored rate; an agreeing model_name is accepted
    tuned = M.load_model(path, model_name="efficientnet-b0", drop_connect_rate=0.4)
    assert tuned.config["drop_connect_rate"] == 0.4 and tuned.encoder.drop_connect[-1] > 0.2
    # the same network as .safetensors, its config in the header's JSON
    from safetensors.torch import save_file

    save_file(dict(net.state_dict()), str(tmp_path / "points.safetensors"),
              metadata={"model_config": json.dumps(net.config)})
    with torch.no_grad():
        again = M.load_model(tmp_path / "points.safetensors")(x)
    assert all(torch.equal(before[k], again[k]) for k in P.HEADS)


def test_checkpoint_mismatches_are_one_line_errors_naming_the_file(tmp_path):
    path = tmp_path / "points.pth"
    save_checkpoint(path, _net())
    cases = [({"model_name": "efficientnet-b2"}, "model_name=efficientnet-b2 does not match"),
             ({"use_mish": True}, "use_mish=True does not apply to a CircleNet")]
    for overrides, match in cases:
        with pytest.raises(UserError, match=match) as err:
            M.load_models([path], **overrides)
        assert str(path) in str(err.value) and "\n" not in str(err.value)
    wrong = _net()
    wrong.config = dict(wrong.config, head_channels=32)  # config says 32, weights are 16 wide
    save_checkpoint(tmp_path / "wrong.pth", wrong)
    with pytest.raises(UserError, match="weights do not fit the model efficientnet-b0"):
        M.load_models([tmp_path / "wrong.pth"])
    other = _net()
    other.config = dict(other.config, arch="transformer")
    save_checkpoint(tmp_path / "other.pth", other)
    with pytest.raises(UserError, match="'transformer' network"):
        M.load_model(tmp_path / "other.pth")


def test_every_parameter_is_trained_by_the_point_loss():
    """No unused parameter (DDP without find_unused_parameters needs that), and the loss goes down."""
    torch.manual_seed(0)
    net = C.build_circlenet(**SMALL).train()
    x = torch.rand(2, 2, 64, 64)
    t = {k: torch.zeros(2, 2 if k == P.T_OFFSET else 1, 32, 32) for k in P.TARGETS}
    t[P.T_VALID][:] = 1.0
    for k in (P.T_HEATMAP, P.T_VESSEL, P.T_VESSEL_W, P.T_FISHING_UNKNOWN, P.T_LENGTH_W, P.T_OFFSET_W):
        t[k][:, :, 10, 20] = 1.0
    t[P.T_LENGTH][:, :, 10, 20] = 5.0
    loss_fn = PointLoss()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    losses = []
    for _ in range(3):
        total, _ = loss_fn(net(x), t)
        opt.zero_grad()
        total.backward()
        if not losses:
            assert [n for n, p in net.named_parameters() if p.grad is None] == []
        opt.step()
        losses.append(total.item())
    assert losses[-1] < losses[0]


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_trace_channels_last_and_bfloat16_autocast_match_eager():
    net = _net()
    x, other = torch.rand(1, 2, 64, 64), torch.rand(2, 2, 96, 64)
    with torch.no_grad():
        eager = net(other)
        traced = torch.jit.trace(net, x, strict=False)
        assert _max_diff(traced(other), eager) < 1e-5  # other size and batch: not replaying the example
        channels_last = net.to(memory_format=torch.channels_last)
        assert _max_diff(channels_last(other.to(memory_format=torch.channels_last)), eager) < 1e-4
        net.to(memory_format=torch.contiguous_format)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = net(other)
    assert all(v.dtype == torch.bfloat16 and torch.isfinite(v).all() for v in half.values())
    scale = max(v.abs().max().item() for v in eager.values())
    assert _max_diff(half, eager) < 0.05 * scale


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning", "ignore::torch.jit.TracerWarning")
def test_onnx_export_matches_eager():
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    net = _net()
    x, other = torch.rand(1, 2, 64, 64), torch.rand(2, 2, 96, 64)
    buf = io.BytesIO()
    axes = {"x": {0: "n", 2: "h", 3: "w"}, **{k: {0: "n", 2: "h2", 3: "w2"} for k in P.HEADS}}
    torch.onnx.export(net, (x,), buf, input_names=["x"], output_names=list(P.HEADS), dynamic_axes=axes,
                      opset_version=17, dynamo=False)
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    got = dict(zip(P.HEADS, session.run(None, {"x": other.numpy()})))
    with torch.no_grad():
        eager = net(other)
    assert _max_diff({k: torch.from_numpy(v) for k, v in got.items()}, eager) < 1e-4


def test_pretrained_stem_adapted_to_two_channels(monkeypatch):
    from efficientnet_pytorch import EfficientNet
    from efficientnet_pytorch import utils as effnet_utils

    imagenet = EfficientNet.from_name("efficientnet-b0").state_dict()
    monkeypatch.setattr(effnet_utils.model_zoo, "load_url", lambda *a, **k: {n: v.clone() for n, v in imagenet.items()})
    net = C.build_circlenet(**SMALL, pretrained=True)
    assert torch.allclose(net.encoder._conv_stem.weight, M.adapt_stem_weight(imagenet["_conv_stem.weight"], 2))
    assert torch.equal(net.encoder._blocks[3]._depthwise_conv.weight, imagenet["_blocks.3._depthwise_conv.weight"])

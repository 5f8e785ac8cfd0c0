"""model.py: the original pipeline's exact architecture, rebuilt from checkpoints, and the model's edges.

Reading and refusing files is tested in test_checkpoints.py, exported graphs in test_exported.py.
"""

import math
import urllib.error

import numpy as np
import pytest
import torch
from torch import nn

import model as M
from lib.checkpoints import CHECKPOINT_FORMAT, save_checkpoint
from lib.cli import compose_config
from lib.errors import UserError

REFERENCES = {
    "seed_b1.pt": {"model_name": "efficientnet-b1", "use_context_block": False, "use_mish": False},
    "seed_b2_context_mish.pt": {"model_name": "efficientnet-b2", "use_context_block": True, "use_mish": True},
}
OUTPUT_OF = {M.SEG: "focal_logits", M.DICE: "dice_logits", M.CLS: "cls_logits", M.SCALE: "scale"}


@pytest.fixture(scope="module")
def reference(shared, tmp_path_factory):
    """Each reference vector plus a file holding only `{"state_dict": weights}` in the original names."""
    out = {}
    tmp = tmp_path_factory.mktemp("reference")
    for name in REFERENCES:
        data = torch.load(shared / "reference" / name, weights_only=True)
        path = tmp / name
        torch.save({"state_dict": data["state_dict"]}, path)
        out[name] = (data, path)
    return out


def _randomise_buffers(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics, so a round trip that dropped buffers would show."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.eval()


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in M.OUTPUT_KEYS)


@pytest.mark.parametrize("name", list(REFERENCES))
def test_reference_vectors_reproduced_by_load_model_alone(reference, name):
    data, path = reference[name]
    model = M.load_model(path)
    for key, value in REFERENCES[name].items():
        assert model.config[key] == value
    assert not model.training
    with torch.no_grad():
        out = model(data["input"])
    for ours, theirs in OUTPUT_OF.items():
        ref = data["outputs"][theirs]
        assert out[ours].shape == ref.shape
        rel = (out[ours] - ref).abs().max().item() / ref.abs().mean().item()
        assert rel <= 1e-3, f"{ours}: max error / mean |output| = {rel:.2e}"


@pytest.mark.parametrize("preset,count,reference_name", [
    ("b1", 8_129_061, "seed_b1.pt"),
    ("b2_context_mish", 9_329_952, "seed_b2_context_mish.pt"),
])
def test_presets_build_the_original_architectures(reference, preset, count, reference_name):
    """Parameter counts and every parameter name/shape map one-to-one onto the original checkpoints."""
    cfg = compose_config(None, [f"+arch={preset}"])
    model = M.build_model(**M.model_kwargs_from_cfg(cfg))
    assert sum(p.numel() for p in model.parameters()) == count
    original = reference[reference_name][0]["state_dict"]
    ours = M.to_seed_names(model.state_dict())
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in original.items()}
    assert set(M.from_seed_names(original)) == set(model.state_dict())


@pytest.mark.parametrize("preset", ["b0", "b2", "b2_context_mish", "light"])
def test_save_load_round_trip_gives_identical_outputs(tmp_path, preset):
    kwargs = M.model_kwargs_from_cfg(compose_config(None, [f"+arch={preset}"]))
    model = _randomise_buffers(M.build_model(**kwargs))
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        before = model(x)
    assert before[M.SEG].shape == (2, 2, 16, 24) and before[M.DICE].shape == (2, 1, 16, 24)
    assert before[M.CLS].shape == (2, 2) and before[M.SCALE].shape == (2, 1)

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    path = tmp_path / "last.pth"
    save_checkpoint(path, model, optimizer=opt.state_dict(), step=7, epoch=1, metrics={"jaccard": np.float64(0.5)},
                      rng={"numpy": np.random.get_state(), "torch": torch.get_rng_state()},
                      train_config={"width": 512}, meta={"ref_scale": 0.3})
    raw = torch.load(path, weights_only=True)  # nothing in it needs unpickling code
    assert raw["format"] == CHECKPOINT_FORMAT and raw["model_config"] == model.config
    assert raw["step"] == 7 and raw["metrics"] == {"jaccard": 0.5} and raw["meta"]["version"]
    assert raw["rng"]["numpy"][1].shape == (624,)
    assert not list(tmp_path.glob(".*"))  # no temporary file left beside it

    loaded = M.load_model(path)
    assert not loaded.training and loaded.config == model.config
    assert loaded.meta["ref_scale"] == 0.3 and loaded.meta["step"] == 7
    with torch.no_grad():
        after = loaded(x)
    assert all(torch.equal(before[k], after[k]) for k in M.OUTPUT_KEYS)


def test_load_model_refuses_a_bad_file_in_one_line(tmp_path):
    """The refusals themselves are lib.checkpoints' (test_checkpoints.py); load_model passes them on."""
    with pytest.raises(UserError, match="not found"):
        M.load_model(tmp_path / "nope.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(UserError, match="empty"):
        M.load_model(tmp_path / "empty.pth")


def test_overrides_contradicting_a_checkpoint_refused(tmp_path, reference):
    path = tmp_path / "ours.pth"
    save_checkpoint(path, M.build_model("efficientnet-b0", use_mish=True))
    with pytest.raises(UserError, match="use_mish=False does not match") as err:
        M.load_model(path, use_mish=False)
    assert str(path) in str(err.value)
    assert M.load_model(path, model_name="efficientnet-b0", drop_connect_rate=0.5).config["drop_connect_rate"] == 0.5
    _, seed_b1 = reference["seed_b1.pt"]
    with pytest.raises(UserError, match="use_context_block=True does not match"):
        M.load_model(seed_b1, use_context_block=True)
    with pytest.raises(UserError, match="model_name=efficientnet-b2"):
        M.load_model(seed_b1, model_name="efficientnet-b2")


def test_weights_that_do_not_fit_the_stored_config_refused(tmp_path):
    b0 = M.build_model("efficientnet-b0")
    path = tmp_path / "mixed.pth"
    torch.save({"format": CHECKPOINT_FORMAT, "model_config": dict(b0.config, use_ASPP=False),
                "state_dict": b0.state_dict()}, path)
    with pytest.raises(UserError, match="do not fit") as err:
        M.load_model(path)
    assert str(path) in str(err.value) and "unexpected" in str(err.value)


def test_load_models_passes_only_given_overrides_and_names_the_file_on_a_foreign_config(tmp_path, reference):
    _, seed_b1 = reference["seed_b1.pt"]
    (net,) = M.load_models([seed_b1], model_name=None, use_mish=None, use_context_block=None, use_attention=None)
    assert net.config["model_name"] == "efficientnet-b1" and not net.training
    b0 = M.build_model("efficientnet-b0")
    path = tmp_path / "foreign.pth"
    torch.save({"model_config": dict(b0.config, decoder="unet"), "state_dict": b0.state_dict()}, path)
    with pytest.raises(UserError, match="checkpoint does not match the model") as err:
        M.load_models([path])
    assert str(path) in str(err.value) and "model_name=" in str(err.value)


def test_seed_mish_override_honoured_only_without_context_block(reference):
    data, seed_b1 = reference["seed_b1.pt"]
    mish = M.load_model(seed_b1, use_mish=True)
    assert mish.config["use_mish"] and isinstance(mish.decoder.fuse[-1], nn.Mish)
    with torch.no_grad():
        out = mish(data["input"])
    assert (out[M.SEG] - data["outputs"]["focal_logits"]).abs().max() > 1e-3  # a different network
    assert torch.allclose(out[M.CLS], data["outputs"]["cls_logits"], atol=1e-4)  # same encoder

    _, seed_b2 = reference["seed_b2_context_mish.pt"]
    ctx = M.load_model(seed_b2, use_mish=False)  # the original always used Mish with its context block
    assert ctx.config["use_mish"] and isinstance(ctx.decoder.fuse[-1], nn.Mish)


def test_original_context_layout_of_non_b2_encoders_recognised(tmp_path):
    """The original built b0/b1/b3 context models with a 4-wide context block plus one inside `top4`."""
    model = _randomise_buffers(M.build_model("efficientnet-b0", use_context_block=True, use_mish=True,
                                             context_hidden=4, fuse_context=True))
    for p in model.decoder.parameters():
        p.data.normal_(0, 0.05)
    original = M.to_seed_names(model.state_dict())
    assert original["ctx.channel_add_conv.0.weight"].shape[0] == 4 and "top4.0.conv_mask.weight" in original
    path = tmp_path / "seed_b0_context.pth"
    torch.save({"state_dict": {k: v.half() for k, v in original.items()}}, path)
    loaded = M.load_model(path)
    assert loaded.config["context_hidden"] == 4 and loaded.config["fuse_context"]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert _max_diff(model(x), loaded(x)) < 1e-2  # float16 storage


def test_original_weights_load_from_safetensors(tmp_path, reference):
    from safetensors.torch import save_file

    data, pt_path = reference["seed_b1.pt"]
    st_path = tmp_path / "m40000.safetensors"
    save_file({k: v.contiguous() for k, v in data["state_dict"].items()}, str(st_path))
    x = data["input"][:1, :, :64, :64]
    with torch.no_grad():
        assert _max_diff(M.load_model(st_path)(x), M.load_model(pt_path)(x)) == 0.0


def test_input_size_not_multiple_of_32_rejected():
    model = M.build_model("efficientnet-b0").eval()
    with pytest.raises(ValueError, match="multiples of 32") as err:
        model(torch.zeros(1, 3, 65, 64))
    assert isinstance(err.value, UserError) and "96x64" in str(err.value)


def test_four_channel_input_adapts_stem(tmp_path):
    model = M.build_model("efficientnet-b0", in_channels=4).eval()
    assert model.encoder._conv_stem.weight.shape[1] == 4
    with torch.no_grad():
        out = model(torch.randn(1, 4, 64, 64))
    assert out[M.SEG].shape == (1, 2, 16, 16)
    save_checkpoint(tmp_path / "m.pth", model)
    assert M.load_model(tmp_path / "m.pth").config["in_channels"] == 4

    rgb = torch.randn(8, 3, 3, 3)
    four = M.adapt_stem_weight(rgb, 4)
    assert torch.allclose(four[:, :3], rgb * 0.75) and torch.allclose(four[:, 3], rgb.mean(1) * 0.75)
    assert torch.allclose(M.adapt_stem_weight(rgb, 1)[:, 0], rgb.sum(1))


def test_pretrained_uses_imagenet_weights_from_efficientnet_pytorch(monkeypatch):
    from efficientnet_pytorch import EfficientNet
    from efficientnet_pytorch import utils as effnet_utils

    imagenet = EfficientNet.from_name("efficientnet-b0").state_dict()
    requested = []

    def fake_download(url, *args, **kwargs):
        requested.append(url)
        return {k: v.clone() for k, v in imagenet.items()}

    monkeypatch.setattr(effnet_utils.model_zoo, "load_url", fake_download)
    model = M.build_model("efficientnet-b0", pretrained=True, in_channels=4)
    assert requested and "efficientnet-b0" in requested[0]
    assert torch.equal(model.encoder._conv_head.weight, imagenet["_conv_head.weight"])
    assert torch.allclose(model.encoder._conv_stem.weight, M.adapt_stem_weight(imagenet["_conv_stem.weight"], 4))


def test_pretrained_offline_gives_one_line_user_error(monkeypatch):
    from efficientnet_pytorch import utils as effnet_utils

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(effnet_utils.model_zoo, "load_url", offline)
    with pytest.raises(UserError) as err:
        M.build_model("efficientnet-b0", pretrained=True)
    msg = str(err.value)
    assert "could not download" in msg and "pretrained=false" in msg and "model=<path>" in msg and "\n" not in msg


def test_drop_connect_follows_original_schedule():
    model = M.build_model("efficientnet-b1", drop_connect_rate=0.5)
    rates, n = model.encoder.drop_connect, len(model.encoder._blocks)
    assert n == 23
    assert rates[3] == pytest.approx(0.2 * 3 / n) and rates[4] == pytest.approx(0.5 * 4 / n)
    assert rates[-1] == pytest.approx(0.5 * 22 / n)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_trace_channels_last_and_compile_match_eager():
    model = _randomise_buffers(M.build_model("efficientnet-b0", use_context_block=True, use_mish=True))
    x, other = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        eager, eager_other = model(x), model(other)
        traced = torch.jit.trace(model, x, strict=False)
        assert _max_diff(traced(other), eager_other) < 1e-5  # not just replaying the example
        channels_last = model.to(memory_format=torch.channels_last)
        assert _max_diff(channels_last(x.to(memory_format=torch.channels_last)), eager) < 1e-4
        model.to(memory_format=torch.contiguous_format)
        # Whole-graph capture (no graph breaks) with dynamo + AOT autograd; the inductor C++ backend
        # also works but needs minutes of compilation on a small CPU, too slow for this suite.
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        assert _max_diff(compiled(x), eager) < 1e-5


def test_normalize_and_kwargs_from_cfg():
    x = torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 3, 1, 1)
    expected = [(v / 255 - m) / s for v, m, s in zip([0, 128, 255], M.IMAGENET_MEAN, M.IMAGENET_STD)]
    assert torch.allclose(M.normalize(x).flatten(), torch.tensor(expected), atol=1e-6)
    assert M.normalize(x[0]).shape == (3, 1, 1)
    cfg = {"model_name": "efficientnet-b2", "use_mish": None, "pretrained": False, "width": 512}
    assert M.model_kwargs_from_cfg(cfg) == {"model_name": "efficientnet-b2", "pretrained": False}
    assert set(M.build_model("efficientnet-b0").config) == set(M.MODEL_KEYS)
    assert math.isclose(M.build_model("efficientnet-b0", drop_connect_rate=0.3).config["drop_connect_rate"], 0.3)


# --------------------------------------------------------------------------------------------------
# The instance head (border/contact logits)
# --------------------------------------------------------------------------------------------------


def test_instance_head_only_adds_its_output(tmp_path):
    """Same weights with and without the head: SEG/DICE/CLS/SCALE identical, INSTANCE [N, 2, H/4, W/4] extra."""
    torch.manual_seed(0)
    with_head = _randomise_buffers(M.build_model("efficientnet-b0", instance_head=True))
    plain = M.build_model("efficientnet-b0").eval()
    weights = with_head.state_dict()
    assert {k for k in weights if k.startswith("instance_head.")} == {"instance_head.weight", "instance_head.bias"}
    plain.load_state_dict({k: v for k, v in weights.items() if not k.startswith("instance_head.")})
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        a, b = with_head(x), plain(x)
    assert set(a) == {*M.OUTPUT_KEYS, M.INSTANCE} and set(b) == set(M.OUTPUT_KEYS)
    assert all(torch.equal(a[k], b[k]) for k in M.OUTPUT_KEYS)
    assert a[M.INSTANCE].shape == (2, 2, 16, 24)
    assert with_head.config["instance_head"] is True and "instance_head" not in plain.config

    path = tmp_path / "head.pth"
    save_checkpoint(path, with_head)
    loaded = M.load_model(path)
    with torch.no_grad():
        assert torch.equal(loaded(x)[M.INSTANCE], a[M.INSTANCE])
    # weights in the original pipeline's names keep the head's parameters and are recognised by them
    seed_named = M.to_seed_names(weights)
    assert "instance_head.weight" in seed_named and "bce_logit.weight" in seed_named
    torch.save({"state_dict": seed_named}, tmp_path / "seed_named.pth")
    inferred = M.load_model(tmp_path / "seed_named.pth")
    assert inferred.config["instance_head"] is True
    with torch.no_grad():
        assert torch.equal(inferred(x)[M.INSTANCE], a[M.INSTANCE])


def test_set_instance_head_adds_a_fresh_head_or_drops_it(reference):
    """A seed checkpoint loads without the head; training adds one and keeps every other weight."""
    data, path = reference["seed_b1.pt"]
    net = M.load_model(path)
    assert "instance_head" not in net.config and M.INSTANCE not in net(data["input"][:1])
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert "fresh" in M.set_instance_head(net, True)
    assert M.set_instance_head(net, True) is None  # already there: nothing changes
    after = net.state_dict()
    assert set(after) - set(before) == {"instance_head.weight", "instance_head.bias"}
    assert all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        assert net.eval()(data["input"][:1])[M.INSTANCE].shape[1] == 2
    assert "dropped" in M.set_instance_head(net, False)
    assert set(net.state_dict()) == set(before) and "instance_head" not in net.config


def test_model_kwargs_from_cfg_reads_the_instance_head():
    cfg = compose_config("train", ["arch=b0"])
    assert cfg.instance_head is True and M.model_kwargs_from_cfg(cfg)["instance_head"] is True
    assert M.build_model(**M.model_kwargs_from_cfg(cfg)).config["instance_head"] is True


def test_light_preset_is_a_plain_fpn_head_whose_weights_tell_its_architecture():
    """arch=light: b0, no ASPP, no GroupNorm in the upsampling blocks, instance head kept; a checkpoint
    without its config (weights only) is rebuilt as the same network, and the seed's infer as before."""
    cfg = compose_config(None, ["+arch=light"])
    net = M.build_model(**M.model_kwargs_from_cfg(cfg), instance_head=True)
    assert net.config[M.DECODER_NORM] == "none" and net.config["model_name"] == "efficientnet-b0"
    assert net.decoder.aspp is None and not any(isinstance(m, torch.nn.GroupNorm) for m in net.modules())
    assert all(isinstance(m.gn, torch.nn.Identity) and m.conv.bias is not None
               for m in net.modules() if isinstance(m, M.ConvGNUp))
    seed_like = M.build_model("efficientnet-b0")
    assert M.DECODER_NORM not in seed_like.config  # the seed architecture's config is exactly the old one
    assert sum(p.numel() for p in net.parameters()) < 0.85 * sum(p.numel() for p in seed_like.parameters())
    inferred = M.infer_config(net.state_dict(), "light.pth", {})
    assert inferred == {**net.config, "drop_connect_rate": 0.2}
    assert M.DECODER_NORM not in M.infer_config(seed_like.state_dict(), "b0.pth", {})
    with torch.no_grad():
        out = net.eval()(torch.randn(1, 3, 64, 64))
    assert out[M.SEG].shape == (1, 2, 16, 16) and out[M.INSTANCE].shape == (1, 2, 16, 16)


def test_unknown_decoder_norm_is_a_one_line_error():
    with pytest.raises(UserError, match="decoder_norm=batch: use groupnorm or none"):
        M.build_model("efficientnet-b0", decoder_norm="batch")


def test_aspp_projection_without_concatenation_matches_the_original_form():
    """ASPP sums per-branch 1x1 convs and adds the pooled branch as a bias; in evaluation that must be the
    original projection of the five concatenated branches, on non-trivial BatchNorm statistics."""
    torch.manual_seed(0)
    aspp = _randomise_buffers(M.ASPP(48)).eval()
    x = torch.randn(2, 48, 20, 28)
    with torch.no_grad():
        pooled = aspp.pool(x).expand(-1, -1, 20, 28)
        expected = aspp.project(torch.cat([conv(x) for conv in aspp.convs] + [pooled], 1))
        assert torch.equal(aspp.concatenated(x), expected)
        got = aspp(x)
    assert got.shape == expected.shape == (2, 48, 20, 28)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert expected.abs().max() > 0.1  # the comparison is not between two zero maps


def test_aspp_trains_as_the_concatenated_form_with_the_same_gradients():
    """Training uses the split projection too: batch statistics, output and every parameter's gradient must
    be the concatenated form's; under bf16 autocast the parts are summed in fp32 and stay close to it."""
    torch.manual_seed(0)
    aspp = M.ASPP(32, dropout=0.0).train()
    x = torch.randn(3, 32, 16, 20)
    grads = []
    for forward in (aspp.concatenated, aspp.forward):
        aspp.zero_grad()
        y = forward(x)
        (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
        grads.append((y.detach(), {n: p.grad.clone() for n, p in aspp.named_parameters()}))
    (y0, g0), (y1, g1) = grads
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    assert set(g0) == set(g1) and all(g0[n].abs().max() > 0 for n in g0)  # every parameter learns, in both
    for name in g0:  # equal up to float rounding, relative to each gradient's size
        assert (g1[name] - g0[name]).abs().max() <= 1e-5 * g0[name].abs().max(), name
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = aspp(x)
    assert low.dtype == torch.float32  # summed in fp32, then BN/ReLU on it
    assert (low - y0).abs().max() < 0.05 * y0.abs().max()


def test_decoder_dropout_is_torch_dropout_in_distribution_and_gradient():
    """The decoder's CPU dropout (a uniform draw instead of bernoulli_) keeps each element with probability
    1 - p, scales kept ones by 1 / (1 - p), passes the gradient through exactly the kept elements, follows
    the input's memory format and is the identity in eval; the decoder uses it."""
    from lib.decoder_blocks import Dropout
    torch.manual_seed(0)
    drop = Dropout(0.2).train()
    x = torch.randn(4, 16, 64, 64).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    y = drop(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.8) < 0.005  # 262,144 draws: 4 standard deviations is 0.003
    torch.testing.assert_close(y[kept], x[kept] / 0.8)
    assert y.is_contiguous(memory_format=torch.channels_last)
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / 0.8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert drop(x.bfloat16()).dtype == torch.bfloat16
    assert torch.equal(drop.eval()(x), x)
    assert torch.equal(Dropout(1.0).train()(x), torch.zeros_like(x))
    net = M.build_model("efficientnet-b0", pretrained=False)
    drops = [m for m in net.decoder.modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == 2 and all(isinstance(m, Dropout) for m in drops)

"""export.py: TorchScript/ONNX files of a models x TTA ensemble that match eager PyTorch and load like a model."""

import json
import zipfile

import numpy as np
import onnx
import pytest
import torch
from rasterio.windows import Window

import engine
import export as X
import model as M
from lib import geo_io
from lib.cli import VERSION, compose_config
from lib.errors import UserError

# TorchScript is deprecated upstream but is one of the two formats this feature writes
pytestmark = pytest.mark.filterwarnings("ignore:`torch\\.jit:DeprecationWarning")

TTA = ["none", "hflip", "vflip", "hvflip", "transpose"]
TRACE = 128  # traced at 1 x 128 x 128; checked at other batches and (non-square) sizes
SCENE = "data/kampala/kam/81046528/81046528.tif"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _lively(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Re-draw conv/linear weights with gain 1.5: a freshly initialised EfficientNet's output hardly
    depends on the image, which would let a wrong flip or a mixed-up batch pass unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 1.5 / m.weight[0].numel() ** 0.5)
    return net.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Two b0 checkpoints exported as one 2-model x 5-TTA ensemble through the CLI's run()."""
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("export")
    checkpoints = []
    for seed in range(2):
        path = tmp / f"b0_{seed}.pth"
        torch.manual_seed(seed)  # biases and the rest of the default init: independent of earlier tests
        M.save_checkpoint(path, _lively(M.build_model("efficientnet-b0", pretrained=False), seed),
                          meta={"gsd": 0.0746})
        checkpoints.append(path)
    cfg = compose_config("export", [f"model=[{checkpoints[0]},{checkpoints[1]}]", f"tta=[{','.join(TTA)}]",
                                    f"width={TRACE}", f"output={tmp / 'ens'}", "formats=[torchscript,onnx]"])
    result = X.run(cfg)
    eager = X.EnsembleTTA([M.load_model(p) for p in checkpoints], TTA)
    return {"checkpoints": checkpoints, "result": result, "eager": eager, "dir": tmp}


@pytest.fixture(scope="module")
def tiles(shared):
    """Two real 128 x 160 drone tiles (Kampala), normalised: batch and size differ from the trace."""
    with geo_io.open_raster(shared / SCENE) as ds:
        reads = [geo_io.read_window(ds, Window(col, 900, 160, 128)) for col in (1400, 1560)]
    assert all(valid.mean() > 0.99 for _, valid in reads)  # imagery, not the nodata margin
    rgb = [image for image, _ in reads]
    return M.normalize(torch.from_numpy(np.stack(rgb)).permute(0, 3, 1, 2))


@pytest.fixture(scope="module")
def loaded(exported):
    """Each exported file opened with load_exported (sessions are costly: open once)."""
    return {kind: X.load_exported(exported["result"][kind]) for kind in ("torchscript", "onnx")}


@pytest.fixture(scope="module")
def reference(exported, tiles):
    """The eager ensemble's (seg_prob, cls_prob) on the real tiles."""
    with torch.no_grad():
        return exported["eager"](tiles)


def test_cli_writes_both_files_with_provenance_metadata(exported):
    result, checkpoints = exported["result"], exported["checkpoints"]
    assert result["onnx"] == exported["dir"] / "ens.onnx"
    assert result["torchscript"] == exported["dir"] / "ens.torchscript"
    props = {p.key: p.value for p in onnx.load(str(result["onnx"]), load_external_data=False).metadata_props}
    extra = {X.META_KEY: ""}
    torch.jit.load(str(result["torchscript"]), _extra_files=extra)
    for kind, meta in (("onnx", json.loads(props[X.META_KEY])), ("torchscript", json.loads(extra[X.META_KEY]))):
        assert meta["kind"] == kind
        assert meta["version"] == VERSION
        assert meta["tta"] == TTA
        assert [m["sha256"] for m in meta["models"]] == [engine.file_sha256(p) for p in checkpoints]
        assert [m["config"]["model_name"] for m in meta["models"]] == ["efficientnet-b0"] * 2
        assert set(meta["outputs"]) == {"seg_prob", "cls_prob"}
        assert meta["check"]["max_abs_diff"] <= 1e-4 and meta["check"]["input_shape"] == [2, 3, 64, 96]
    assert json.loads(props[X.META_KEY])["opset"] >= 17


@pytest.mark.parametrize("kind", ["torchscript", "onnx"])
def test_exported_graph_matches_eager_ensemble_on_real_tiles(loaded, tiles, reference, kind):
    seg_ref, cls_ref = reference
    seg, cls = loaded[kind].probabilities(tiles)
    assert seg.shape == (2, 1, 32, 40) and cls.shape == (2, 1)
    assert (seg - seg_ref).abs().max().item() < 1e-4
    assert (cls - cls_ref).abs().max().item() < 1e-4
    # the map varies within and between tiles, so a misplaced flip or batch item would show
    spread = (seg_ref.std().item(), (seg_ref[0] - seg_ref[1]).abs().max().item())
    assert spread[0] > 0.05 and spread[1] > 0.1, spread


@pytest.mark.parametrize("kind", ["torchscript", "onnx"])
def test_load_exported_answers_like_a_model_with_logits(loaded, tiles, kind):
    net = loaded[kind]
    assert net.config["exported"] is True and net.config["tta"] == TTA
    assert net.meta["gsd"] == 0.0746  # the source models' training GSD, for match_gsd
    assert net.eval() is net and net.to("cpu") is net
    x = tiles[:1, :, :96, :64]  # yet another size and batch
    out = net(x)
    seg, cls = net.probabilities(x)
    assert out[M.SEG].shape == (1, 2, 24, 16) and out[M.CLS].shape == (1, 2)
    torch.testing.assert_close(torch.softmax(out[M.SEG], 1)[:, 1:2], seg, atol=2e-6, rtol=0)
    torch.testing.assert_close(torch.softmax(out[M.CLS], 1)[:, 1:2], cls, atol=2e-6, rtol=0)


def test_engine_runs_exported_onnx_like_the_eager_ensemble(exported, loaded, shared):
    """The engine, unchanged, averages 2 models x 5 TTA itself; the ONNX file must give the same map."""
    with geo_io.open_raster(shared / SCENE) as ds:
        rgb, _ = geo_io.read_window(ds, Window(1400, 850, 192, 128))  # two overlapping windows
    common = {"widths": [TRACE], "tile_size": TRACE, "overlap": 32, "batch_size": 10, "precision": "fp32"}
    eager = engine.Engine(list(exported["eager"].models), tta=TTA, **common)
    ours = engine.Engine([loaded["onnx"]], tta=["none"], **common)
    ref, got = eager.predict_array(rgb), ours.predict_array(rgb)
    assert got.shape == (128, 192)
    assert np.abs(got - ref).max() < 1e-4
    assert abs(ours.stats.cls_prob - eager.stats.cls_prob) < 1e-4


def test_ensemble_batched_tta_equals_one_call_per_transform(exported, tiles):
    models = list(exported["eager"].models)
    x = tiles[:, :, :64, :96]
    with torch.no_grad():
        batched = X.EnsembleTTA(models, TTA, batch_tta=True)(x)
        single = X.EnsembleTTA(models, TTA, batch_tta=False)(x)
        # an hflip-only ensemble is the flipped prediction on the flipped tile
        flipped = X.EnsembleTTA(models[:1], ["hflip"])(x)[0]
        direct = torch.softmax(models[0](x.flip(-1))[M.SEG], 1)[:, 1:2].flip(-1)
    for a, b in zip(batched, single):
        assert (a - b).abs().max().item() < 1e-5
    assert (flipped - direct).abs().max().item() < 1e-5


@pytest.mark.parametrize("kind", ["torchscript", "onnx"])
def test_wrong_input_size_or_channels_is_refused(loaded, kind):
    net = loaded[kind]
    with pytest.raises(UserError, match="multiples of 32"):
        net(torch.zeros(1, 3, 100, 128))
    with pytest.raises(UserError, match="4 channels; this model takes 3"):
        net(torch.zeros(1, 4, 64, 64))


@pytest.mark.parametrize("suffix", [".onnx", ".torchscript"])
def test_corrupt_or_foreign_export_is_refused_in_one_line(exported, tmp_path, suffix):
    good = exported["result"]["onnx" if suffix == ".onnx" else "torchscript"].read_bytes()
    truncated = tmp_path / f"truncated{suffix}"
    truncated.write_bytes(good[: len(good) // 2])
    garbage = tmp_path / f"garbage{suffix}"
    garbage.write_bytes(b"not a model at all\n" * 10)
    for path in (truncated, garbage):
        with pytest.raises(UserError, match="re-export it with export.py") as err:
            X.load_exported(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserError, match="not found"):
        X.load_exported(tmp_path / f"missing{suffix}")


def test_torchscript_without_metadata_is_refused(tmp_path):
    path = tmp_path / "plain.torchscript"
    torch.jit.save(torch.jit.trace(torch.nn.Conv2d(3, 2, 1), torch.zeros(1, 3, 32, 32)), str(path))
    with pytest.raises(UserError, match="not exported by this toolkit"):
        X.load_exported(path)


def test_is_exported_path_tells_torchscript_archives_from_checkpoints(exported, tmp_path):
    ts_as_pt = tmp_path / "model.pt"
    ts_as_pt.write_bytes(exported["result"]["torchscript"].read_bytes())
    checkpoint_pt = tmp_path / "checkpoint.pt"
    checkpoint_pt.write_bytes(exported["checkpoints"][0].read_bytes())
    assert zipfile.is_zipfile(checkpoint_pt)  # both are zip archives; only one holds a graph
    assert X.is_exported_path(ts_as_pt)
    assert not X.is_exported_path(checkpoint_pt)
    assert not X.is_exported_path(exported["checkpoints"][0])
    assert X.is_exported_path(exported["result"]["onnx"])
    assert X.is_exported_path(tmp_path / "not_yet_written.onnx")
    assert not X.is_exported_path(tmp_path / "missing.pt")
    assert isinstance(X.load_any(ts_as_pt), X.TorchScriptModel)
    assert isinstance(X.load_any(checkpoint_pt), M.EfficientFPN)
    with pytest.raises(UserError, match="cannot change an exported model"):
        X.load_any(ts_as_pt, model_name="efficientnet-b1")


@pytest.mark.parametrize("override, message", [
    ("width=100", "multiple of 32"),
    ("formats=[tflite]", "choose one or both"),
    ("tta=[spin]", "unknown transform"),
    ("opset=13", "at least 17"),
])
def test_cli_rejects_bad_arguments_before_writing(exported, tmp_path, override, message):
    ckpt = exported["checkpoints"][0]
    cfg = compose_config("export", [f"model={ckpt}", "width=64", f"output={tmp_path / 'x'}", override])
    with pytest.raises(UserError, match=message):
        X.run(cfg)
    assert not list(tmp_path.iterdir())


def test_cli_refuses_an_exported_file_as_input(exported, tmp_path):
    cfg = compose_config("export", [f"model={exported['result']['onnx']}", f"output={tmp_path / 'x'}"])
    with pytest.raises(UserError, match="already an exported model"):
        X.run(cfg)


def test_output_stem_defaults_beside_checkpoint_and_accepts_dirs(tmp_path):
    ckpts = [tmp_path / "m40000.pth", tmp_path / "ave.pth"]
    assert X.output_stem(None, ckpts[:1], ["none"]) == tmp_path / "m40000"
    assert X.output_stem(None, ckpts, TTA) == tmp_path / "m40000-ens2-tta5"
    assert X.output_stem(str(tmp_path), ckpts[:1], TTA) == tmp_path / "m40000-tta5"
    assert X.output_stem(str(tmp_path / "new") + "/", ckpts[:1], ["none"]) == tmp_path / "new" / "m40000"
    assert X.output_stem(str(tmp_path / "b1.v2.onnx"), ckpts, TTA) == tmp_path / "b1.v2"

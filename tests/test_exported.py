"""lib/exported.py: TorchScript/ONNX graphs of a models x TTA ensemble that match eager PyTorch and run like a model."""

import json

import numpy as np
import pytest
import torch
from rasterio.windows import Window
from torch import nn

import model as M
from lib import exported as E
from lib.checkpoints import save_checkpoint
from lib.cli import VERSION
from lib.errors import UserError
from lib.files import file_sha256
from lib.tiling import Engine

# TorchScript is deprecated upstream but is one of the two formats this feature writes
pytestmark = [pytest.mark.filterwarnings("ignore:`torch\\.jit:DeprecationWarning"),
              pytest.mark.usefixtures("one_torch_thread")]

TTA = ["none", "hflip", "vflip", "hvflip", "transpose"]
TRACE = 128  # traced at 1 x 128 x 128; checked at other batches and (non-square) sizes
SCENE = "data/kampala/kam/81046528/81046528.tif"


class Tiny(nn.Module):
    """Honours the model contract ({SEG at stride 4, CLS}) with one conv: exports in a fraction of a second.

    The conv mixes neighbouring pixels, so a transform undone the wrong way changes the output.
    """

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.config = {"model_name": "tiny", "in_channels": 3}
        self.conv = nn.Conv2d(3, 2, 3, padding=1)

    def forward(self, x):
        seg = nn.functional.avg_pool2d(self.conv(x), 4)
        return {M.SEG: seg, M.CLS: seg.mean((2, 3))}


def _saved(nets, folder, stem: str) -> list:
    """Each network saved as <folder>/<stem><i>.pth (the source checkpoints of an export)."""
    sources = [folder / f"{stem}{i}.pth" for i in range(len(nets))]
    for path, net in zip(sources, nets):
        save_checkpoint(path, net)
    return sources


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny ensemble (2 models x 3 TTA), its source files, and both graphs written beside them."""
    tmp = tmp_path_factory.mktemp("tiny")
    nets = [Tiny(0).eval(), Tiny(1).eval()]
    sources = _saved(nets, tmp, "tiny")
    ensemble = E.EnsembleTTA(nets, ["none", "hflip", "transpose_vflip"])
    graphs = E.export_checked(ensemble, E.FORMATS, sources, 64, batch_size=1)
    paths = {}
    for kind, (artefact, meta) in graphs.items():
        paths[kind] = tmp / f"tiny{E.SUFFIXES[kind]}"
        E.write_exported(paths[kind], kind, artefact, meta)
    return {"ensemble": ensemble, "graphs": graphs, "paths": paths, "sources": sources}


def test_export_checked_records_provenance_and_the_check(tiny):
    for kind, (_, meta) in tiny["graphs"].items():
        assert meta["format"] == E.EXPORT_FORMAT and meta["kind"] == kind and meta["version"] == VERSION
        assert meta["tta"] == ["none", "hflip", "transpose_vflip"] and meta["input_channels"] == 3
        assert [m["sha256"] for m in meta["models"]] == [file_sha256(p) for p in tiny["sources"]]
        assert meta["check"]["max_abs_diff"] <= E.CHECK_TOLERANCE and meta["check"]["input_shape"] == [2, 3, 32, 64]
    assert tiny["graphs"]["onnx"][1]["opset"] >= E.MIN_OPSET


@pytest.mark.parametrize("kind", E.FORMATS)
def test_tiny_graph_reproduces_eager_on_another_batch_and_size(tiny, kind):
    x = torch.randn(3, 3, 96, 64)
    with torch.no_grad():
        ref = tiny["ensemble"](x)
    net = E.load_exported(tiny["paths"][kind])
    got = net.probabilities(x)
    assert got[0].shape == (3, 1, 24, 16) and got[1].shape == (3, 1)
    assert max((a - b).abs().max().item() for a, b in zip(got, ref)) < 1e-5
    assert net.config["tta"] == ["none", "hflip", "transpose_vflip"] and net.config["model_name"] == "tiny"


def test_export_check_failure_raises_before_anything_is_written(tiny, monkeypatch):
    monkeypatch.setattr(E, "CHECK_TOLERANCE", -1.0)  # any difference, even 0, is too much
    with pytest.raises(E.ExportCheckError, match="differs from eager PyTorch"):
        E.export_checked(tiny["ensemble"], ["onnx"], tiny["sources"], 64)


def test_onnxruntime_models_exports_once_into_the_cache(tiny, tmp_path):
    net, source = tiny["ensemble"].models[0], tiny["sources"][0]
    (first,) = E.onnxruntime_models([net], [source], tmp_path)
    cached = list(tmp_path.glob("*.onnx"))
    assert isinstance(first, E.OnnxModel) and len(cached) == 1 and cached[0].name.startswith("tiny0-")
    mtime = cached[0].stat().st_mtime_ns
    (again,) = E.onnxruntime_models([net], [source], tmp_path)
    assert cached[0].stat().st_mtime_ns == mtime  # reused, not re-exported
    assert E.onnxruntime_models([again], [cached[0]], tmp_path)[0] is again  # exported files pass through
    x = torch.randn(1, 3, 64, 32)
    with torch.no_grad():
        eager = torch.softmax(net(x)[M.SEG], 1)[:, 1:2]
    assert (torch.softmax(first(x)[M.SEG], 1)[:, 1:2] - eager).abs().max().item() < 1e-5


def test_onnx_session_refuses_bad_bytes_in_one_line():
    with pytest.raises(UserError, match="exported graph: not a readable ONNX model") as err:
        E.onnx_session(b"not onnx")
    assert "\n" not in str(err.value)


def test_ensemble_needs_models_with_one_input_width():
    with pytest.raises(UserError, match="at least one checkpoint"):
        E.EnsembleTTA([])
    four = Tiny()
    four.config = {"in_channels": 4}
    with pytest.raises(UserError, match="different numbers of input channels"):
        E.EnsembleTTA([Tiny(), four])


@pytest.mark.parametrize("kind", E.FORMATS)
def test_wrong_input_size_or_channels_is_refused(tiny, kind):
    net = E.load_exported(tiny["paths"][kind])
    with pytest.raises(UserError, match="multiples of 32"):
        net(torch.zeros(1, 3, 100, 128))
    with pytest.raises(UserError, match="4 channels; this model takes 3"):
        net(torch.zeros(1, 4, 64, 64))


@pytest.mark.parametrize("kind", E.FORMATS)
def test_corrupt_or_foreign_export_is_refused_in_one_line(tiny, tmp_path, kind):
    suffix = E.SUFFIXES[kind]
    good = tiny["paths"][kind].read_bytes()
    truncated = tmp_path / f"truncated{suffix}"
    truncated.write_bytes(good[: len(good) // 2])
    garbage = tmp_path / f"garbage{suffix}"
    garbage.write_bytes(b"not a model at all\n" * 10)
    for path in (truncated, garbage):
        with pytest.raises(UserError, match="re-export it with export.py") as err:
            E.load_exported(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserError, match="not found"):
        E.load_exported(tmp_path / f"missing{suffix}")


def test_torchscript_without_metadata_is_refused(tmp_path):
    path = tmp_path / "plain.torchscript"
    torch.jit.save(torch.jit.trace(torch.nn.Conv2d(3, 2, 1), torch.zeros(1, 3, 32, 32)), str(path))
    with pytest.raises(UserError, match="not exported by this toolkit"):
        E.load_exported(path)


def test_load_models_opens_exported_files_by_content_and_refuses_overrides(tiny, tmp_path):
    ts_as_pt = tmp_path / "model.pt"
    ts_as_pt.write_bytes(tiny["paths"]["torchscript"].read_bytes())
    ts, onnx_model = M.load_models([ts_as_pt, tiny["paths"]["onnx"]], model_name=None)
    assert isinstance(ts, E.TorchScriptModel) and isinstance(onnx_model, E.OnnxModel)
    with pytest.raises(UserError, match="cannot change an exported model"):
        M.load_models([ts_as_pt], model_name="efficientnet-b1")


# ----- the real network on real imagery -----------------------------------------------------------

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
def b0(tmp_path_factory):
    """Two b0 checkpoints exported as one 2-model x 5-TTA ensemble, opened again with load_exported."""
    tmp = tmp_path_factory.mktemp("b0")
    checkpoints = []
    for seed in range(2):
        checkpoints.append(tmp / f"b0_{seed}.pth")
        torch.manual_seed(seed)  # biases and the rest of the default init: independent of earlier tests
        save_checkpoint(checkpoints[-1], _lively(M.build_model("efficientnet-b0"), seed), meta={"gsd": 0.0746})
    eager = E.EnsembleTTA(M.load_models(checkpoints), TTA)
    loaded = {}
    for kind, (artefact, meta) in E.export_checked(eager, E.FORMATS, checkpoints, TRACE).items():
        path = tmp / f"ens{E.SUFFIXES[kind]}"
        E.write_exported(path, kind, artefact, meta)
        loaded[kind] = E.load_exported(path)
    return {"eager": eager, "loaded": loaded}


@pytest.fixture(scope="module")
def tiles(shared):
    """Two real 128 x 160 drone tiles (Kampala), normalised: batch and size differ from the trace."""
    from lib import geo_io

    with geo_io.open_raster(shared / SCENE) as ds:
        reads = [geo_io.read_window(ds, Window(col, 900, 160, 128)) for col in (1400, 1560)]
    assert all(valid.mean() > 0.99 for _, valid in reads)  # imagery, not the nodata margin
    rgb = [image for image, _ in reads]
    return M.normalize(torch.from_numpy(np.stack(rgb)).permute(0, 3, 1, 2))


@pytest.mark.slow
@pytest.mark.parametrize("kind", E.FORMATS)
def test_exported_graph_matches_eager_ensemble_on_real_tiles(b0, tiles, kind):
    with torch.no_grad():
        seg_ref, cls_ref = b0["eager"](tiles)
    seg, cls = b0["loaded"][kind].probabilities(tiles)
    assert seg.shape == (2, 1, 32, 40) and cls.shape == (2, 1)
    assert (seg - seg_ref).abs().max().item() < 1e-4
    assert (cls - cls_ref).abs().max().item() < 1e-4
    # the map varies within and between tiles, so a misplaced flip or batch item would show
    spread = (seg_ref.std().item(), (seg_ref[0] - seg_ref[1]).abs().max().item())
    assert spread[0] > 0.05 and spread[1] > 0.1, spread


@pytest.mark.slow
@pytest.mark.parametrize("kind", E.FORMATS)
def test_load_exported_answers_like_a_model_with_logits(b0, tiles, kind):
    net = b0["loaded"][kind]
    assert net.config["exported"] is True and net.config["tta"] == TTA
    assert net.meta["gsd"] == 0.0746  # the source models' training GSD, for match_gsd
    assert net.eval() is net and net.to("cpu") is net
    assert json.loads(json.dumps(net.provenance))["models"][0]["config"]["model_name"] == "efficientnet-b0"
    x = tiles[:1, :, :96, :64]  # yet another size and batch
    out = net(x)
    seg, cls = net.probabilities(x)
    assert out[M.SEG].shape == (1, 2, 24, 16) and out[M.CLS].shape == (1, 2)
    torch.testing.assert_close(torch.softmax(out[M.SEG], 1)[:, 1:2], seg, atol=2e-6, rtol=0)
    torch.testing.assert_close(torch.softmax(out[M.CLS], 1)[:, 1:2], cls, atol=2e-6, rtol=0)


@pytest.mark.slow
def test_engine_runs_exported_onnx_like_the_eager_ensemble(b0, shared):
    """The engine, unchanged, averages 2 models x 5 TTA itself; the ONNX file must give the same map."""
    from lib import geo_io

    with geo_io.open_raster(shared / SCENE) as ds:
        rgb, _ = geo_io.read_window(ds, Window(1400, 850, 192, 128))  # two overlapping windows
    common = {"widths": [TRACE], "tile_size": TRACE, "overlap": 32, "batch_size": 10, "precision": "fp32"}
    eager = Engine(list(b0["eager"].models), tta=TTA, **common)
    ours = Engine([b0["loaded"]["onnx"]], tta=["none"], **common)
    ref, got = eager.predict_array(rgb), ours.predict_array(rgb)
    assert got.shape == (128, 192)
    assert np.abs(got - ref).max() < 1e-4
    assert eager.stats.scores and ours.stats.scores.keys() == eager.stats.scores.keys()
    assert all(abs(ours.stats.scores[k] - eager.stats.scores[k]) < 1e-4 for k in eager.stats.scores)


@pytest.mark.slow
def test_ensemble_batched_tta_equals_one_call_per_transform(b0, tiles):
    models = list(b0["eager"].models)
    x = tiles[:, :, :64, :96]
    with torch.no_grad():
        batched = E.EnsembleTTA(models, TTA, batch_tta=True)(x)
        single = E.EnsembleTTA(models, TTA, batch_tta=False)(x)
        # an hflip-only ensemble is the flipped prediction on the flipped tile
        flipped = E.EnsembleTTA(models[:1], ["hflip"])(x)[0]
        direct = torch.softmax(models[0](x.flip(-1))[M.SEG], 1)[:, 1:2].flip(-1)
    for a, b in zip(batched, single):
        assert (a - b).abs().max().item() < 1e-5
    assert (flipped - direct).abs().max().item() < 1e-5


def test_a_file_naming_heads_this_version_cannot_read_is_refused(tiny, tmp_path):
    artefact, meta = tiny["graphs"]["torchscript"]
    path = tmp_path / "odd.torchscript"
    E.write_exported(path, "torchscript", artefact, {**meta, "heads": [["seg_prob", "seg", "cube_root"]]})
    with pytest.raises(UserError, match="names heads this version cannot read; re-export it") as err:
        E.load_exported(path)
    assert str(path) in str(err.value)


# --------------------------------------------------------------------------------------------------
# Models with the instance head: a third output, read back as INSTANCE logits
# --------------------------------------------------------------------------------------------------


class TinyWithHead(Tiny):
    """Tiny plus border/contact logits at stride 4, as a model built with instance_head=True."""

    def __init__(self, seed: int = 0):
        super().__init__(seed)
        self.config["instance_head"] = True
        self.border = nn.Conv2d(3, 2, 3, padding=1)

    def forward(self, x):
        return {**super().forward(x), M.INSTANCE: nn.functional.avg_pool2d(self.border(x), 4)}


def test_ensembles_of_models_with_the_head_export_the_instance_output(tmp_path):
    from lib.segmentation import has_instance_head

    nets = [TinyWithHead(0).eval(), TinyWithHead(1).eval()]
    sources = _saved(nets, tmp_path, "head")
    ensemble = E.EnsembleTTA(nets, ["none", "hflip", "transpose"])
    assert ensemble.output_names == ("seg_prob", "cls_prob", "instance_prob")
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        ref = ensemble(x)
        direct = torch.sigmoid(nets[0](x.flip(-1))[M.INSTANCE]).flip(-1)
        assert (E.EnsembleTTA(nets[:1], ["hflip"])(x)[2] - direct).abs().max().item() < 1e-6
    assert ref[2].shape == (2, 2, 16, 24)
    for kind, (artefact, meta) in E.export_checked(ensemble, E.FORMATS, sources, 64).items():
        assert meta["output_names"][2] == "instance_prob" and "border (channel 0)" in meta["outputs"]["instance_prob"]
        path = tmp_path / f"head{E.SUFFIXES[kind]}"
        E.write_exported(path, kind, artefact, meta)
        net = E.load_exported(path)
        got = net.probabilities(x)  # ONNX Runtime / TorchScript against eager PyTorch
        assert max((a - b).abs().max().item() for a, b in zip(got, ref)) < 1e-5
        out = net(x)
        assert set(out) == {M.SEG, M.CLS, M.INSTANCE} and has_instance_head(net) and net.config["instance_head"]
        torch.testing.assert_close(torch.sigmoid(out[M.INSTANCE]), ref[2], atol=2e-6, rtol=0)
        torch.testing.assert_close(torch.softmax(out[M.SEG], 1)[:, 1:2], ref[0], atol=2e-6, rtol=0)
    # one model without the head: the ensemble exports exactly as before
    mixed = E.EnsembleTTA([nets[0], Tiny(2).eval()], ["none"])
    assert mixed.output_names == E.OUTPUT_NAMES and mixed.task_meta() == {}


@pytest.mark.slow
def test_b0_with_the_instance_head_onnx_runtime_parity(tmp_path, tiles):
    torch.manual_seed(0)
    path = tmp_path / "b0_head.pth"
    save_checkpoint(path, _lively(M.build_model("efficientnet-b0", instance_head=True), 3))
    ensemble = E.EnsembleTTA(M.load_models([path]), ["none", "hflip"])
    ((artefact, meta),) = E.export_checked(ensemble, ["onnx"], [path], TRACE).values()
    E.write_exported(tmp_path / "b0_head.onnx", "onnx", artefact, meta)
    net = E.load_exported(tmp_path / "b0_head.onnx")
    with torch.no_grad():
        ref = ensemble(tiles)
    got = net.probabilities(tiles)
    assert got[2].shape == (2, 2, 32, 40) and (got[2] - ref[2]).abs().max().item() < 1e-4
    assert ref[2].std().item() > 0.01  # a map that varies, so a misplaced flip would show
    assert meta["check"]["max_abs_diff"] <= E.CHECK_TOLERANCE

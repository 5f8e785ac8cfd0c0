"""lib/point_export.py + export.py for CircleNet: traced point ensembles that match eager PyTorch, run in the
engine and in `inference.py task=points` like the checkpoints they came from."""

import importlib.util
import json

import numpy as np
import pandas as pd
import pytest
import torch

import circlenet as C
import export as X
import inference
import model as M
from lib import exported as E
from lib import point_contract as P
from lib import point_export as PE
from lib.checkpoints import save_checkpoint
from lib.cli import compose_config
from lib.errors import UserError
from lib.point_decoding import PointDecoder
from lib.point_inference import detect_scene
from lib.sar import SarSource
from lib.sar_demo import make_sar_demo
from lib.tiling import Engine
from lib.tta import TTA_NAMES, tta_inverse_vectors

# TorchScript is deprecated upstream but is one of the two formats export.py writes
pytestmark = [pytest.mark.filterwarnings("ignore:`torch\\.jit:DeprecationWarning"),
              pytest.mark.usefixtures("one_torch_thread")]

SMALL = {"model_name": "efficientnet-b0", "decoder_channels": (64, 32, 32, 16), "head_channels": 16}
TTA = ["none", "hflip", "transpose_vflip"]  # a flip, and a transpose composed with a flip
HAS_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime"))
KINDS = [k for k in E.FORMATS if k != "onnx" or HAS_ONNX]
SAR = {"channels": ["VV", "VH"], "scale": [3.0, 3.0], "offset": [-18.0, -25.0], "gsd": 10.0}
POSTPROCESS = {"objectness_threshold": 0.12, "vessel_threshold": 0.4, "fishing_threshold": 0.6}
THRESHOLD = POSTPROCESS["objectness_threshold"]  # a freshly initialised CircleNet's objectness is ~0.1


def _kinds(kinds):
    """Parametrize over formats; ONNX is skipped (not failed) where onnx/onnxruntime are not installed."""
    mark = pytest.mark.skipif(not HAS_ONNX, reason="onnx and onnxruntime are not installed")
    return [pytest.param(k, marks=mark) if k == "onnx" else k for k in kinds]


def _circlenet(seed: int) -> C.CircleNet:
    torch.manual_seed(seed)
    return C.build_circlenet(**SMALL, pretrained=False).eval()


@pytest.fixture(scope="module")
def point_files(tmp_path_factory):
    """Two small CircleNet checkpoints (SAR + tuned thresholds in their meta), their eager 2-model x 3-TTA
    ensemble, and its exported graphs written and opened again."""
    tmp = tmp_path_factory.mktemp("points")
    sources = []
    for seed in range(2):
        sources.append(tmp / f"circlenet{seed}.pth")
        save_checkpoint(sources[-1], _circlenet(seed),
                        meta={"task": "points", "sar": SAR, "width": 64, "postprocess": POSTPROCESS})
    cfg = compose_config("export", [f"model=[{sources[0]},{sources[1]}]", f"tta=[{','.join(TTA)}]", "width=64",
                                    f"output={tmp}/", f"formats=[{','.join(KINDS)}]"])
    result = X.run(cfg)
    models = M.load_models(sources)
    return {"sources": sources, "models": models, "eager": PE.PointEnsembleTTA(models, TTA), "result": result,
            "loaded": {k: E.load_exported(result[k]) for k in KINDS}, "tmp": tmp}


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """One synthetic 256 px SAR scene in the xView3 layout."""
    return make_sar_demo(tmp_path_factory.mktemp("sar"), n_scenes=1, size=256).scenes[0]


def test_inverse_offsets_is_tta_inverse_vectors_for_every_transform():
    y = torch.randn(3, 2, 5, 7)
    for name in TTA_NAMES:
        assert torch.equal(PE.inverse_offsets(y, name), tta_inverse_vectors(y, name, ((0, 1),))), name
    assert not torch.equal(PE.inverse_offsets(y, "transpose_hflip"), PE.inverse_offsets(y, "transpose_vflip"))


def test_ensemble_undoes_flips_and_transposes_on_the_offsets():
    """An hflip-only ensemble is the model on the flipped input, flipped back, with dx negated; a transposed
    one swaps dy and dx back."""
    net = _circlenet(0)
    x = torch.rand(1, 2, 64, 96)
    with torch.no_grad():
        out = dict(zip(PE.OUTPUT_NAMES, PE.PointEnsembleTTA([net], ["hflip"])(x)))
        direct = net(x.flip(-1))[P.OFFSET].flip(-1)
        swapped = dict(zip(PE.OUTPUT_NAMES, PE.PointEnsembleTTA([net], ["transpose"])(x)))
        direct_t = net(x.transpose(-2, -1))[P.OFFSET].transpose(-2, -1)
        objectness = torch.sigmoid(net(x.flip(-1))[P.OBJECTNESS]).flip(-1)
    torch.testing.assert_close(out["offset"], torch.cat([direct[:, :1], -direct[:, 1:]], 1))
    torch.testing.assert_close(swapped["offset"], direct_t.flip(1))
    torch.testing.assert_close(out["objectness_prob"], objectness)
    assert out["offset"].shape == (1, 2, 32, 48) and out["offset"].abs().max() > 0.01


def test_a_mixed_segmentation_and_circlenet_list_is_refused_in_one_line(checkpoints, tmp_path):
    circle = tmp_path / "circlenet.pth"
    save_checkpoint(circle, _circlenet(0))
    out = tmp_path / "out"
    cfg = compose_config("export", [f"model=[{checkpoints['b0']},{circle}]", "width=64", f"output={out}/"])
    with pytest.raises(UserError, match="b0.pth is a segmentation checkpoint but circlenet.pth is a points one") as err:
        X.run(cfg)
    assert "\n" not in str(err.value) and not out.exists()


def test_an_ensemble_of_circlenets_trained_on_different_sar_inputs_is_refused():
    nets = [_circlenet(0), _circlenet(1)]
    nets[0].meta, nets[1].meta = {"sar": SAR}, {"sar": {**SAR, "offset": [-20.0, -25.0]}}
    with pytest.raises(UserError, match="different SAR channels or normalisation"):
        PE.PointEnsembleTTA(nets)


@pytest.mark.slow
def test_export_writes_point_graphs_with_task_heads_and_inference_meta(point_files):
    result = point_files["result"]
    assert set(result["check"]) == set(KINDS) and max(result["check"].values()) <= E.CHECK_TOLERANCE
    for kind in KINDS:
        assert result[kind].name == f"circlenet0-ens2-tta3{E.SUFFIXES[kind]}"
        net = point_files["loaded"][kind]
        meta = net.provenance
        assert meta["task"] == "points" and meta["tta"] == TTA and meta["output_stride"] == 2
        assert meta["output_names"] == list(PE.OUTPUT_NAMES) and meta["check"]["input_shape"] == [2, 2, 32, 64]
        assert [h[1] for h in meta["heads"]] == list(P.HEADS)
        assert meta["meta"] == {"task": "points", "sar": SAR, "postprocess": POSTPROCESS, "width": 64, "gsd": 10.0}
        # what inference.py task=points reads from a model
        assert net.config["task"] == "points" and net.config["exported"] is True and net.config["in_channels"] == 2
        assert net.meta["sar"] == SAR and net.meta["postprocess"] == POSTPROCESS and net.meta["gsd"] == 10.0
        assert json.loads(json.dumps(meta))["models"][1]["config"]["arch"] == "circlenet"


@pytest.mark.slow
@pytest.mark.parametrize("kind", _kinds(E.FORMATS))
def test_exported_point_graph_matches_the_eager_ensemble_and_answers_with_heads(point_files, kind):
    net = point_files["loaded"][kind]
    x = torch.randint(0, 256, (3, 2, 96, 64), dtype=torch.uint8).float() / 255  # another batch and size
    with torch.no_grad():
        ref = point_files["eager"](x)
    got = net.probabilities(x)
    assert [tuple(g.shape) for g in got] == [(3, c, 48, 32) for c in (1, 1, 2, 1, 1)]
    assert max((a - b).abs().max().item() for a, b in zip(got, ref)) < E.CHECK_TOLERANCE
    heads = net(x)
    assert list(heads) == list(P.HEADS)
    probs = dict(zip(PE.OUTPUT_NAMES, got))
    for head, name in ((P.OBJECTNESS, "objectness_prob"), (P.VESSEL, "vessel_prob"), (P.FISHING, "fishing_prob")):
        torch.testing.assert_close(torch.sigmoid(heads[head]), probs[name], atol=2e-6, rtol=0)
    assert torch.equal(heads[P.OFFSET], probs["offset"]) and torch.equal(heads[P.LENGTH], probs["length"])
    with pytest.raises(UserError, match="3 channels; this model takes 2"):
        net(torch.zeros(1, 3, 64, 64))


@pytest.mark.slow
@pytest.mark.parametrize("kind", _kinds(E.FORMATS))
def test_engine_finds_the_same_detections_on_the_export_as_on_the_eager_models(point_files, scene, kind):
    common = {"widths": [128], "tile_size": 128, "overlap": 32, "batch_size": 6, "precision": "fp32"}
    eager = Engine(point_files["models"], tta=TTA, decoder=PointDecoder(), **common)
    ours = Engine([point_files["loaded"][kind]], tta=["none"], decoder=PointDecoder(), **common)
    plain = Engine(point_files["models"], tta=["none"], decoder=PointDecoder(), **common)
    with SarSource(scene) as src:
        ref, got, untransformed = (detect_scene(e, src, THRESHOLD) for e in (eager, ours, plain))
    assert len(ref) >= 20 and len(got) == len(ref)
    np.testing.assert_allclose(got.to_numpy(), ref.to_numpy(), rtol=0, atol=1e-4)
    # the TTA changes the detections, so a transform undone the wrong way would show
    assert len(untransformed) != len(ref) or np.abs(untransformed.to_numpy() - ref.to_numpy()).max() > 1e-3


@pytest.mark.slow
def test_inference_task_points_runs_an_exported_file_like_its_checkpoints(point_files, scene, tmp_path):
    kind = KINDS[-1]  # ONNX where installed
    common = ["task=points", f"data_dir={scene}", "tile_size=128", "overlap=32", "batch_size=6", "progress=false",
              "precision=fp32"]
    srcs = point_files["sources"]
    eager = inference.run(compose_config("inference", [*common, f"model=[{srcs[0]},{srcs[1]}]",
                                                       f"tta=[{','.join(TTA)}]", f"output_dir={tmp_path / 'eager'}"]))
    ours = inference.run(compose_config("inference", [*common, f"model={point_files['result'][kind]}", "tta=[none]",
                                                      f"output_dir={tmp_path / 'export'}"]))
    assert ours["thresholds"] == eager["thresholds"] == POSTPROCESS  # the tuned values travel with the export
    ref, got = (pd.read_csv(tmp_path / d / "detections.csv") for d in ("eager", "export"))
    assert len(ref) >= 20 and len(got) == len(ref) == ours["detections"]
    numeric = ref.select_dtypes("number").columns
    np.testing.assert_allclose(got[numeric].to_numpy(), ref[numeric].to_numpy(), rtol=0, atol=1e-3)
    others = [c for c in ref.columns if c not in numeric]
    pd.testing.assert_frame_equal(got[others], ref[others])

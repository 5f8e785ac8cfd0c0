"""export.py: the command line over lib.exported (graphs and their parity are tested in test_exported.py)."""

import json

import onnx
import pytest
import torch

import export as X
from lib import exported as E
from lib.cli import VERSION, compose_config
from lib.errors import UserError
from lib.files import file_sha256

# TorchScript is deprecated upstream but is one of the two formats this command writes
pytestmark = [pytest.mark.filterwarnings("ignore:`torch\\.jit:DeprecationWarning"),
              pytest.mark.usefixtures("one_torch_thread")]

TTA = ["none", "hflip"]


@pytest.mark.slow
def test_cli_writes_both_files_with_provenance_metadata(checkpoints, tmp_path):
    sources = [checkpoints["b0"], checkpoints["full"]]
    cfg = compose_config("export", [f"model=[{sources[0]},{sources[1]}]", f"tta=[{','.join(TTA)}]", "width=64",
                                    f"output={tmp_path}/", "formats=[torchscript,onnx]"])
    result = X.run(cfg)
    assert result["onnx"] == tmp_path / "b0-ens2-tta2.onnx"
    assert result["torchscript"] == tmp_path / "b0-ens2-tta2.torchscript"
    assert set(result["check"]) == {"onnx", "torchscript"} and max(result["check"].values()) <= E.CHECK_TOLERANCE
    props = {p.key: p.value for p in onnx.load(str(result["onnx"]), load_external_data=False).metadata_props}
    extra = {E.META_KEY: ""}
    torch.jit.load(str(result["torchscript"]), _extra_files=extra)
    for kind, meta in (("onnx", json.loads(props[E.META_KEY])), ("torchscript", json.loads(extra[E.META_KEY]))):
        assert meta["kind"] == kind and meta["version"] == VERSION and meta["tta"] == TTA
        assert [m["sha256"] for m in meta["models"]] == [file_sha256(p) for p in sources]
        assert [m["config"]["model_name"] for m in meta["models"]] == ["efficientnet-b0"] * 2
        assert meta["check"]["input_shape"] == [2, 3, 32, 64] and meta["trace_size"] == [64, 64]
    assert json.loads(props[E.META_KEY])["opset"] == 17


@pytest.mark.slow
def test_cli_writes_nothing_when_the_check_fails(checkpoints, tmp_path, monkeypatch):
    monkeypatch.setattr(E, "CHECK_TOLERANCE", -1.0)
    cfg = compose_config("export", [f"model={checkpoints['b0']}", "width=64", f"output={tmp_path / 'x'}",
                                    "formats=[onnx]"])
    with pytest.raises(E.ExportCheckError, match="nothing was written"):
        X.run(cfg)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("override, message", [
    ("width=100", "multiple of 32"),
    ("formats=[tflite]", "choose one or both"),
    ("tta=[spin]", "unknown transform"),
    ("opset=13", "at least 17"),
])
def test_cli_rejects_bad_arguments_before_writing(checkpoints, tmp_path, override, message):
    cfg = compose_config("export", [f"model={checkpoints['b0']}", "width=64", f"output={tmp_path / 'x'}", override])
    with pytest.raises(UserError, match=message):
        X.run(cfg)
    assert not list(tmp_path.iterdir())


def test_cli_requires_a_checkpoint_and_refuses_an_exported_file(tmp_path):
    with pytest.raises(UserError, match="model=<checkpoint.pth> is required"):
        X.run(compose_config("export", [f"output={tmp_path / 'x'}"]))
    with pytest.raises(UserError, match="already an exported model"):
        X.run(compose_config("export", [f"model={tmp_path / 'ens.onnx'}", f"output={tmp_path / 'x'}"]))


def test_output_stem_defaults_beside_checkpoint_and_accepts_dirs(tmp_path):
    ckpts = [tmp_path / "m40000.pth", tmp_path / "ave.pth"]
    tta5 = ["none", "hflip", "vflip", "hvflip", "transpose"]
    assert X.output_stem(None, ckpts[:1], ["none"]) == tmp_path / "m40000"
    assert X.output_stem(None, ckpts, tta5) == tmp_path / "m40000-ens2-tta5"
    assert X.output_stem(str(tmp_path), ckpts[:1], tta5) == tmp_path / "m40000-tta5"
    assert X.output_stem(str(tmp_path / "new") + "/", ckpts[:1], ["none"]) == tmp_path / "new" / "m40000"
    assert X.output_stem(str(tmp_path / "b1.v2.onnx"), ckpts, tta5) == tmp_path / "b1.v2"


def test_onnx_without_its_packages_is_a_one_line_error(checkpoints, tmp_path, monkeypatch):
    real = X.importlib.util.find_spec
    monkeypatch.setattr(X.importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    cfg = compose_config("export", [f"model={checkpoints['b0']}", "width=64", f"output={tmp_path / 'x'}"])
    with pytest.raises(UserError, match=r"needs the onnxruntime package\(s\); install them or give formats=\[torchscript\]"):
        X.run(cfg)
    assert not list(tmp_path.iterdir())

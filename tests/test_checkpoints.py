"""lib/checkpoints.py: every model file format told apart, read weights-only, bad files refused in one line."""

import pickle

import numpy as np
import pytest
import torch
from torch import nn

from lib import checkpoints as C
from lib.errors import UserError
from lib.files import file_sha256


class Tiny(nn.Module):
    """A network with a `.config`, as save_checkpoint expects, small enough to write in milliseconds."""

    def __init__(self):
        super().__init__()
        self.config = {"model_name": "tiny", "in_channels": 3}
        self.conv = nn.Conv2d(3, 2, 1)
        self.bn = nn.BatchNorm2d(2)

    def forward(self, x):
        return self.bn(self.conv(x))


class Payload:
    """Stands in for any pickled object that `weights_only` loading must not execute."""


@pytest.fixture
def native(tmp_path):
    path = tmp_path / "native.pth"
    C.save_checkpoint(path, Tiny(), step=7, optimizer={"state": {}, "param_groups": []},
                      rng={"numpy": np.random.get_state()}, metrics={"iou": np.float64(0.5)},
                      meta={"gsd": 0.1})
    return path


def test_native_round_trip_keeps_weights_config_meta_and_train_state(tmp_path):
    net, native = Tiny(), tmp_path / "last.pth"
    C.save_checkpoint(native, net, step=7, metrics={"iou": np.float64(0.5)}, meta={"gsd": 0.1})
    ckpt = C.read_checkpoint(native)
    assert ckpt.format == "native" and ckpt.model_config == net.config
    assert all(torch.equal(ckpt.state_dict[k], v) for k, v in net.state_dict().items())
    assert set(ckpt.state_dict) == set(net.state_dict())
    assert ckpt.meta["gsd"] == 0.1 and ckpt.meta["version"] and ckpt.meta["created"]
    assert ckpt.extra == {"step": 7, "metrics": {"iou": 0.5}}
    assert ckpt.sha256 == file_sha256(native)
    assert not list(native.parent.glob(".*"))  # no temporary file left beside it


def test_native_file_is_plain_data_loadable_weights_only(native):
    raw = torch.load(native, weights_only=True)
    assert raw["format"] == C.CHECKPOINT_FORMAT and raw["format_version"] == C.CHECKPOINT_FORMAT_VERSION
    assert raw["rng"]["numpy"][1].shape == (624,) and isinstance(raw["rng"]["numpy"][1], torch.Tensor)
    assert C.load_checkpoint(native)["step"] == 7


def test_unstorable_objects_and_reserved_keys_refused_when_saving(tmp_path):
    with pytest.raises(TypeError, match="cannot store Payload"):
        C.save_checkpoint(tmp_path / "x.pth", Tiny(), extra=Payload())
    with pytest.raises(TypeError, match="'state_dict' is reserved"):
        C.save_checkpoint(tmp_path / "x.pth", Tiny(), state_dict={})
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("layout", ["bare", "state_dict", "ddp"])
def test_seed_checkpoints_read_as_weights_without_config(tmp_path, layout):
    weights = Tiny().state_dict()
    stored = {"bare": weights, "state_dict": {"state_dict": weights, "epoch": 3},
              "ddp": {"state_dict": {f"module._orig_mod.{k}": v for k, v in weights.items()}}}[layout]
    path = tmp_path / "m40000.pth"
    torch.save(stored, path)
    ckpt = C.read_checkpoint(path)
    assert ckpt.format == "seed" and ckpt.model_config is None
    assert set(ckpt.state_dict) == set(weights)
    assert ckpt.extra == ({"epoch": 3} if layout == "state_dict" else {})


def test_safetensors_read_with_and_without_metadata(tmp_path):
    from safetensors.torch import save_file

    weights = {k: v.contiguous() for k, v in Tiny().state_dict().items()}
    bare, described = tmp_path / "bare.safetensors", tmp_path / "ours.safetensors"
    save_file(weights, str(bare))
    save_file(weights, str(described), metadata={"model_config": '{"model_name": "tiny"}', "meta": '{"gsd": 0.2}'})
    plain, ours = C.read_checkpoint(bare), C.read_checkpoint(described)
    assert plain.format == ours.format == "safetensors"
    assert plain.model_config is None and ours.model_config == {"model_name": "tiny"} and ours.meta == {"gsd": 0.2}
    assert all(torch.equal(ours.state_dict[k], v) for k, v in weights.items())


@pytest.mark.filterwarnings("ignore:`torch\\.jit:DeprecationWarning")
def test_exported_graphs_told_apart_from_checkpoints(tmp_path, native):
    traced = tmp_path / "graph.pt"
    torch.jit.save(torch.jit.trace(nn.Conv2d(3, 2, 1), torch.zeros(1, 3, 8, 8)), str(traced))
    copy = tmp_path / "checkpoint.pt"
    copy.write_bytes(native.read_bytes())  # a torch.save file is a zip archive too
    assert C.exported_kind(traced) == "torchscript"  # by its contents, whatever the suffix
    assert C.exported_kind(copy) is None and C.exported_kind(native) is None
    assert C.exported_kind(tmp_path / "not_yet_written.onnx") == "onnx"
    assert C.exported_kind(tmp_path / "x.TorchScript") == "torchscript"
    assert C.exported_kind(tmp_path / "missing.pt") is None
    with pytest.raises(UserError, match="is an exported torchscript model"):
        C.read_checkpoint(traced)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_checkpoint_refused_with_one_line(native, damage):
    raw = native.read_bytes()
    bad = native.with_name(f"{damage}.pth")
    bad.write_bytes({"truncated": raw[: len(raw) // 2], "garbage": b"not a checkpoint" * 64, "empty": b""}[damage])
    with pytest.raises(UserError) as err:
        C.read_checkpoint(bad)
    msg = str(err.value)
    assert str(bad) in msg and "\n" not in msg
    assert ("empty" if damage == "empty" else "corrupt") in msg


def test_damaged_safetensors_refused_with_one_line(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(UserError, match="not a readable safetensors file") as err:
        C.read_checkpoint(bad)
    assert str(bad) in str(err.value) and "\n" not in str(err.value)


def test_checkpoint_with_pickled_object_refused(tmp_path):
    path = tmp_path / "pickled.pth"
    torch.save({"state_dict": Tiny().state_dict(), "extra": Payload()}, path)
    with pytest.raises(UserError, match="pickled Python objects") as err:
        C.read_checkpoint(path)
    assert str(path) in str(err.value)
    with pytest.raises(pickle.UnpicklingError):  # the refusal comes from torch's weights-only loader
        torch.load(path, weights_only=True)


def test_files_without_weights_refused(tmp_path):
    listed, empty_dict = tmp_path / "list.pth", tmp_path / "dict.pth"
    torch.save([torch.zeros(1)], listed)
    torch.save({"step": 3}, empty_dict)
    with pytest.raises(UserError, match="holds a list"):
        C.read_checkpoint(listed)
    with pytest.raises(UserError, match="no model weights found"):
        C.read_checkpoint(empty_dict)


def test_missing_checkpoint_and_directory_refused(tmp_path):
    with pytest.raises(UserError, match="not found"):
        C.read_checkpoint(tmp_path / "nope.pth")
    with pytest.raises(UserError, match="directory"):
        C.read_checkpoint(tmp_path)


def test_unwrap_and_strip_wrappers_undo_data_parallel_and_compile():
    net = Tiny()
    assert C.unwrap(nn.DataParallel(net)) is net
    assert C.strip_wrappers({"module._orig_mod.conv.weight": 1, "bn.bias": 2}) == {"conv.weight": 1, "bn.bias": 2}

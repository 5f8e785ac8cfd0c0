"""backend=auto's timed trial (lib.backend_trial, lib.backends) and the OpenVINO backend."""

import json

import numpy as np
import pytest
import rasterio
import torch
from standins import infer_cfg, read

from lib import backend_trial
from lib.backend_trial import Candidate
from lib.devices import cpu_has_native_bf16
from lib.errors import UserError

CPU = torch.device("cpu")


def _installed(name):
    try:
        __import__(name)
    except ImportError:
        return False
    return True


def test_candidates_follow_the_machine_and_are_narrowed_by_the_options():
    names = [c.name for c in backend_trial.candidates(CPU)]
    assert names[0] == "torch fp32"
    assert ("torch bf16" in names) == cpu_has_native_bf16()  # emulated bf16 is never worth timing
    assert ("onnxruntime fp32" in names) == _installed("onnxruntime")
    assert ("openvino fp32" in names) == _installed("openvino")
    assert ("openvino bf16" in names) == (_installed("openvino") and cpu_has_native_bf16())
    assert all(c.precision == "fp32" for c in backend_trial.candidates(CPU, precision="fp32"))
    assert all(c.backend == "torch" for c in backend_trial.candidates(CPU, backend="torch"))
    assert not any(c.backend == "torch" for c in backend_trial.candidates(CPU, exported_onnx=True))


def _figures(**rows):
    maps = torch.zeros(1, 1, 8, 8)
    out = {}
    for name, (seconds, timed, flipped) in rows.items():
        m = maps.clone()
        m.view(-1)[:flipped] = 1.0  # `flipped` mask pixels differ from the fp32 reference
        out[backend_trial.parse_choice(name.replace("_", " "))] = {"s_per_image": seconds, "timed": timed, "maps": m}
    return out


def _agreement(a, b):
    return ((a >= 0.5) == (b >= 0.5)).float().mean().item()


def test_pick_takes_the_fastest_path_that_agrees_with_fp32():
    figures = _figures(torch_fp32=(1.0, True, 0), torch_bf16=(0.5, True, 0), openvino_bf16=(0.2, True, 2),
                       onnxruntime_fp32=(0.1, False, 0))
    choice, table = backend_trial.pick(figures, _agreement)
    # openvino bf16 is fastest but disagrees on 2 of 64 pixels; onnxruntime only had its warm-up call
    assert choice == Candidate("torch", "bf16")
    assert table[Candidate("openvino", "bf16")]["agreement"] == pytest.approx(62 / 64, abs=1e-4)
    assert table[Candidate("torch", "fp32")]["agreement"] == 1.0
    with pytest.raises(UserError, match="no candidate"):
        backend_trial.pick(_figures(torch_fp32=(1.0, False, 0)), _agreement)


def test_one_slow_timed_call_does_not_decide_the_trial(monkeypatch):
    """The contenders are timed twice and keep their faster call: a burst of load during the fastest
    path's first timed call must not hand the (cached) choice to a slower one; a far slower path is not
    timed again."""
    clock = {"t": 0.0}
    monkeypatch.setattr(backend_trial.time, "perf_counter", lambda: clock["t"])
    calls = {"fast": iter([0.4, 0.9, 0.4]), "medium": iter([0.6, 0.6, 0.6]), "slow": iter([1.5, 1.5])}

    class Fake(torch.nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def forward(self, x):
            clock["t"] += next(calls[self.name])  # warm-up, first timed call, second timed call
            return x

    built = {Candidate("openvino", "fp32"): [Fake("fast")], Candidate("onnxruntime", "fp32"): [Fake("medium")],
             Candidate("torch", "fp32"): [Fake("slow")]}
    decoder = lambda out, n, device: (out[:, :1], None)  # the maps are the input itself
    figures = backend_trial.time_candidates(built, torch.zeros(1, 3, 8, 8), decoder, CPU)
    seconds = {c.backend: f["s_per_image"] for c, f in figures.items()}
    assert seconds == pytest.approx({"openvino": 0.4, "onnxruntime": 0.6, "torch": 1.5})
    assert all(f["timed"] for f in figures.values())
    assert next(calls["slow"], None) is None and next(calls["fast"], None) is None  # slow: no third call
    choice, _ = backend_trial.pick(figures, _agreement)
    assert choice == Candidate("openvino", "fp32")


def test_trial_cache_round_trips_and_is_keyed_by_width_and_models(tmp_path):
    cache = tmp_path / "trials.json"
    key = backend_trial.trial_key(CPU, ["abc:{}"], 672, False, ["torch fp32", "torch bf16"])
    assert key["machine"]["cores"] >= 1 and key["versions"]["torch"] == torch.__version__
    assert backend_trial.cached_trial(cache, key) is None
    assert backend_trial.store_trial(cache, key, {"choice": "torch bf16", "figures": {}})
    assert backend_trial.cached_trial(cache, key)["choice"] == "torch bf16"
    for other in (backend_trial.trial_key(CPU, ["abc:{}"], 1024, False, ["torch fp32", "torch bf16"]),
                  backend_trial.trial_key(CPU, ["xyz:{}"], 672, False, ["torch fp32", "torch bf16"])):
        assert backend_trial.cached_trial(cache, other) is None
    cache.write_text("{not json")  # a damaged cache is a miss, then rewritten
    assert backend_trial.cached_trial(cache, key) is None
    assert backend_trial.store_trial(cache, key, {"choice": "torch fp32", "figures": {}})
    assert json.loads(cache.read_text())


@pytest.mark.slow
def test_auto_times_the_candidates_once_and_records_the_choice(drone, checkpoints, tmp_path):
    import inference

    cache = tmp_path / "trials.json"
    extra = ("backend=auto", f"trial_cache={cache}", f"onnx_cache={tmp_path / 'onnx'}", "threshold=0.5")
    first = inference.run(infer_cfg(drone, checkpoints["b0"], tmp_path / "a", *extra))
    trial = first["backend_trial"]
    names = [c.name for c in backend_trial.candidates(CPU)]
    assert list(trial["figures"]) == names and trial["cached"] is False and trial["width"] == 64
    assert trial["choice"] in names and trial["figures"][trial["choice"]]["agreement"] >= backend_trial.AGREEMENT_MIN
    assert (trial.get("int8_s", 0) > 0) == ("openvino int8" in names)  # the int8 graph's one-off cost, apart
    if trial["choice"] == "openvino int8":
        assert trial["int8_calibration"]["inputs"] == len(trial["int8_calibration"]["windows"]) > 0
    backend, precision = trial["choice"].split()
    with rasterio.open(tmp_path / "a" / "masks" / "drone.tif") as ds:
        assert (ds.tags()["BUILDINGS_BACKEND"], ds.tags()["BUILDINGS_PRECISION"]) == (backend, precision)
    second = inference.run(infer_cfg(drone, checkpoints["b0"], tmp_path / "b", *extra))
    assert second["backend_trial"]["cached"] is True and second["backend_trial"]["choice"] == trial["choice"]
    assert json.loads((tmp_path / "b" / "run.json").read_text())["backend_trial"]["choice"] == trial["choice"]
    assert np.array_equal(read(tmp_path / "a" / "masks" / "drone.tif")[0], read(tmp_path / "b" / "masks" / "drone.tif")[0])


@pytest.mark.slow
@pytest.mark.skipif(not _installed("openvino"), reason="openvino is optional")
def test_openvino_matches_onnxruntime_and_records_its_precision(drone, checkpoints, tmp_path):
    import inference

    common = (f"onnx_cache={tmp_path / 'onnx'}", "threshold=0.5", "tta=[none,hflip]")
    inference.run(infer_cfg(drone, checkpoints["b0"], tmp_path / "ort", "backend=onnxruntime", *common))
    ov = inference.run(infer_cfg(drone, checkpoints["b0"], tmp_path / "ov", "backend=openvino", "precision=fp32",
                                 *common))
    assert ov["images"]["drone"]["precision"] == "fp32"
    assert len(list((tmp_path / "onnx").glob("*.onnx"))) == 1  # OpenVINO compiles the cached ONNX export
    assert list((tmp_path / "onnx" / "openvino").rglob("*.blob"))  # ... once: the compiled graph is kept
    a = read(tmp_path / "ort" / "probabilities" / "drone.tif")[0].astype(int)
    b = read(tmp_path / "ov" / "probabilities" / "drone.tif")[0].astype(int)
    assert np.abs(a - b).max() <= 1
    with rasterio.open(tmp_path / "ov" / "masks" / "drone.tif") as ds:
        assert ds.tags()["BUILDINGS_BACKEND"] == "openvino"
    if cpu_has_native_bf16():
        low = inference.run(infer_cfg(drone, checkpoints["b0"], tmp_path / "ovb", "backend=openvino",
                                      "precision=bf16", *common))
        assert low["images"]["drone"]["precision"] == "bf16"
        c = read(tmp_path / "ovb" / "probabilities" / "drone.tif")[0].astype(int)
        assert np.abs(a - c).mean() < 2.0  # bf16 rounding, not a different model
    again = inference.run(infer_cfg(drone, checkpoints["b0"], tmp_path / "ov2", "backend=openvino", "precision=fp32",
                                    *common))  # loaded from the compiled-graph cache
    assert again["images"]["drone"]["precision"] == "fp32"
    assert np.array_equal(read(tmp_path / "ov2" / "probabilities" / "drone.tif")[0].astype(int), b)


@pytest.mark.skipif(not (_installed("openvino") and _installed("onnxruntime")), reason="openvino is optional")
def test_openvino_graph_takes_uint8_images_and_normalises_them_itself(checkpoints, tmp_path):
    """The compiled segmentation graph is handed the uint8 images (a quarter of the bytes to flip and
    batch): its fp32 maps are ONNX Runtime's on the normalised images, and a float input is refused."""
    import model as M
    from lib.exported import load_exported, onnx_exports
    from lib.model_contract import model_input
    from lib.openvino_backend import openvino_models

    net = M.load_models([checkpoints["b0"]])[0]
    onnx = onnx_exports([net], [checkpoints["b0"]], tmp_path)[0]
    images = torch.from_numpy(np.random.default_rng(3).integers(0, 256, (2, 3, 64, 64), dtype=np.uint8))
    ov, ort = openvino_models([onnx], "fp32")[0], load_exported(onnx)
    assert model_input(ov, images) is images
    assert torch.equal(model_input(ort, images), M.normalize(images)) and torch.equal(model_input(net, images),
                                                                                       M.normalize(images))
    for a, b in zip(ov.probabilities(images), ort.probabilities(M.normalize(images))):
        assert a.shape == b.shape and (a - b).abs().max() < 1e-4
    with pytest.raises(ValueError, match="uint8"):
        ov.probabilities(M.normalize(images))
    with pytest.raises(ValueError, match="uint8"):
        model_input(ov, images.float())


def test_backend_openvino_without_bf16_says_what_it_runs(monkeypatch, drone, checkpoints, tmp_path):
    import inference
    from lib import backend_trial as bt

    monkeypatch.setattr(bt, "cpu_has_native_bf16", lambda: False)
    if not _installed("openvino"):
        with pytest.raises(UserError, match="pip install openvino"):
            inference.run(infer_cfg(drone, checkpoints["b0"], tmp_path, "backend=openvino"))
        return
    with pytest.raises(UserError, match="OpenVINO runs fp32, and bf16 on CPUs with native bf16"):
        inference.run(infer_cfg(drone, checkpoints["b0"], tmp_path, "backend=openvino", "precision=bf16"))


def test_a_onednn_cap_below_bf16_counts_as_a_cpu_without_native_bf16(monkeypatch):
    """ONEDNN_MAX_CPU_ISA makes PyTorch's and OpenVINO's kernels emulate bf16: no bf16 candidate then."""
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_VNNI")
    assert not cpu_has_native_bf16()
    assert not any(c.precision == "bf16" for c in backend_trial.candidates(CPU))
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")
    assert not cpu_has_native_bf16()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "ALL")
    with open("/proc/cpuinfo") as f:
        flags = f.read()
    assert cpu_has_native_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)

"""precision=int8 (lib.int8): quantized copies of the ONNX exports, calibrated on the run's images, run by
OpenVINO; chosen by backend=auto only where they agree with fp32."""

import json

import numpy as np
import pytest
import rasterio
import torch
from standins import infer_cfg, read

from lib import backend_trial, int8
from lib.backend_trial import Candidate
from lib.errors import UserError

CPU = torch.device("cpu")
_installed = backend_trial.installed

needs_runtimes = pytest.mark.skipif(not (_installed("openvino") and _installed("onnxruntime")),
                                    reason="int8 runs on OpenVINO, quantized by ONNX Runtime (optional)")


class _Image:
    """An in-memory image with RasterSource's reading interface (read, gsd, context manager)."""

    def __init__(self, rgb, valid=None, gsd=0.1):
        self.rgb, self.gsd = rgb, gsd
        self.valid = np.ones(rgb.shape[:2], bool) if valid is None else valid
        self.height, self.width = rgb.shape[:2]

    def read(self, row, col, h, w):
        return self.rgb[row:row + h, col:col + w], self.valid[row:row + h, col:col + w]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_calibration_windows_are_cut_from_the_images_resized_and_normalised():
    rng = np.random.default_rng(0)
    images = {"a.tif": _Image(rng.integers(0, 255, (300, 200, 3), dtype=np.uint8)),
              "b.tif": _Image(np.full((100, 100, 3), 255, np.uint8))}
    batch, sources = int8.windows_from_images(list(images), images.get, lambda gsd: 80, width=32, n=4)
    assert batch.shape == (4, 3, 32, 32) and batch.dtype == np.float32
    # two windows per image, spread along the first image's diagonal, 80 source pixels each
    assert sources == ["a.tif: rows 55-135, cols 30-110", "a.tif: rows 165-245, cols 90-170",
                       "b.tif: rows 5-85, cols 5-85", "b.tif: rows 15-95, cols 15-95"]
    assert np.allclose(batch[2:, 0], (1.0 - 0.485) / 0.229, atol=1e-5)  # white, ImageNet-normalised
    # an image smaller than the window keeps the engine's scale (64/100: 50 px -> 32) and is mirrored up to the width
    small = {"s.tif": _Image(np.tile(np.arange(50, dtype=np.uint8)[None, :, None], (50, 1, 3)))}
    batch, sources = int8.windows_from_images(list(small), small.get, lambda gsd: 100, width=64, n=1)
    assert batch.shape == (1, 3, 64, 64) and sources == ["s.tif: rows 0-50, cols 0-50"]
    assert np.allclose(batch[0, :, :, 32:63], batch[0, :, :, 30::-1])  # 32 px of image, then its mirror
    assert not np.allclose(batch[0, :, :, 31], batch[0, :, :, 0])  # the image itself is not stretched flat
    # a window less than half valid is passed over; no valid window at all gives an empty batch
    empty = {"c.tif": _Image(np.zeros((64, 64, 3), np.uint8), valid=np.zeros((64, 64), bool))}
    batch, sources = int8.windows_from_images(list(empty), empty.get, lambda gsd: 64, width=32)
    assert batch.shape[0] == 0 and sources == []
    with pytest.raises(UserError, match="no calibration input"):
        int8.Calibration(lambda: (batch, sources))()


def test_candidates_offer_int8_where_the_cpu_multiplies_int8_natively(monkeypatch):
    from lib import devices

    runtimes = _installed("openvino") and _installed("onnxruntime")
    names = [c.name for c in backend_trial.candidates(CPU)]
    assert ("openvino int8" in names) == (runtimes and devices.cpu_has_native_int8())
    asked = backend_trial.candidates(CPU, precision="int8")
    assert asked == ([Candidate("openvino", "int8")] if runtimes else [])  # asked for: on any CPU
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # below VNNI: int8 is not timed under auto
    assert not devices.cpu_has_native_int8()
    assert "openvino int8" not in [c.name for c in backend_trial.candidates(CPU)]
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_VNNI")  # VNNI without bf16 (Cascade Lake)
    with open("/proc/cpuinfo") as f:
        assert devices.cpu_has_native_int8() == ("avx512_vnni" in f.read())


def test_int8_is_refused_where_it_cannot_run(drone, checkpoints, tmp_path):
    import inference

    for backend in ("torch", "onnxruntime"):
        with pytest.raises(UserError, match="precision=int8 runs on OpenVINO"):
            inference.run(infer_cfg(drone, checkpoints["b0"], tmp_path / backend, f"backend={backend}",
                                    "precision=int8"))
    assert not (tmp_path / "torch").exists() or not any((tmp_path / "torch").rglob("*.tif"))


@needs_runtimes
def test_quantized_copy_is_cached_tagged_and_close_to_fp32(checkpoints, tmp_path):
    import model as M
    from lib.exported import onnx_exports
    from lib.openvino_backend import openvino_models

    net = M.load_models([checkpoints["b0"]])[0]
    onnx = onnx_exports([net], [checkpoints["b0"]], tmp_path)[0]
    images = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (2, 3, 64, 64), dtype=np.uint8))
    calib = M.normalize(images).numpy()  # the quantizer runs the ONNX graph, which takes normalised inputs
    q = int8.quantize(onnx, calib)
    assert q.parent == onnx.parent / "int8" and q.is_file()
    made = q.stat().st_mtime_ns
    assert int8.quantize(onnx, calib) == q and q.stat().st_mtime_ns == made  # cached
    assert int8.quantize(onnx, calib[:1]) != q  # other calibration inputs, another graph
    assert not list(q.parent.glob(".int8-*"))  # no work folder left behind
    fp32 = openvino_models([onnx], "fp32")[0]
    low = openvino_models([onnx], "int8", calibration=lambda: calib)[0]
    assert low.precision == "int8" and low.meta["quantization"]["calibration_digest"] == int8.calibration_digest(calib)
    # the inference threads are left free to move off a core that the engine's writing threads take
    assert fp32.compiled.get_property("ENABLE_CPU_PINNING") is False
    assert low.compiled.get_property("ENABLE_CPU_PINNING") is False
    assert low.meta["quantization"]["calibration_inputs"] == 2
    pa, pb = fp32.probabilities(images)[0], low.probabilities(images)[0]  # the compiled graphs take uint8
    assert pa.shape == pb.shape == (2, 1, 16, 16)
    assert (pa - pb).abs().mean() < 0.05  # 8-bit rounding, not another model


@pytest.mark.slow
@needs_runtimes
def test_inference_int8_records_how_the_graph_was_quantized(drone, checkpoints, tmp_path):
    import inference

    common = (f"onnx_cache={tmp_path / 'onnx'}", "threshold=0.5", "backend=openvino")
    fp32 = inference.run(infer_cfg(drone, checkpoints["b0"], tmp_path / "fp32", "precision=fp32", *common))
    run = inference.run(infer_cfg(drone, checkpoints["b0"], tmp_path / "int8", "precision=int8", *common))
    image = run["images"]["drone"]
    assert image["precision"] == "int8"
    quant = run["models"][0]["quantization"]
    assert quant["precision"] == "int8" and quant["calibration_inputs"] == len(quant["windows"]) == 4
    assert all(w.startswith("drone.tif: rows ") for w in quant["windows"])
    assert image["settings"]["int8_calibration"] == [quant["calibration_digest"]]
    assert "int8_calibration" not in fp32["images"]["drone"]["settings"]
    with rasterio.open(tmp_path / "int8" / "masks" / "drone.tif") as ds:
        assert ds.tags()["BUILDINGS_PRECISION"] == "int8" and ds.crs.to_epsg() == 32632
    a = read(tmp_path / "fp32" / "probabilities" / "drone.tif")[0].astype(int)
    b = read(tmp_path / "int8" / "probabilities" / "drone.tif")[0].astype(int)
    assert a.shape == b.shape and np.abs(a - b).mean() < 8  # of 255
    saved = json.loads((tmp_path / "int8" / "run.json").read_text())
    assert saved["models"][0]["quantization"]["calibration_digest"] == quant["calibration_digest"]
    again = inference.run(infer_cfg(drone, checkpoints["b0"], tmp_path / "int8", "precision=int8", *common))
    assert again["summary"]["skipped"] == 1  # the same calibration: the same settings fingerprint


def test_auto_leaves_int8_out_when_no_calibration_input_can_be_read(monkeypatch, capsys):
    from lib import backends

    cands = [Candidate("openvino", "fp32"), Candidate("openvino", "int8")]
    nothing = int8.Calibration(lambda: (np.zeros((0, 3, 8, 8), np.float32), []))
    assert backends._calibrated(cands, nothing, explicit=False) == cands[:1]
    assert "openvino int8 not tried" in capsys.readouterr().err
    assert backends._calibrated(cands, None, explicit=False) == cands[:1]
    with pytest.raises(UserError, match="no calibration input"):
        backends._calibrated(cands, nothing, explicit=True)


@pytest.mark.slow
@needs_runtimes
def test_a_cached_int8_choice_is_rechecked_on_new_images(monkeypatch, drone, checkpoints, tmp_path, capsys):
    """The trial is cached per machine, models and width, not per calibration: another folder's int8
    graph is quantized anew and must agree with fp32 on the trial's input, else the next path runs."""
    import inference
    from lib import devices, segmentation

    monkeypatch.setattr(devices, "cpu_has_native_int8", lambda: True)  # int8 among the candidates here
    monkeypatch.setattr(backend_trial, "cpu_has_native_int8", lambda: True)
    fastest_agreeing = backend_trial.pick
    monkeypatch.setattr(backend_trial, "pick", lambda figures, agreement_of: (
        Candidate("openvino", "int8"), fastest_agreeing(figures, agreement_of)[1]))
    with rasterio.open(drone) as src:  # another image: the top-left quarter, mirrored
        profile, data = src.profile, src.read()[:, : src.height // 2, : src.width // 2][..., ::-1]
        profile.update(height=data.shape[1], width=data.shape[2], transform=src.transform)
    other = tmp_path / "other" / "other.tif"
    other.parent.mkdir()
    with rasterio.open(other, "w", **profile) as dst:
        dst.write(np.ascontiguousarray(data))
    common = (f"onnx_cache={tmp_path / 'onnx'}", f"trial_cache={tmp_path / 'trials.json'}", "backend=auto")
    first = inference.run(infer_cfg(drone, checkpoints["b0"], tmp_path / "a", *common))["backend_trial"]
    assert first["choice"] == "openvino int8" and not first["cached"] and "int8_recheck" not in first
    second = inference.run(infer_cfg(other, checkpoints["b0"], tmp_path / "b", *common))["backend_trial"]
    assert second["cached"] and second["choice"] == "openvino int8"
    assert second["int8_digest"] != first["int8_digest"] and second["int8_recheck"] >= backend_trial.AGREEMENT_MIN
    assert len(list((tmp_path / "onnx" / "int8").glob("*.onnx"))) == 2  # one graph per calibration
    monkeypatch.setattr(segmentation.SegmentationDecoder, "agreement", lambda self, a, b: 0.9)
    third = inference.run(infer_cfg(other, checkpoints["b0"], tmp_path / "c", *common))
    trial = third["backend_trial"]
    assert trial["int8_recheck"] == 0.9 and trial["choice"] != "openvino int8"
    assert third["images"]["other"]["precision"] == trial["choice"].split()[1]
    assert "runs instead" in capsys.readouterr().err

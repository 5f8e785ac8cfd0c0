"""What precision=int8 quantizes, and what it costs: OpenVINO fp32 against int8 graphs of a trained checkpoint.

    python benchmarks/bench_int8.py --model <kampala run>/train_default/best.pth \\
        --image <kampala run>/holdout/holdout.tif          # the run of benchmarks/kampala_holdout.py
    ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI python benchmarks/bench_int8.py ...   # as on a CPU without bf16

Rows: OpenVINO fp32 (the reference), the int8 graph precision=int8 makes (lib.int8: the ASPP block's
convolutions), and one with every convolution quantized (the same quantizer, recipe and calibration).
Each int8 graph is calibrated the way inference.py calibrates (lib.int8.windows_from_images: windows
along the image's diagonal, resized to `--width`), on every other one of 2 x `--calibration` - 1 windows. Figures: seconds to quantize (uncached),
seconds per image (best of 3 calls on the trial's demo tile at `--width`, after a warm-up) and the ratio
to fp32, and the share of mask pixels (probability >= 0.5) equal to fp32's on windows between the
calibration ones (never calibrated on) and on the trial's demo tile (what backend=auto's agreement rule
checks, >= 99.5 %). Use an image the checkpoint was not trained on.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from kampala_holdout import cpu_name

import model as M
from lib import int8
from lib.backend_trial import AGREEMENT_MIN, trial_input
from lib.devices import onednn_isa_cap
from lib.exported import onnx_exports
from lib.image_sources import RasterSource
from lib.openvino_backend import OpenVinoModel


def every_conv(onnx_path: Path) -> list[str]:
    """The 'every convolution' variant's nodes (in place of lib.int8.quantized_nodes)."""
    import onnx

    return [n.name for n in onnx.load(str(onnx_path), load_external_data=False).graph.node if n.op_type == "Conv"]


def probabilities(net: OpenVinoModel, x: np.ndarray) -> np.ndarray:
    return np.concatenate([net.probabilities(torch.from_numpy(x[i:i + 1]))[0].numpy() for i in range(len(x))])


def seconds_per_image(net: OpenVinoModel, x: np.ndarray) -> float:
    t = torch.from_numpy(x)
    net.probabilities(t)
    calls = []
    for _ in range(3):
        start = time.perf_counter()
        net.probabilities(t)
        calls.append(time.perf_counter() - start)
    return min(calls) / len(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a trained checkpoint")
    ap.add_argument("--image", required=True, help="a GeoTIFF the checkpoint was not trained on")
    ap.add_argument("--width", type=int, default=1024, help="model input side (the Kampala run infers at 1024)")
    ap.add_argument("--side", type=int, default=1024, help="source pixels per window (tile_size)")
    ap.add_argument("--calibration", type=int, default=int8.CALIBRATION_INPUTS)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_int8_"))
    print(f"machine: {cpu_name()}; oneDNN cap {onednn_isa_cap() or 'none'}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {args.model} on {args.image} at {args.width} px")

    net = M.load_model(args.model).eval()
    onnx = onnx_exports([net], [args.model], work / "aspp")[0]
    whole = work / "all" / onnx.name  # another folder: its int8 copy is cached apart
    whole.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(onnx, whole)
    n = args.calibration
    spread, _ = int8.windows_from_images([args.image], RasterSource, lambda gsd: args.side, args.width, n=2 * n - 1,
                                         normalized=False)  # uint8, as the compiled graphs take them
    calib, held = spread[0::2], spread[1::2]  # calibrated on every other window, compared on those between
    calib = M.normalize(torch.from_numpy(calib)).numpy()  # the quantizer runs the ONNX graph: normalised inputs
    demo = trial_input(args.width, 3).numpy()

    fp32 = OpenVinoModel(onnx, "fp32")
    ref = {"held-out windows": probabilities(fp32, held), "demo tile": probabilities(fp32, demo)}
    rows = [("OpenVINO fp32", None, seconds_per_image(fp32, demo), {k: 1.0 for k in ref})]
    for label, path, nodes in (("int8, ASPP (precision=int8)", onnx, None),
                               ("int8, every convolution", whole, every_conv)):
        saved = int8.quantized_nodes
        if nodes is not None:
            int8.quantized_nodes = nodes
        try:
            start = time.perf_counter()
            quantized = int8.quantize(path, calib)
            made = time.perf_counter() - start
        finally:
            int8.quantized_nodes = saved
        low = OpenVinoModel(quantized, "int8")
        agree = {k: float(((probabilities(low, x) >= 0.5) == (ref[k] >= 0.5)).mean())
                 for k, x in (("held-out windows", held), ("demo tile", demo))}
        rows.append((label, made, seconds_per_image(low, demo), agree))

    base = rows[0][2]
    print(f"calibrated on {len(calib)} windows, compared on {len(held)} others and the demo tile")
    print(f"{'':30s} {'quantize s':>10s} {'s/image':>8s} {'vs fp32':>8s} {'agree held-out':>15s} {'agree demo':>11s}")
    for label, made, seconds, agree in rows:
        ok = "" if min(agree.values()) >= AGREEMENT_MIN else "  (below the 99.5 % rule)"
        print(f"{label:30s} {'' if made is None else f'{made:10.1f}':>10s} {seconds:8.3f} {base / seconds:7.2f}x "
              f"{100 * agree['held-out windows']:14.3f}% {100 * agree['demo tile']:10.3f}%{ok}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

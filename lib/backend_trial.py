"""`backend=auto`: the fastest way to run the models on this machine, chosen by a timed trial.

Which runtime and precision is fastest depends on the CPU (native bf16 or not, AMX), the model and the
input size; a rule gets it wrong somewhere (on a 2-core EPYC with avx512_bf16, b0 at 672 px: OpenVINO
bf16 0.22 s/image, PyTorch bf16 0.46, ONNX Runtime 0.52, PyTorch fp32 0.87). So the candidates that
the installed packages and the CPU allow (`candidates`) are each run on one batch at the run's width,
timed (the close contenders twice), and compared with fp32 PyTorch: a path whose mask agrees on fewer than AGREEMENT_MIN of the
pixels is not chosen. The choice and the figures are cached per machine + packages + models + width
(`trial_key`) in a small JSON file, so the trial runs once; the run's provenance records them.

The trial input is a drawn demo tile (lib.demo_scene), so agreement is measured on roofs and roads
rather than on noise. `backend=`/`precision=` narrow the candidates; one candidate left means no trial.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lib.cli import VERSION
from lib.devices import cpu_has_native_bf16, cpu_has_native_int8, onednn_isa_cap
from lib.errors import UserError
from lib.exported import GRAPH_REVISION, onnx_cache_dir
from lib.files import write_json
from lib.model_contract import model_input
from lib.tiling import takes_arrays

AGREEMENT_MIN = 0.995  # share of mask pixels a faster path must reproduce (the engine's precision=auto rule)
TRIAL_BATCH = 1        # images per timed call: per-image time on a CPU hardly changes with the batch
SKIP_FACTOR = 3.0      # a candidate whose warm-up call is this much slower than the best timed one stops there,
SKIP_MIN_S = 1.0       # ... if it took this long (first calls include one-off graph preparation)
RETIME_FACTOR = 2.0    # timed candidates within this factor of the best are timed a second time
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile")


@dataclass(frozen=True)
class Candidate:
    backend: str    # torch | onnxruntime | openvino
    precision: str  # fp32 | bf16 | fp16 | int8

    @property
    def name(self) -> str:
        return f"{self.backend} {self.precision}"


def installed(module: str) -> bool:
    """Whether an optional runtime (onnxruntime, openvino) is installed. Found, not imported: importing
    both costs about 0.3 s of every run's start, and only the chosen one is needed (a broken install then
    fails when it is built, as one line)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: a module set to None in sys.modules
        return False


def candidates(device: torch.device, backend: str = "auto", precision: str = "auto",
               exported_onnx: bool = False) -> list[Candidate]:
    """The paths worth timing here, narrowed by `backend`/`precision` (each `auto` or one value).

    CUDA: PyTorch fp32 and its autocast precision. CPU: PyTorch fp32 (+ bf16 where native), ONNX Runtime
    fp32 and OpenVINO fp32 (+ bf16 where native, + int8 where VNNI/AMX-INT8 is: lib.int8, which needs
    ONNX Runtime's quantizer) when installed. Models given as ONNX files (`exported_onnx`) have no eager
    PyTorch form; ONNX Runtime is how they load. `precision=int8` asks for the int8 graph on any CPU.
    """
    if device.type == "cuda":
        reduced = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        found = [Candidate("torch", "fp32"), Candidate("torch", reduced)]
    else:
        native = device.type == "cpu" and cpu_has_native_bf16()
        found = [Candidate("torch", "fp32")] + ([Candidate("torch", "bf16")] if native else [])
        if device.type == "cpu" and installed("onnxruntime"):
            found.append(Candidate("onnxruntime", "fp32"))
        if device.type == "cpu" and installed("openvino"):
            found += [Candidate("openvino", "fp32")] + ([Candidate("openvino", "bf16")] if native else [])
            if installed("onnxruntime") and (precision == "int8" or cpu_has_native_int8()):
                found.append(Candidate("openvino", "int8"))
    if exported_onnx:
        found = [c for c in found if c.backend != "torch"]
    return [c for c in found if backend in ("auto", c.backend) and precision in ("auto", c.precision)]


# --------------------------------------------------------------------------------------------------
# The cache: one JSON file of trials, keyed by what decides the answer
# --------------------------------------------------------------------------------------------------

def cpu_description() -> dict:
    """CPU model, cores and the flags that decide which kernels exist (bf16, VNNI, AMX)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and ":" in line:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    out = {"cpu": name, "cores": os.cpu_count(), "flags": [f for f in CPU_FLAGS if f in flags]}
    cap = onednn_isa_cap()
    if cap:  # the kernels see a smaller instruction set (lib.devices.cpu_has_native_bf16)
        out["onednn_max_cpu_isa"] = cap
    return out


def _versions() -> dict:
    out = {"toolkit": VERSION, "graph": GRAPH_REVISION, "torch": torch.__version__}
    for module in ("onnxruntime", "openvino"):
        try:
            out[module] = importlib.metadata.version(module)
        except importlib.metadata.PackageNotFoundError:
            out[module] = None
    return out


def trial_key(device: torch.device, model_ids: list[str], width: int, instance: bool, names: list[str]) -> dict:
    """Everything the trial's answer depends on: machine, threads, packages, models, input width."""
    where = cpu_description() if device.type == "cpu" else {"gpu": torch.cuda.get_device_name(device)}
    return {"machine": where, "threads": torch.get_num_threads(), "device": device.type, "versions": _versions(),
            "models": model_ids, "width": int(width), "batch": TRIAL_BATCH, "instance": bool(instance),
            "candidates": names}


def default_cache_file() -> Path:
    """Beside the cached ONNX exports: $BUILDINGS_CACHE/backend_trials.json, else
    ~/.cache/buildings/backend_trials.json."""
    return onnx_cache_dir().parent / "backend_trials.json"


def _digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def cached_trial(cache_file: Path, key: dict) -> dict | None:
    try:
        return json.loads(cache_file.read_text()).get(_digest(key))
    except (OSError, ValueError, AttributeError):
        return None


def store_trial(cache_file: Path, key: dict, result: dict) -> bool:
    """Add one trial to the cache file (atomically); False when the folder cannot be written."""
    try:
        entries = json.loads(cache_file.read_text())
        entries = entries if isinstance(entries, dict) else {}
    except (OSError, ValueError):
        entries = {}
    entries[_digest(key)] = {**result, "key": key}
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        write_json(cache_file, entries)
    except OSError:
        return False
    return True


# --------------------------------------------------------------------------------------------------
# The trial
# --------------------------------------------------------------------------------------------------

def trial_input(width: int, channels: int) -> torch.Tensor:
    """TRIAL_BATCH uint8 demo tiles [N, C, width, width] (roofs, roads, ground; deterministic), as the engine
    hands them to `model_contract.model_input`."""
    from lib import demo_scene

    rgba = demo_scene.generate_scene(7, size=(width, width), detail=False, nodata_corner=False).rgba
    tile = torch.from_numpy(rgba[:min(channels, 4)].copy())
    if channels > tile.shape[0]:  # more bands than the demo has: repeat its grey level
        tile = torch.cat([tile, tile[:1].expand(channels - tile.shape[0], -1, -1)])
    batch = torch.stack([tile, tile.flip(-1)][:TRIAL_BATCH])
    return batch


def decoded_maps(models: list, x: torch.Tensor, precision: str, decoder, device: torch.device) -> torch.Tensor:
    """The decoded maps of every model on the uint8 images x, the way the engine calls them (normalising
    the input is part of the call: a graph that normalises its own is timed with it)."""
    outs = []
    for m in models:
        takes_nchw = takes_arrays(m)
        xm = model_input(m, x)
        xm = xm.contiguous() if takes_nchw else xm.contiguous(memory_format=torch.channels_last)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision) if not takes_nchw else None
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            maps, _ = decoder(m(xm), x.shape[0], device)
        outs.append(maps.float())
    return torch.stack(outs).mean(0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_candidates(built: dict, x: torch.Tensor, decoder, device: torch.device) -> dict:
    """Seconds per image and decoded maps of each candidate: one warm-up call, then one timed call
    unless the warm-up alone took over SKIP_MIN_S and SKIP_FACTOR times the best timed call so far.

    The timed candidates within RETIME_FACTOR of the best are then timed once more, in turn, and keep
    their faster call: the choice is cached for good, and one call slowed by a burst of other work on the
    machine (OpenVINO once timed 0.82 s/image instead of 0.49) must not decide it.
    """
    figures, best = {}, float("inf")
    x_dev = x.to(device)
    for cand, models in built.items():
        _sync(device)
        t0 = time.perf_counter()
        maps = decoded_maps(models, x_dev, cand.precision, decoder, device)
        _sync(device)
        warm = time.perf_counter() - t0
        seconds, timed = warm, False
        if warm <= max(SKIP_FACTOR * best, SKIP_MIN_S):
            seconds, maps = _timed_call(models, x_dev, cand.precision, decoder, device)
            timed = True
            best = min(best, seconds)
        figures[cand] = {"s_per_image": seconds / x.shape[0], "timed": timed, "maps": maps}
    contenders = [c for c, f in figures.items() if f["timed"] and f["s_per_image"] * x.shape[0] <= RETIME_FACTOR * best]
    for cand in contenders if len(contenders) > 1 else []:
        seconds, _ = _timed_call(built[cand], x_dev, cand.precision, decoder, device)
        figures[cand]["s_per_image"] = min(figures[cand]["s_per_image"], seconds / x.shape[0])
    return figures


def _timed_call(models: list, x: torch.Tensor, precision: str, decoder, device: torch.device):
    t0 = time.perf_counter()
    maps = decoded_maps(models, x, precision, decoder, device)
    _sync(device)
    return time.perf_counter() - t0, maps


def pick(figures: dict, agreement_of) -> tuple[Candidate, dict]:
    """The fastest timed candidate whose result agrees with fp32 PyTorch (or the first fp32 path), by
    `agreement_of(ref_maps, maps)` (the decoder's: share of equal mask pixels)."""
    fp32 = [c for c in figures if c.precision == "fp32"]
    ref = next((c for c in fp32 if c.backend == "torch"), fp32[0] if fp32 else None)
    table = {}
    for cand, f in figures.items():
        agreement = 1.0 if ref is None or cand == ref else agreement_of(figures[ref]["maps"], f["maps"])
        table[cand] = {"s_per_image": round(f["s_per_image"], 4), "timed": f["timed"],
                       "agreement": round(agreement, 5)}
    usable = [c for c, t in table.items() if t["timed"] and t["agreement"] >= AGREEMENT_MIN]
    if not usable:
        raise UserError("backend=auto: no candidate path agrees with fp32; set backend= and precision=")
    return min(usable, key=lambda c: table[c]["s_per_image"]), table


def describe(record: dict) -> str:
    """One line: the choice, each candidate's s/image (and disagreement), where it came from."""
    parts = []
    for name, t in record["figures"].items():
        s = f"{name} {t['s_per_image']:.3f}" + ("" if t["timed"] else " (warm-up only)")
        if t["agreement"] < AGREEMENT_MIN:
            s += f" (mask agreement {100 * t['agreement']:.2f} %, not used)"
        parts.append(s)
    origin = (f"trial of {record['trial_s']:.1f} s" if not record.get("cached")
              else f"cached trial of {record['created'][:10]}")
    return (f"backend=auto: {record['choice']} ({origin} at {record['width']} px, s/image: " + ", ".join(parts)
            + f"; one-off export {record.get('export_s', 0.0):.1f} s"
            + (f", int8 graph {record['int8_s']:.1f} s" if record.get("int8_s") else "") + ")")


def run_trial(built: dict, width: int, channels: int, decoder, device: torch.device) -> tuple[Candidate, dict]:
    """Time every built candidate and pick one; the record is JSON (for the cache and run.json)."""
    start = time.perf_counter()
    figures = time_candidates(built, trial_input(width, channels), decoder, device)
    choice, table = pick(figures, decoder.agreement)
    record = {"choice": choice.name, "width": int(width), "batch": TRIAL_BATCH,
              "figures": {c.name: t for c, t in table.items()},
              "trial_s": round(time.perf_counter() - start, 2),
              "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    return choice, record


def parse_choice(name: str) -> Candidate:
    backend, precision = name.split()
    return Candidate(backend, precision)

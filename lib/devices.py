"""Which device and which arithmetic a run uses, and how many threads and processes work beside the model."""

from __future__ import annotations

import os
from pathlib import Path

from lib.errors import UserError


def resolve_device(name: str = "auto"):
    """Map `device=auto|cpu|cuda|cuda:N|mps` to a torch.device, failing clearly if unavailable."""
    import torch

    if name in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name}: CUDA is not available on this machine; use device=cpu or device=auto")
    return dev


# oneDNN instruction-set caps (ONEDNN_MAX_CPU_ISA) below AVX512_CORE_BF16: PyTorch's and OpenVINO's
# kernels then run bf16 emulated, as on a CPU without it
_ISAS_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}


# caps below the integer dot-product instructions (VNNI): int8 convolutions then run on slower paths
_ISAS_WITHOUT_VNNI = {"SSE41", "AVX", "AVX2", "AVX512_CORE"}


def onednn_isa_cap() -> str | None:
    """The cap on oneDNN's instruction set (ONEDNN_MAX_CPU_ISA, or its old name DNNL_MAX_CPU_ISA), if set."""
    return (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").strip() or None


def _native(flags: set[str], caps_without: set[str]) -> bool:
    """Whether the CPU has one of `flags` (/proc/cpuinfo) and oneDNN is not capped below it."""
    if (onednn_isa_cap() or "").upper() in caps_without:
        return False
    try:
        return bool(flags & set(Path("/proc/cpuinfo").read_text().split()))
    except OSError:
        return False


def cpu_has_native_bf16() -> bool:
    """AMX or AVX512-BF16: the CPUs on which bf16 arithmetic is faster than fp32 (elsewhere it is emulated).

    A cap on oneDNN's instruction set (ONEDNN_MAX_CPU_ISA, e.g. AVX512_CORE_VNNI) below bf16 counts as
    its absence, as it does for the kernels: so a CPU without native bf16 can be measured on one with it."""
    return _native({"amx_bf16", "avx512_bf16"}, _ISAS_WITHOUT_BF16)


def cpu_has_native_int8() -> bool:
    """VNNI (AVX512-VNNI, AVX-VNNI) or AMX-INT8: the CPUs that multiply int8 at several times the fp32
    rate, where an int8 graph (lib.int8) is worth a trial. A oneDNN cap below VNNI counts as its absence."""
    return _native({"avx512_vnni", "avx_vnni", "amx_int8"}, _ISAS_WITHOUT_VNNI)


FINISHING_THREADS_MAX = 8  # `finish_workers=auto` never starts more


def finishing_threads(value="auto", device=None) -> int:
    """How many threads finish images' outputs (COGs, footprints, STAC items) beside the model
    (`finish_workers`: auto or a count >= 1).

    Where the model runs on the CPU it takes the cores, and on 2 cores one finishing thread is never what
    the run waits for; but each image costs it about 0.08 s of CPU (1024^2, benchmarks/bench_inference.py
    section 2), so a model several times faster -- on a GPU, or a CPU with many cores -- would wait for it.
    auto: a quarter of the cores on the CPU (1 up to 7 cores), half of them beside an accelerator, at most
    FINISHING_THREADS_MAX; the cores are those of this process's share of the node under torchrun
    (LOCAL_WORLD_SIZE processes). `device` None: only checks the value."""
    if value in (None, "auto"):
        cores = process_cores()
        share = cores // 4 if device is None or device.type == "cpu" else cores // 2
        return max(1, min(FINISHING_THREADS_MAX, share))
    return _count(value, "finish_workers", "threads", 1)


LOADER_WORKERS_CPU = 2  # `num_workers=auto` with the model on the CPU
LOADER_WORKERS_MAX = 8  # `num_workers=auto` beside an accelerator never starts more


def loader_workers(value="auto", device=None) -> int:
    """Training's data-loading processes (`num_workers`: auto or a count >= 0).

    With the model on the CPU the workers take its cores: 0, 1 and 2 were within noise on 2 cores
    (benchmarks/bench_train.py's grid, benchmarks/RESULTS.md), so auto is 2 there. An accelerator steps
    through batches many times faster than one worker decodes and augments chips, so beside one, auto is
    every core of this process's share of the node but the main process's, from 2 to LOADER_WORKERS_MAX.
    `device` None: only checks the value."""
    if value in (None, "auto"):
        if device is None or device.type == "cpu":
            return LOADER_WORKERS_CPU
        return max(LOADER_WORKERS_CPU, min(LOADER_WORKERS_MAX, process_cores() - 1))
    return _count(value, "num_workers", "processes", 0)


def process_cores() -> int:
    """This process's share of the node's cores (torchrun starts LOCAL_WORLD_SIZE processes on it)."""
    return max(1, (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def _count(value, key: str, unit: str, minimum: int) -> int:
    """`value` as a whole number >= minimum, or a UserError naming `key`."""
    try:
        count = int(value)
    except (TypeError, ValueError):
        count = minimum - 1
    if count < minimum or str(count) != str(value).strip():
        raise UserError(f"{key} must be auto or a number of {unit} >= {minimum}, not {value}")
    return count

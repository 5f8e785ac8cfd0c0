"""Which device and which arithmetic a run uses."""

from __future__ import annotations

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


def cpu_has_native_bf16() -> bool:
    """AMX or AVX512-BF16: the CPUs on which bf16 arithmetic is faster than fp32 (elsewhere it is emulated)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags

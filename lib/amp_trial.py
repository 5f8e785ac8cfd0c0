"""precision=auto for training on a CPU with native bf16: a short timed trial on the first batch decides.

On CUDA, auto means bf16 (or fp16) autocast without a trial. On a CPU with AVX512-BF16 or AMX, bf16
autocast is often (not always: small inputs, memory-bound layers) faster than fp32, and training in it
must give the same loss. So before the first step the trainer runs forward + backward of the first
batch in fp32 and in bf16, one warm-up each and then two timed passes each (interleaved, so a load
change on the machine hits both), and picks bf16 when its loss is within LOSS_TOLERANCE of fp32's
and its faster pass is at least MIN_SPEEDUP times fp32's. Elsewhere (CPUs without native bf16, where it
is emulated and slower) auto stays fp32 without a trial.

The trial must not change the run: every pass starts from the same torch RNG state (identical dropout
masks, so the losses are comparable), and afterwards the model's state (BatchNorm running statistics
included), the gradients and the torch/numpy/python RNG states are what they were, and the batch is
the first step's. A run whose trial picks fp32 is therefore bit-identical to precision=fp32.
"""

from __future__ import annotations

import random
import time

import numpy as np
import torch

from lib.devices import cpu_has_native_bf16
from lib.distributed import broadcast_object

LOSS_TOLERANCE = 0.02  # |loss_bf16 - loss_fp32| / |loss_fp32| at most this
MIN_SPEEDUP = 1.10  # bf16 forward+backward at least this many times faster than fp32
TIMED_PASSES = 2  # per precision, after one warm-up; the minimum counts
DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def trial_wanted(cfg, device: torch.device) -> bool:
    """precision=auto on a CPU whose bf16 is native (resumed runs reuse the checkpoint's choice instead)."""
    return cfg.precision == "auto" and device.type == "cpu" and not cfg.resume and cpu_has_native_bf16()


def choose(s, inputs) -> dict:
    """Run the trial for session `s` on the step input `inputs`, set `s.autocast_dtype`; returns the record.

    Under torchrun every rank runs the same passes and rank 0's record decides for all.
    """
    snapshot = {k: v.detach().clone() for k, v in s.net.state_dict().items()}
    params = list(s.net.parameters())
    grads = [None if p.grad is None else p.grad.detach().clone() for p in params]
    np_state, py_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=[]):
        start = torch.get_rng_state()
        seconds, losses = {name: [] for name in DTYPES}, {}
        for round_ in range(1 + TIMED_PASSES):
            for name, dtype in DTYPES.items():
                torch.set_rng_state(start)
                s.autocast_dtype = dtype
                t0 = time.perf_counter()
                loss, _ = s.task.compute_loss(s, inputs)
                loss.backward()
                elapsed = time.perf_counter() - t0
                for p in params:
                    p.grad = None
                losses[name] = float(loss.detach())
                if round_:
                    seconds[name].append(elapsed)
    s.net.load_state_dict(snapshot)
    for p, g in zip(params, grads):
        p.grad = g
    np.random.set_state(np_state)
    random.setstate(py_state)
    record = broadcast_object(decide({k: min(v) for k, v in seconds.items()}, losses), s.d)
    s.autocast_dtype = DTYPES[record["chosen"]]
    return record


def decide(seconds: dict, losses: dict) -> dict:
    """The trial's record: the figures, the rule's thresholds and the choice (bf16 only if it agrees and wins)."""
    fp32, bf16 = losses["fp32"], losses["bf16"]
    rel = abs(bf16 - fp32) / max(abs(fp32), 1e-12)
    speedup = seconds["fp32"] / max(seconds["bf16"], 1e-12)
    agrees = bool(np.isfinite(bf16)) and rel <= LOSS_TOLERANCE
    chosen = "bf16" if agrees and speedup >= MIN_SPEEDUP else "fp32"
    return {"chosen": chosen, "fp32_s": round(seconds["fp32"], 4), "bf16_s": round(seconds["bf16"], 4),
            "speedup": round(speedup, 3), "loss_fp32": fp32, "loss_bf16": bf16, "loss_rel_diff": rel,
            "loss_tolerance": LOSS_TOLERANCE, "min_speedup": MIN_SPEEDUP, "agrees": agrees}


def describe(record: dict) -> str:
    """One line for the log: the choice and the figures behind it."""
    why = ("" if record["agrees"] else f" (bf16 loss differs by more than {100 * record['loss_tolerance']:g} %)")
    return (f"precision=auto: {record['chosen']}{why}; forward+backward of the first batch: "
            f"fp32 {record['fp32_s']:.2f} s, bf16 {record['bf16_s']:.2f} s ({record['speedup']:.2f}x, needs {record['min_speedup']:.2f}x); losses "
            f"{record['loss_fp32']:.4f} / {record['loss_bf16']:.4f} ({100 * record['loss_rel_diff']:.2f} % apart)")

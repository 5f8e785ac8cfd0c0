"""Task-neutral training: a session, one optimiser step, the loop, checkpoints and exact resume.

A task (building segmentation today, point detection later) plugs in through the `Task` protocol:
it builds its data, model and optimiser, yields its batches, computes its loss and its validation
metrics. Everything else lives here once: mixed precision (precision=auto's first-batch trial on CPUs
with native bf16: lib.amp_trial), DDP glue (wrapping, BatchNorm buffers shared before scoring, one
all-reduce of the loss terms per step), when to validate (lib.val_cadence, fed the seconds measured
here), the checkpoint cadence (last/best/m<step>.pth), the run folder's logs (lib.run_log) and exact resume.

Exactness: a training checkpoint (last.pth, m<step>.pth) holds the model, optimiser, scheduler, scaler,
step, the validation plan and every process's RNG states; a task whose batches are a function of
(seed, step) -- see dataset.EpochBatches -- therefore continues after SIGKILL with the same losses, bit
for bit on CPU.
best.pth is lean (weights, config, meta and scores): what inference and `model=` need.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import random
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from lib import amp_trial
from lib.checkpoints import load_checkpoint, save_checkpoint
from lib.cli import progress_bar
from lib.distributed import Dist, all_reduce, broadcast_object, gather_object
from lib.errors import UserError
from lib.run_log import RunLog
from lib.val_cadence import Cadence


class DivergedError(UserError):
    """The loss became NaN or infinite (the run stops; the last checkpoint on disk is the last good one)."""


class Task(Protocol):
    """What a training task provides; the trainer owns the rest.

    `metric_names` are the keys `validate` returns (metrics.csv columns, "val_loss" first);
    `select_metric` (higher is better) picks best.pth and is saved as `best_<name without val_>`;
    an optional `tie_metric` (higher is better) breaks its ties (is_better).
    `build_data` returns an object whose `train` is the list of training samples (it sets the epoch
    length). `train_batches(s)` is an endless iterator of step inputs on `s.device`, resumed after
    `s.step` steps; `compute_loss(s, inputs)` returns (loss tensor, {term: tensor}).
    """

    metric_names: tuple[str, ...]
    select_metric: str
    metric_labels: dict

    def build_data(self, cfg, d: Dist): ...
    def build_model(self, cfg) -> torch.nn.Module: ...
    def build_optimizer(self, net: torch.nn.Module, cfg, lr: float, total_steps: int) -> tuple: ...
    def train_batches(self, s: Session) -> Iterator: ...
    def compute_loss(self, s: Session, inputs) -> tuple[torch.Tensor, dict]: ...
    def validate(self, s: Session) -> dict: ...
    def checkpoint_meta(self, s: Session) -> dict: ...


@dataclass
class Session:
    """Everything a step needs."""
    cfg: object
    task: Task
    d: Dist
    device: torch.device
    data: object
    net: torch.nn.Module  # the bare model (checkpoints, validation)
    model: torch.nn.Module  # what the step calls: net, DDP(net) and/or compiled
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    autocast_dtype: torch.dtype | None
    total_steps: int
    per_epoch: int
    step: int = 0
    best: float = -math.inf  # of task.select_metric (higher is better); none yet
    best_step: int = 0
    history: list = field(default_factory=list)
    cache: dict = field(default_factory=dict)  # the task's reusable objects (e.g. its validation loader)
    cadence: Cadence | None = None  # when to validate (lib.val_cadence)
    precision_trial: dict | None = None  # precision=auto's trial record (lib.amp_trial); None: no trial
    trial_due: bool = False  # the trial runs on the first batch of fit()


# ---------------------------------------------------------------------------------------------------
# Building a session
# ---------------------------------------------------------------------------------------------------


def autocast_dtype(cfg, device: torch.device) -> torch.dtype | None:
    """Mixed-precision dtype: auto = bf16 on CUDA when supported, else fp16 on CUDA, fp32 elsewhere
    (until lib.amp_trial's trial on a CPU with native bf16 says otherwise)."""
    p = cfg.precision
    if p == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[p]


def uses_channels_last(cfg, device: torch.device) -> bool:
    """auto = on, on CUDA and on CPUs: oneDNN's depthwise-convolution backward (EfficientNet's) is several
    times faster in NHWC; on a 2-core EPYC a b0 training step at 256 px was 1.24-1.26x faster in fp32 with
    oneDNN at AVX2 or AVX-512 (bench_train.py's memory-format section measures it on the machine at hand)."""
    return device.type in ("cuda", "cpu") if cfg.channels_last == "auto" else bool(cfg.channels_last)


def _fp32_forward(self, x):
    """The convolution's own forward, outside autocast, on an fp32 input."""
    with torch.autocast(x.device.type, enabled=False):
        return super(type(self), self).forward(x.float())


@functools.cache
def _fp32_class(cls: type) -> type:
    """`cls` with a forward that leaves autocast (one subclass per conv class)."""
    return type(f"{cls.__name__}Fp32", (cls,), {"forward": _fp32_forward, "leaves_autocast": True})


def depthwise_in_fp32(net: torch.nn.Module) -> int:
    """Make the depthwise convolutions of `net` run in fp32 under CPU autocast; returns how many.

    oneDNN's bf16 depthwise backward is slow on CPUs with AVX512-BF16 (2-6x its fp32 NHWC backward on
    EfficientNet's shapes), and these layers are memory-bound, so bf16 gains nothing on them. Each such
    conv's class becomes a subclass whose forward leaves autocast (its input cast to fp32), so weights,
    state-dict keys and copies are unchanged; outside autocast it computes exactly as before.
    """
    n = 0
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d) and 1 < m.groups == m.in_channels:
            if not getattr(m, "leaves_autocast", False):
                m.__class__ = _fp32_class(type(m))
            n += 1
    return n


def set_bn_momentum(net: torch.nn.Module, momentum: float | None) -> None:
    """Set every BatchNorm's running-statistics momentum (None keeps the model's own).

    efficientnet-pytorch uses TensorFlow's 0.01, so after a few hundred steps from random weights the
    running statistics still mostly reflect their initial values and evaluation-mode outputs are far from
    what training saw. PyTorch's usual 0.1 tracks the current weights and costs nothing on long runs.
    """
    if momentum is None:
        return
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = float(momentum)


def set_train_mode(net: torch.nn.Module, cfg) -> None:
    """Training mode, optionally with frozen BatchNorm statistics and/or without dropout/drop-connect.

    `freeze_bn` keeps BatchNorm on its running statistics (useful for per-GPU batches of 1-2 chips);
    `dropout=false` switches off the stochastic layers. With both, a step is a deterministic function
    of the batch, which is how data-parallel runs are compared exactly with single-process runs.
    """
    net.train()
    for m in net.modules():
        is_bn = isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
        if (is_bn and cfg.freeze_bn) or (not is_bn and not cfg.dropout):
            m.training = False


def load_optimizer_moments(optimizer, saved: dict, net: torch.nn.Module, path) -> None:
    """`load_state=1`: take the optimiser state (moments) of a checkpoint, keep this run's hyper-parameters.

    Handles our two-group layout and the original pipeline's single group (parameters in module order).
    """
    base = getattr(optimizer, "optimizer", optimizer)  # Lookahead wraps the optimiser that owns the moments
    if isinstance(saved, dict) and "base_optimizer" in saved:
        saved = saved["base_optimizer"]
    if not isinstance(saved, dict) or "state" not in saved or "param_groups" not in saved:
        raise UserError(f"{path}: load_state=1 but the checkpoint has no optimizer state; drop load_state")
    ours = base.state_dict()
    own_params = [p for g in base.param_groups for p in g["params"]]
    index_of = {id(p): i for i, p in enumerate(own_params)}
    saved_sizes = [len(g["params"]) for g in saved["param_groups"]]
    if saved_sizes == [len(g["params"]) for g in ours["param_groups"]]:
        mapping = {i: i for i in range(len(own_params))}
    elif len(saved_sizes) == 1 and saved_sizes[0] == len(own_params):
        mapping = {i: index_of[id(p)] for i, p in enumerate(p for p in net.parameters() if p.requires_grad)}
    else:
        raise UserError(f"{path}: optimizer state has {sum(saved_sizes)} parameters, the model {len(own_params)}; "
                        "drop load_state")
    state = {}
    for i, s in saved["state"].items():
        j = mapping[int(i)]
        avg = s.get("exp_avg")
        if avg is not None and tuple(avg.shape) != tuple(own_params[j].shape):
            raise UserError(f"{path}: optimizer state does not fit the model parameters; drop load_state")
        state[j] = s
    base.load_state_dict({"state": state, "param_groups": ours["param_groups"]})


def _seed_everything(cfg, device: torch.device) -> None:
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # identical initial weights on every process
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = bool(cfg.cudnn_benchmark) and not cfg.deterministic
        torch.backends.cudnn.deterministic = bool(cfg.deterministic)


def _place_model(net: torch.nn.Module, cfg, d: Dist, device: torch.device) -> torch.nn.Module:
    """The bare network on its device: BatchNorm momentum, SyncBatchNorm under DDP, memory format, and on
    CPU depthwise convolutions kept in fp32 under autocast."""
    net = net.to(device)
    set_bn_momentum(net, cfg.bn_momentum)
    if cfg.sync_bn and d.enabled:
        if device.type != "cuda":
            raise UserError("sync_bn=true needs CUDA (torch's SyncBatchNorm does not run on CPU); "
                            "use freeze_bn=true or sync_bn=false")
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    if uses_channels_last(cfg, device):
        net = net.to(memory_format=torch.channels_last)
    if device.type == "cpu":
        depthwise_in_fp32(net)
    return net


def prepare(cfg, task: Task, d: Dist, device: torch.device) -> Session:
    """Build data, model, optimiser, schedule and scaler for a resolved config (restoring a resumed run)."""
    _seed_everything(cfg, device)
    data = task.build_data(cfg, d)
    net = _place_model(task.build_model(cfg), cfg, d, device)
    per_epoch = (len(data.train) // d.world) // int(cfg.batch_size)
    total = int(cfg.max_steps) if cfg.max_steps is not None else int(cfg.num_epochs) * per_epoch
    lr = float(cfg.max_lr) * {"none": 1.0, "linear": d.world, "sqrt": math.sqrt(d.world)}[cfg.lr_scaling]
    optimizer, scheduler = task.build_optimizer(net, cfg, lr, total)
    if cfg.model and cfg.load_state and not cfg.resume:
        ckpt = load_checkpoint(cfg.model)
        load_optimizer_moments(optimizer, ckpt.get("optimizer") or ckpt.get("optimizer_state_dict"), net, cfg.model)
    amp = autocast_dtype(cfg, device)
    if amp == torch.bfloat16 and device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        warnings.warn("precision=bf16 on a CPU without native bf16 kernels is emulated and much slower than fp32",
                      stacklevel=2)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    model = net
    if d.enabled:
        model = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)
    s = Session(cfg, task, d, device, data, net, model, optimizer, scheduler, scaler, amp, total, per_epoch,
                cadence=Cadence.from_config(cfg.val_every, per_epoch, total),
                trial_due=amp_trial.trial_wanted(cfg, device))
    if cfg.resume:
        restore(s, load_checkpoint(cfg.resume))
    else:
        torch.manual_seed(cfg.seed + 1000 * d.rank)  # per-process dropout streams
    return s


# ---------------------------------------------------------------------------------------------------
# Exact resume: RNG states and the restored session
# ---------------------------------------------------------------------------------------------------


def rng_state() -> dict:
    """This process's RNG states (torch CPU/CUDA, numpy, python) as checkpoint-storable data."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
             "python": [version, list(internal), gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(int(x) for x in internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def best_key(task: Task) -> str:
    """Name of the best score in checkpoint metrics: best_jaccard for select_metric=val_jaccard."""
    return f"best_{task.select_metric.removeprefix('val_')}"


def restore(s: Session, ckpt: dict) -> None:
    """Continue a run: weights, optimiser, schedule, scaler, RNG states, step and best score."""
    s.net.load_state_dict({k: v.to(s.device) for k, v in ckpt["state_dict"].items()})
    s.optimizer.load_state_dict(ckpt["optimizer"])
    s.scheduler.load_state_dict(ckpt["scheduler"])
    if ckpt.get("scaler"):
        s.scaler.load_state_dict(ckpt["scaler"])
    s.step = int(ckpt["step"])
    metrics = ckpt.get("metrics") or {}
    s.best, s.best_step = float(metrics.get(best_key(s.task), -math.inf)), int(metrics.get("best_step", 0))
    s.history = list(metrics.get("history", []))
    s.cadence.load(ckpt.get("val_cadence"))
    s.precision_trial = (ckpt.get("meta") or {}).get("precision_trial")
    if s.precision_trial and s.cfg.precision == "auto":  # the run's trial decided; no new trial on resume
        s.autocast_dtype = amp_trial.DTYPES[s.precision_trial["chosen"]]
    states = (ckpt.get("rng") or {}).get("ranks") or []
    if len(states) == s.d.world:
        set_rng_state(states[s.d.rank])
    else:
        warnings.warn(f"resume: checkpoint has RNG states of {len(states)} process(es), this run has {s.d.world}; "
                      "continuing with fresh random streams (not an exact continuation)", stacklevel=2)
        torch.manual_seed(int(s.cfg.seed) + 1000 * s.d.rank + s.step)


# ---------------------------------------------------------------------------------------------------
# One step, validation
# ---------------------------------------------------------------------------------------------------


def to_device(batch: dict, device: torch.device, channels_last: bool = False) -> dict:
    out = {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    if channels_last:
        out["image"] = out["image"].contiguous(memory_format=torch.channels_last)
    return out


def autocast(s: Session):
    if s.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(s.device.type, dtype=s.autocast_dtype)


def train_step(s: Session, inputs) -> dict:
    """One optimiser step; returns the float loss terms. A non-finite loss on any process stops the run."""
    loss, terms = s.task.compute_loss(s, inputs)
    names = ["loss", *terms]
    local = [float(loss.detach()), *(float(v.detach()) for v in terms.values())]
    # one all-reduce: the global mean of every term (what the logs show) and whether any process diverged
    summed = all_reduce([*local, 0.0 if math.isfinite(local[0]) else 1.0], s.d, s.device)
    if summed[-1]:
        last = Path(s.cfg.output_dir) / "last.pth"
        keep = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was written yet"
        raise DivergedError(f"loss became {local[0]} at step {s.step + 1}; stopped ({keep}); "
                            "lower max_lr, use precision=fp32 or check the data")
    s.optimizer.zero_grad(set_to_none=True)
    s.scaler.scale(loss).backward()
    if s.cfg.grad_clip:
        s.scaler.unscale_(s.optimizer)
        torch.nn.utils.clip_grad_norm_(s.net.parameters(), float(s.cfg.grad_clip))
    s.scaler.step(s.optimizer)
    s.scaler.update()
    s.step += 1
    if s.step < s.total_steps:  # OneCycleLR defines total_steps learning rates; the last one is in use now
        s.scheduler.step()
    return {k: v / s.d.world for k, v in zip(names, summed)}


@torch.no_grad()
def validate(s: Session) -> dict:
    """The task's validation metrics, in evaluation mode; training mode is restored afterwards.

    Under DDP without SyncBatchNorm the BatchNorm buffers drift apart per process: rank 0's are
    broadcast first, so every shard is scored by the same model.
    """
    s.net.eval()
    if s.d.enabled and not s.cfg.sync_bn:
        for b in s.net.buffers():
            dist.broadcast(b, 0)
    metrics = s.task.validate(s)
    set_train_mode(s.net, s.cfg)
    return metrics


# ---------------------------------------------------------------------------------------------------
# Checkpoints (rank 0 writes; every rank joins the RNG gather)
# ---------------------------------------------------------------------------------------------------


LEAN_CHECKPOINTS = ("best.pth",)  # weights, config, meta and scores only: what inference and model= read


def save(s: Session, path: Path, rng: dict | None) -> None:
    """Self-describing, atomic checkpoint; with `rng` it holds everything `resume` needs.

    Without `rng` it is lean (best.pth): weights, model and training config, the task's meta and the
    scores, but no optimiser, scheduler or RNG state -- a third of the size for Adam-type optimisers.
    """
    metrics = {best_key(s.task): s.best, "best_step": s.best_step, **(s.history[-1] if s.history else {})}
    state = {}
    if rng is not None:
        state = {"optimizer": s.optimizer.state_dict(), "scheduler": s.scheduler.state_dict(),
                 "scaler": s.scaler.state_dict() if s.scaler.is_enabled() else None, "rng": rng,
                 "val_cadence": s.cadence.state()}
        metrics["history"] = s.history[-1000:]
    meta = s.task.checkpoint_meta(s)
    if s.precision_trial:
        meta = {**meta, "precision_trial": s.precision_trial}
    save_checkpoint(path, s.net, **state, step=s.step, epoch=s.step / max(s.per_epoch, 1), metrics=metrics,
                    train_config=OmegaConf.to_container(s.cfg, resolve=True), meta=meta)


def checkpoint(s: Session, names: list[str]) -> None:
    """Write the named checkpoints of the current state (all ranks join: RNG states are gathered)."""
    rng = {"ranks": gather_object(rng_state(), s.d)}
    if s.d.main:
        out = Path(s.cfg.output_dir)
        for name in names:
            save(s, out / name, None if name in LEAN_CHECKPOINTS else rng)


# ---------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------


def is_due(step: int, every, total: int) -> bool:
    return step == total or bool(every and step % int(every) == 0)


def _after_validation(s: Session, log: RunLog, bar, lr: float, running: tuple[float, int], started: float,
                      on_validation) -> list[str]:
    """Score, record and report one validation; returns the checkpoints it calls for."""
    metrics = validate(s)
    row = {"step": s.step, "epoch": round(s.step / max(s.per_epoch, 1), 3), "lr": lr,
           "train_loss": running[0] / max(running[1], 1), **metrics, "time_s": round(time.time() - started, 1)}
    s.history.append(row)
    names = []
    improved = is_better(s, metrics)
    if improved:
        s.best, s.best_step = metrics[s.task.select_metric], s.step
        names.append("best.pth")
    names.append("last.pth")
    if log.enabled:
        log.validation(row)
        shown = "  ".join(f"{s.task.metric_labels.get(k, k)} {row[k]:.4f}" for k in s.task.metric_names)
        bar.write(f"step {s.step}: {shown}" + ("  *best*" if improved else ""))
    if on_validation is not None:
        on_validation(s, row)
    return names


def is_better(s: Session, metrics: dict) -> bool:
    """A higher `select_metric` wins; on a tie the task's optional `tie_metric` (higher is better) decides."""
    value, tie = metrics[s.task.select_metric], getattr(s.task, "tie_metric", None)
    if value != s.best or tie is None:
        return value > s.best
    best_row = next((r for r in s.history if r["step"] == s.best_step), {})
    return metrics[tie] > best_row.get(tie, math.inf)


@dataclass
class _Clock:
    """Training seconds and steps since the cadence was last planned; seconds of the last validation's checkpoints."""
    train_s: float = 0.0
    steps: int = 0
    write_s: float = 0.0


def _replan(s: Session, log: RunLog, bar, clock: _Clock, val_s: float | None) -> None:
    """Adaptive validation cadence: plan from rank 0's timings, the same on every rank; one line when it changes."""
    step_s = clock.train_s / max(clock.steps, 1)
    changed = s.cadence.plan(s.step, step_s, val_s)
    s.cadence.every, s.cadence.next_step, changed = broadcast_object((s.cadence.every, s.cadence.next_step, changed),
                                                                     s.d)
    if changed and log.enabled:
        bar.write(s.cadence.describe(step_s, val_s))
    clock.train_s, clock.steps = 0.0, 0


def _first_batch_trial(s: Session, inputs: Iterator) -> Iterator:
    """precision=auto on a CPU with native bf16: lib.amp_trial decides on the first batch, which the first step
    then uses (the trial leaves the run's trajectory unchanged)."""
    first = next(inputs)
    s.precision_trial, s.trial_due = amp_trial.choose(s, first), False
    if s.d.main:
        print(amp_trial.describe(s.precision_trial), flush=True)
    return itertools.chain([first], inputs)


def fit(s: Session, on_validation: Callable[[Session, dict], None] | None = None, write: bool = True) -> dict:
    """Run the training loop to `total_steps`, validating, logging and checkpointing on schedule.

    `on_validation(session, metrics)` is called after every validation (hyper-parameter search hooks
    in here; it may raise to stop the run). `write=False` keeps everything in memory (no files).
    Validation follows `s.cadence` (lib.val_cadence); its adaptive modes are fed the seconds measured here
    (the first step of a session, with its start-up costs, is not counted).
    """
    cfg, d = s.cfg, s.d
    log = RunLog(Path(cfg.output_dir), s.task.metric_names, write and d.main, s.task.metric_labels)
    log.open(OmegaConf.to_yaml(s.cfg), s.step)
    set_train_mode(s.net, cfg)
    inputs = s.task.train_batches(s)
    if s.trial_due:
        inputs = _first_batch_trial(s, inputs)
    bar = progress_bar(total=s.total_steps, initial=s.step, disable=not (d.main and cfg.progress),
                       dynamic_ncols=True, desc="train", unit="step")
    running, count, started, smooth, clock, first = 0.0, 0, time.time(), None, _Clock(), s.step + 1
    try:
        while s.step < s.total_steps:
            t0 = time.perf_counter()
            terms = train_step(s, next(inputs))
            running, count = running + terms["loss"], count + 1
            smooth = terms["loss"] if smooth is None else 0.9 * smooth + 0.1 * terms["loss"]
            lr = s.optimizer.param_groups[0]["lr"]
            # refresh=False: the bar's own schedule (lib.cli.progress_bar) decides when a line is written
            bar.set_postfix(loss=f"{smooth:.4f}", lr=f"{lr:.2e}", epoch=s.step // max(s.per_epoch, 1), refresh=False)
            bar.update(1)
            if s.step % int(cfg.log_every) == 0:
                log.scalars("train", {**terms, "lr": lr}, s.step)
            if s.step > first:
                clock.train_s, clock.steps = clock.train_s + time.perf_counter() - t0, clock.steps + 1
            names, validated = [], s.cadence.due(s.step)
            if validated:
                t1 = time.perf_counter()
                names = _after_validation(s, log, bar, lr, (running, count), started, on_validation)
                running, count = 0.0, 0
                if s.cadence.adaptive and s.step < s.total_steps:
                    _replan(s, log, bar, clock, time.perf_counter() - t1 + clock.write_s)
            elif s.cadence.probe_due(s.step):
                _replan(s, log, bar, clock, None)
            if is_due(s.step, cfg.save_every, s.total_steps) and "last.pth" not in names:
                names.append("last.pth")
            if cfg.keep_every and s.step % int(cfg.keep_every) == 0:
                names.append(f"m{s.step}.pth")
            if names and write:  # same decision on every rank: all of them join the RNG gather
                t2 = time.perf_counter()
                checkpoint(s, names)
                clock.write_s = time.perf_counter() - t2 if validated else clock.write_s
    finally:
        bar.close()
        log.close()
    log.curves(s.history)
    return summary(s)


def summary(s: Session) -> dict:
    """output_dir, step, the best score (`best` and under its own name, e.g. best_jaccard), history."""
    last = s.history[-1] if s.history else {}
    return {"output_dir": str(s.cfg.output_dir), "step": s.step, "best": s.best, best_key(s.task): s.best,
            "best_step": s.best_step, "last": last, "history": list(s.history)}

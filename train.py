"""Train the building segmentation network: the Open Cities 3rd-place recipe, complete and resumable.

    python train.py batch_size=5 data_dir=<chips> max_lr=0.0002 weight_decay=6.3e-7 fold=0 model_name=efficientnet-b1
    python train.py ... model_name=efficientnet-b2 use_mish=True use_context_block=True
    python train.py ... drop_connect_rate=0.5 soft_labels_dir=<soft labels>       # self-training (Noisy Student)
    python train.py resume=outputs/train/<run>/last.pth                           # exact continuation
    torchrun --nproc_per_node=4 train.py ...                                      # data parallel

The file reads like the recipe: config -> data -> model -> optimiser -> loop -> validation -> checkpoints.

Data order and augmentation are a pure function of (seed, epoch, sample index): every sample re-seeds
the augmentation pipeline from those numbers, and each epoch's order comes from `DistributedSampler`
(or a seeded `WeightedRandomSampler`). A resumed run therefore skips the batches already consumed and
sees exactly the data the uninterrupted run would have seen; together with the restored model,
optimiser, scheduler, scaler and RNG states, its next loss is the same, bit for bit on CPU.

Under torchrun each process trains on its own shard with `batch_size` chips (the global batch is
batch_size x processes); only rank 0 writes files. The one-cycle schedule uses `max_lr` as given:
with N processes either keep it (same recipe, N times the samples per step) or scale it yourself or
with `lr_scaling=linear|sqrt` (max_lr x N or x sqrt(N)); sqrt is the safer rule for Adam-type optimisers.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import math
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

import dataset
from lib.cli import CONFIG_DIR, cli, progress_bar
from lib.distributed import Dist, all_reduce, broadcast_object, gather_object, leave_process_group, setup_distributed
from lib.errors import UserError
from lib.files import atomic_path
from lib.losses import LossConfig, soft_label_loss, soft_to_hard, supervised_loss, upsample_to
from model import (
    DICE,
    MODEL_KEYS,
    SEG,
    build_model,
    load_checkpoint,
    load_model,
    model_kwargs_from_cfg,
    save_checkpoint,
)
from optim import build_optimizer, build_scheduler

# Keys a resumed run may change; every other key comes from the checkpoint so the run continues exactly.
RUNTIME_KEYS = ("resume", "output_dir", "device", "num_workers", "progress", "log_every", "save_every",
                "keep_every", "threads", "data_dir", "soft_labels_dir", "compile")
# max_lr when the config leaves it unset: the original recipe's value for fine-tuning an ImageNet encoder,
# a larger one for random initialisation, which tolerates (and needs) bigger steps.
DEFAULT_LR_PRETRAINED = 2e-4
DEFAULT_LR_SCRATCH = 3e-3


class DivergedError(UserError):
    """The loss became NaN or infinite (the run stops; the last checkpoint on disk is the last good one)."""


# ---------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------


def arch_slug(cfg) -> str:
    """Short architecture name for run folders: b1, b2_context_mish, ... (from the model keys themselves)."""
    slug = str(cfg.model_name).replace("efficientnet-", "")
    if cfg.get("use_context_block"):
        slug += "_context"
    if cfg.get("use_mish"):
        slug += "_mish"
    return slug


def check_config(cfg) -> None:
    """Reject settings that would fail late or silently do something else."""
    width = int(cfg.width)
    if width <= 0 or width % 32:
        raise UserError(f"width={cfg.width}: must be a positive multiple of 32 (e.g. 256, 512)")
    if int(cfg.batch_size) < 1:
        raise UserError(f"batch_size={cfg.batch_size}: must be at least 1")
    if cfg.max_steps is None and not cfg.num_epochs:
        raise UserError("num_epochs and max_steps are both unset; give at least one")
    if cfg.precision not in ("auto", "fp32", "bf16", "fp16"):
        raise UserError(f"precision={cfg.precision}: use auto, fp32, bf16 or fp16")
    if cfg.lr_scaling not in ("none", "linear", "sqrt"):
        raise UserError(f"lr_scaling={cfg.lr_scaling}: use none, linear or sqrt")
    band = list(cfg.soft_band)
    if len(band) != 2 or not 0.0 <= band[0] <= band[1] <= 1.0:
        raise UserError(f"soft_band={band}: give [low, high] with 0 <= low <= high <= 1")
    if not 0.0 <= float(cfg.label_smoothing) < 1.0:
        raise UserError(f"label_smoothing={cfg.label_smoothing}: must be in [0, 1)")
    if not 0.0 < float(cfg.ohem_ratio) <= 1.0:
        raise UserError(f"ohem_ratio={cfg.ohem_ratio}: must be in (0, 1]")
    if int(cfg.soft_every) < 1:
        raise UserError(f"soft_every={cfg.soft_every}: must be at least 1")


def resolve_config(cfg, d: Dist):
    """Plain, fully resolved copy of the config with the automatic values filled in.

    `data_dir` unset -> the built-in demo chips and a short run; `max_lr` unset -> a default suited to
    pretrained or random initialisation; `output_dir` unset -> outputs/train/<date>_<time>_<arch>
    (chosen on rank 0, so all processes agree); `resume` -> the saved config (see RUNTIME_KEYS).
    """
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    if cfg.resume:
        cfg = merge_resumed_config(cfg)
    if cfg.debug:
        cfg.max_steps = min(int(cfg.max_steps or 10), 10)
        cfg.num_workers = 0
        cfg.log_every = 1
    if not cfg.data_dir:
        cfg.data_dir = str(broadcast_object(str(dataset.demo_chips_dir()) if d.main else None, d))
        if cfg.max_steps is None:
            cfg.max_steps = int(cfg.demo_steps)
    if cfg.max_lr is None:
        cfg.max_lr = DEFAULT_LR_PRETRAINED if (cfg.pretrained or cfg.model) else DEFAULT_LR_SCRATCH
    if not cfg.output_dir:
        stamp = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
        cfg.output_dir = broadcast_object(str(Path("outputs") / "train" / f"{stamp}_{arch_slug(cfg)}"), d)
    check_config(cfg)
    return cfg


def default_config() -> dict:
    """train.yaml's own values with the default arch preset (no Hydra needed, usable inside a running app)."""
    base = OmegaConf.load(CONFIG_DIR / "train.yaml")
    arch = OmegaConf.load(CONFIG_DIR / "arch" / "b1.yaml")
    merged = OmegaConf.to_container(OmegaConf.merge(base, arch), resolve=True)
    return {k: v for k, v in merged.items() if k not in ("defaults", "hydra")}


def merge_resumed_config(cfg):
    """The checkpoint's training config, with only the runtime keys the user changed taken from `cfg`.

    A key counts as changed when it differs from its default, so `train.py resume=<path>` alone continues
    the run exactly as it was configured; other changed keys are reported and ignored.
    """
    ckpt = load_checkpoint(cfg.resume)
    saved = ckpt.get("train_config")
    if not isinstance(saved, dict) or "step" not in ckpt or "optimizer" not in ckpt:
        raise UserError(f"{cfg.resume}: not a training checkpoint (no optimizer state/step); "
                        "use model=<path> to start a new run from its weights")
    given = OmegaConf.to_container(cfg, resolve=True)
    defaults = default_config()
    changed = {k for k, v in given.items() if k in defaults and v != defaults[k]}
    merged = OmegaConf.merge(OmegaConf.create(given), OmegaConf.create(saved))
    for key in RUNTIME_KEYS:
        if key in changed:
            merged[key] = given[key]
    merged.resume = cfg.resume
    if not given.get("output_dir"):  # continue in the checkpoint's folder, wherever the run folder now lives
        merged.output_dir = str(Path(cfg.resume).resolve().parent)
    ignored = sorted(k for k in changed if k not in RUNTIME_KEYS and k in saved and given[k] != saved[k])
    if ignored:
        warnings.warn(f"resume: keeping the checkpoint's {', '.join(ignored)} (an exact continuation); "
                      "start a new run with model=<checkpoint> load_state=1 to change them", stacklevel=2)
    return merged


# ---------------------------------------------------------------------------------------------------
# Data: deterministic, resumable order and augmentation
# ---------------------------------------------------------------------------------------------------


def seed_transform(transform, seed_words: list[int]) -> None:
    """Re-seed an albumentations pipeline, giving every transform its own stream.

    `Compose.set_random_seed` hands the *same* seed to every child, which couples their decisions
    (e.g. both flips always fire together); distinct child seeds keep them independent.
    """
    nodes = []

    def walk(t):
        nodes.append(t)
        for child in getattr(t, "transforms", []) or []:
            walk(child)

    walk(transform)
    states = np.random.SeedSequence(seed_words).generate_state(len(nodes))
    for node, s in zip(nodes, states):
        node.set_random_seed(int(s))


class SeededItems(torch.utils.data.Dataset):
    """Wraps a ChipDataset; item (epoch, index) is augmented with seeds derived from (seed, stream, epoch, index).

    The augmentation of a sample therefore does not depend on worker count, process count or on where
    a run was resumed.
    """
    def __init__(self, base, seed: int, stream: int):
        self.base, self.seed, self.stream = base, int(seed), int(stream)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        epoch, index = key
        if self.base.transform is not None:
            seed_transform(self.base.transform, [self.seed, self.stream, int(epoch), int(index)])
        return self.base[int(index)]


class EpochBatches(torch.utils.data.Sampler):
    """Endless batches of (epoch, index) keys for this process, starting after `start` consumed batches.

    Epoch e's order is `DistributedSampler(seed, epoch=e)` (one process: a seeded permutation), or with
    `weights` a `WeightedRandomSampler` seeded by (seed, e), then dealt round-robin to the processes.
    Each epoch yields `per_epoch` full batches; the remainder is dropped (the next epoch reshuffles).
    """
    def __init__(self, n: int, batch_size: int, seed: int, d: Dist, weights=None, start: int = 0):
        self.n, self.batch_size, self.seed, self.d, self.start = n, batch_size, int(seed), d, int(start)
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.double)
        self.per_epoch = (n // d.world) // batch_size
        self._cache: tuple[int, list[int]] | None = None

    def indices(self, epoch: int) -> list[int]:
        """This process's sample order in `epoch`."""
        if self._cache and self._cache[0] == epoch:
            return self._cache[1]
        usable = (self.n // self.d.world) * self.d.world
        if self.weights is None:
            sampler = torch.utils.data.DistributedSampler(range(self.n), num_replicas=self.d.world, rank=self.d.rank,
                                                          shuffle=True, seed=self.seed, drop_last=True)
            sampler.set_epoch(epoch)
            order = list(sampler)
        else:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            drawn = list(torch.utils.data.WeightedRandomSampler(self.weights, usable, replacement=True, generator=g))
            order = drawn[self.d.rank::self.d.world]
        self._cache = (epoch, order)
        return order

    def __iter__(self):
        b = self.start
        while True:
            epoch, k = divmod(b, self.per_epoch)
            order = self.indices(epoch)
            yield [(epoch, i) for i in order[k * self.batch_size:(k + 1) * self.batch_size]]
            b += 1


def building_fractions(chips) -> np.ndarray:
    """Fraction of building pixels in each chip's mask (0 for chips without a mask)."""
    import cv2

    out = np.zeros(len(chips))
    for i, chip in enumerate(chips):
        if chip.mask is not None:
            m = cv2.imread(str(chip.mask), cv2.IMREAD_GRAYSCALE)
            out[i] = float((m >= 128).mean()) if m is not None else 0.0
    return out


def balanced_weights(fractions: np.ndarray) -> np.ndarray:
    """Sampling weights that make empty, sparse and dense chips equally likely.

    Sparse/dense split at the median building fraction of the non-empty chips, so the bins adapt to the
    data (building-centred chips are rarely empty; grid tiles often are). Empty bins get no share.
    """
    empty = fractions <= 0
    nonempty = fractions[~empty]
    median = float(np.median(nonempty)) if nonempty.size else 0.0
    bins = np.where(empty, 0, np.where(fractions < median, 1, 2))
    counts = np.bincount(bins, minlength=3).astype(float)
    used = int((counts > 0).sum())
    return 1.0 / (used * counts[bins])


@dataclass
class Data:
    train: list
    val: list
    soft: list
    train_set: object = None
    val_set: object = None
    soft_set: object = None
    train_gsd: float | None = None


def load_data(cfg, d: Dist) -> Data:
    """List and split the chips, build the datasets; every problem a user can fix is a UserError."""
    chips = dataset.list_chips(cfg.data_dir)
    if not chips:
        raise UserError(f"{cfg.data_dir}: no training chips found (image + <name>_mask.png); "
                        "prepare them with `python dataset.py base_dir=<data> out_dir=<chips>`")
    train, val = dataset.split_folds(chips, int(cfg.fold), int(cfg.num_folds), by=cfg.split_by, seed=int(cfg.split_seed))
    if not val:
        raise UserError(f"fold={cfg.fold}: no validation chips in {cfg.data_dir} ({len(chips)} chips, "
                        f"{len({c.scene for c in chips})} scenes, num_folds={cfg.num_folds}); choose another fold, "
                        "lower num_folds or use split_by=chip")
    if cfg.debug:
        train, val = train[:16], val[:8]
    soft = []
    if cfg.soft_labels_dir:
        soft = [c for c in dataset.list_chips(cfg.soft_labels_dir) if c.mask is not None]
        if not soft:
            raise UserError(f"{cfg.soft_labels_dir}: no soft-labelled images (<name> + <name>_mask.png); "
                            "write them with `python combine_images.py base_dir=<runs> add_mask_suffix=True`")
    need = int(cfg.batch_size) * d.world
    for name, items in (("training", train), ("soft-label", soft)):
        if items and len(items) < need:
            raise UserError(f"{cfg.data_dir if name == 'training' else cfg.soft_labels_dir}: only {len(items)} "
                            f"{name} chips for a batch of {cfg.batch_size} x {d.world} process(es); "
                            "lower batch_size or add chips")
    width, ref = int(cfg.width), cfg.ref_scale

    def augmenting(items):
        tf = dataset.train_transform(width, level=cfg.augment, transpose=bool(cfg.transpose))
        return dataset.ChipDataset(items, tf, ref_scale=ref)

    gsds = [c.gsd for c in train if c.gsd]
    return Data(train, val, soft, augmenting(train), dataset.ChipDataset(val, dataset.val_transform(width), ref),
                augmenting(soft) if soft else None, float(np.median(gsds)) if gsds else None)


def make_loader(items, cfg, sampler, device) -> torch.utils.data.DataLoader:
    """DataLoader over (epoch, index) batches; its own generator keeps the global torch RNG untouched."""
    workers = int(cfg.num_workers)
    return torch.utils.data.DataLoader(
        items, batch_sampler=sampler, num_workers=workers, pin_memory=device.type == "cuda",
        persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
        generator=torch.Generator(),
    )


# ---------------------------------------------------------------------------------------------------
# Model and optimisation
# ---------------------------------------------------------------------------------------------------


def model_arch(cfg) -> dict:
    """The architecture keys (MODEL_KEYS) set in the config."""
    return {k: cfg.get(k) for k in MODEL_KEYS if cfg.get(k) is not None}


def create_model(cfg) -> torch.nn.Module:
    """Build the network: from `model=<checkpoint>` weights (ours or the original pipeline's) or fresh."""
    if not cfg.model:
        return build_model(**model_kwargs_from_cfg(cfg))
    arch = model_arch(cfg)
    ours = isinstance(load_checkpoint(cfg.model).get("model_config"), dict)
    # Our checkpoints describe themselves; the original pipeline's cannot tell use_mish without a context block.
    net = load_model(cfg.model, drop_connect_rate=arch.get("drop_connect_rate"),
                     **({} if ours else {"use_mish": arch.get("use_mish")}))
    differ = [k for k in arch if k != "drop_connect_rate" and k in net.config and net.config[k] != arch[k]]
    if differ:
        have = " ".join(f"{k}={net.config[k]}" for k in differ)
        want = " ".join(f"{k}={arch[k]}" for k in differ)
        raise UserError(f"{cfg.model}: the checkpoint is {have} but the training config asks for {want}; "
                        f"add `{have}` to the command line")
    return net


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


# ---------------------------------------------------------------------------------------------------
# Training session: everything a step needs
# ---------------------------------------------------------------------------------------------------


@dataclass
class Session:
    cfg: object
    d: Dist
    device: torch.device
    data: Data
    net: torch.nn.Module  # the bare model (checkpoints, validation)
    model: torch.nn.Module  # what the step calls: net, DDP(net) and/or compiled
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    losses: object
    autocast_dtype: torch.dtype | None
    total_steps: int
    per_epoch: int
    step: int = 0
    best: float = -1.0
    best_step: int = 0
    history: list = field(default_factory=list)
    val_loader: object = None


def autocast_dtype(cfg, device: torch.device) -> torch.dtype | None:
    """Mixed-precision dtype: auto = bf16 on CUDA when supported, else fp16 on CUDA, fp32 elsewhere."""
    p = cfg.precision
    if p == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[p]


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


def prepare(cfg, d: Dist | None = None, device: torch.device | None = None) -> Session:
    """Resolve the config and build data, model, optimiser, schedule and scaler (restoring a resumed run)."""


    if d is None or device is None:
        d, device = setup_distributed(cfg.device)
    cfg = resolve_config(cfg, d)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # identical initial weights on every process
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = bool(cfg.cudnn_benchmark) and not cfg.deterministic
        torch.backends.cudnn.deterministic = bool(cfg.deterministic)
    data = load_data(cfg, d)
    net = create_model(cfg).to(device)
    set_bn_momentum(net, cfg.bn_momentum)
    if cfg.sync_bn and d.enabled:
        if device.type != "cuda":
            raise UserError("sync_bn=true needs CUDA (torch's SyncBatchNorm does not run on CPU); "
                            "use freeze_bn=true or sync_bn=false")
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    channels_last = device.type == "cuda" if cfg.channels_last == "auto" else bool(cfg.channels_last)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    per_epoch = (len(data.train) // d.world) // int(cfg.batch_size)
    total = int(cfg.max_steps) if cfg.max_steps is not None else int(cfg.num_epochs) * per_epoch
    lr = float(cfg.max_lr) * {"none": 1.0, "linear": d.world, "sqrt": math.sqrt(d.world)}[cfg.lr_scaling]
    optimizer = build_optimizer(net, lr, float(cfg.weight_decay), over9000=bool(cfg.use_over9000_optimizer))
    if cfg.model and cfg.load_state and not cfg.resume:
        ckpt = load_checkpoint(cfg.model)
        load_optimizer_moments(optimizer, ckpt.get("optimizer") or ckpt.get("optimizer_state_dict"), net, cfg.model)
    scheduler = build_scheduler(optimizer, lr, total, pct_start=float(cfg.pct_start),
                                div_factor=float(cfg.div_factor), final_div_factor=float(cfg.final_div_factor))
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
    s = Session(cfg, d, device, data, net, model, optimizer, scheduler, scaler, LossConfig.from_cfg(cfg), amp,
                total, per_epoch)
    if cfg.resume:
        restore(s, load_checkpoint(cfg.resume))
    else:
        torch.manual_seed(cfg.seed + 1000 * d.rank)  # per-process dropout streams
    return s


def restore(s: Session, ckpt: dict) -> None:
    """Continue a run: weights, optimiser, schedule, scaler, RNG states, step and best score."""
    s.net.load_state_dict({k: v.to(s.device) for k, v in ckpt["state_dict"].items()})
    s.optimizer.load_state_dict(ckpt["optimizer"])
    s.scheduler.load_state_dict(ckpt["scheduler"])
    if ckpt.get("scaler"):
        s.scaler.load_state_dict(ckpt["scaler"])
    s.step = int(ckpt["step"])
    metrics = ckpt.get("metrics") or {}
    s.best, s.best_step = float(metrics.get("best_jaccard", -1.0)), int(metrics.get("best_step", 0))
    s.history = list(metrics.get("history", []))
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


def split_outputs(out: dict, n: int) -> tuple[dict, dict]:
    return {k: v[:n] for k, v in out.items()}, {k: v[n:] for k, v in out.items()}


def autocast(s: Session):
    if s.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(s.device.type, dtype=s.autocast_dtype)


def compute_loss(s: Session, batch: dict, soft: dict | None = None):
    """Forward the labelled batch (and the soft-labelled one, in the same pass) and return (loss, terms)."""
    images = batch["image"] if soft is None else torch.cat([batch["image"], soft["image"]])
    with autocast(s):
        out = s.model(images)
    main, extra = split_outputs(out, batch["image"].shape[0])
    loss, terms = supervised_loss(main, batch["mask"], batch["ignore"], batch["gsd"], s.losses, train=True)
    if soft is not None:
        if s.cfg.soft_to_hard:
            hard, ignore = soft_to_hard(soft["mask"], soft["ignore"], tuple(s.cfg.soft_band))
            soft_loss, soft_terms = supervised_loss(extra, hard, ignore, soft["gsd"], s.losses, train=True)
            soft_terms = {f"soft_{k}": v for k, v in soft_terms.items()}
        else:
            soft_loss, soft_terms = soft_label_loss(extra, soft["mask"], soft["ignore"], s.losses)
        loss = loss + float(s.cfg.soft_weight) * soft_loss
        terms.update(soft_terms)
    return loss, terms


def train_step(s: Session, batch: dict, soft: dict | None = None) -> dict:
    """One optimiser step; returns the float loss terms. A non-finite loss on any process stops the run."""
    loss, terms = compute_loss(s, batch, soft)
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
    """Loss and global pixel Jaccard (sum of intersections / sum of unions) of the seg and dice heads.

    Logits are upsampled to the label resolution and thresholded at 0.5; ignored pixels count for
    nothing. With several processes each scores a shard and the sums are added up.
    """
    s.net.eval()
    if s.d.enabled and not s.cfg.sync_bn:  # BatchNorm buffers drift apart per process; score rank 0's
        for b in s.net.buffers():
            dist.broadcast(b, 0)
    if s.val_loader is None:
        shard = torch.utils.data.Subset(s.data.val_set, list(range(s.d.rank, len(s.data.val_set), s.d.world)))
        workers = int(s.cfg.num_workers)
        s.val_loader = torch.utils.data.DataLoader(
            shard, batch_size=int(s.cfg.val_batch_size or s.cfg.batch_size), num_workers=workers,
            pin_memory=s.device.type == "cuda", persistent_workers=workers > 0, generator=torch.Generator())
    loader = s.val_loader
    sums = np.zeros(6)  # loss*n, n, I_seg, U_seg, I_dice, U_dice
    for batch in loader:
        batch = to_device(batch, s.device)
        with autocast(s):
            out = s.net(batch["image"])
        loss, _ = supervised_loss(out, batch["mask"], batch["ignore"], batch["gsd"], s.losses, train=False)
        valid = batch["ignore"] < 0.5
        truth = (batch["mask"] >= 0.5) & valid
        size = batch["mask"].shape[-2:]
        seg = (torch.softmax(upsample_to(out[SEG], size), 1)[:, 1] > 0.5) & valid
        dice = (upsample_to(out[DICE], size)[:, 0] > 0) & valid
        n = batch["image"].shape[0]
        sums += [float(loss) * n, n, (seg & truth).sum().item(), (seg | truth).sum().item(),
                 (dice & truth).sum().item(), (dice | truth).sum().item()]
    total = all_reduce(sums.tolist(), s.d, s.device)
    set_train_mode(s.net, s.cfg)
    return {"val_loss": total[0] / max(total[1], 1), "val_jaccard": total[2] / max(total[3], 1.0),
            "val_jaccard_dice": total[4] / max(total[5], 1.0)}


# ---------------------------------------------------------------------------------------------------
# Outputs: checkpoints, metrics, plots (rank 0 only)
# ---------------------------------------------------------------------------------------------------


def save(s: Session, path: Path, rng: dict) -> None:
    """Self-describing, atomic checkpoint with everything `resume` needs."""
    save_checkpoint(
        path, s.net,
        optimizer=s.optimizer.state_dict(), scheduler=s.scheduler.state_dict(),
        scaler=s.scaler.state_dict() if s.scaler.is_enabled() else None,
        rng=rng, step=s.step, epoch=s.step / max(s.per_epoch, 1),
        metrics={"best_jaccard": s.best, "best_step": s.best_step, "history": s.history[-1000:],
                 **(s.history[-1] if s.history else {})},
        train_config=OmegaConf.to_container(s.cfg, resolve=True),
        meta={"ref_scale": s.cfg.ref_scale, "train_gsd": s.data.train_gsd, "width": int(s.cfg.width),
              "arch": arch_slug(s.cfg)},
    )


def checkpoint(s: Session, names: list[str]) -> None:
    """Write the named checkpoints of the current state (all ranks join: RNG states are gathered)."""
    rng = {"ranks": gather_object(rng_state(), s.d)}
    if s.d.main:
        out = Path(s.cfg.output_dir)
        for name in names:
            save(s, out / name, rng)


METRIC_FIELDS = ["step", "epoch", "lr", "train_loss", "val_loss", "val_jaccard", "val_jaccard_dice", "time_s"]


def write_metrics_row(path: Path, row: dict) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRIC_FIELDS, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow(row)


def truncate_metrics(path: Path, step: int) -> None:
    """On resume drop rows written after the checkpoint, so metrics.csv reads as one continuous run."""
    if not path.exists():
        return
    with path.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRIC_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def plot_curves(history: list[dict], path: Path) -> None:
    """PNG of the train/validation loss and the validation Jaccard against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(steps, [h.get("train_loss") for h in history], "o-", label="train")
    ax1.plot(steps, [h["val_loss"] for h in history], "o-", label="validation")
    ax1.set(xlabel="step", ylabel="loss", title="Loss")
    ax1.legend()
    ax2.plot(steps, [h["val_jaccard"] for h in history], "o-", label="seg head (focal)")
    ax2.plot(steps, [h["val_jaccard_dice"] for h in history], "o-", label="dice head")
    ax2.set(xlabel="step", ylabel="pixel Jaccard", title="Validation Jaccard", ylim=(0, 1))
    ax2.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------


def batches(s: Session, which: str):
    """Endless iterator over this process's batches of the training (or soft-label) set, resumed in place."""
    cfg = s.cfg
    if which == "train":
        items, stream, start = s.data.train_set, 0, s.step
        weights = balanced_weights(building_fractions(s.data.train)) if cfg.balanced_sampling else None
    else:
        items, stream, start = s.data.soft_set, 1, s.step // int(cfg.soft_every)
        weights = None
    sampler = EpochBatches(len(items), int(cfg.batch_size), int(cfg.seed) + stream, s.d, weights, start)
    return iter(make_loader(SeededItems(items, int(cfg.seed), stream), cfg, sampler, s.device))


def is_due(step: int, every, total: int) -> bool:
    return step == total or bool(every and step % int(every) == 0)


def fit(s: Session, on_validation: Callable[[Session, dict], None] | None = None, write: bool = True) -> dict:
    """Run the training loop to `total_steps`, validating, logging and checkpointing on schedule.

    `on_validation(session, metrics)` is called after every validation (hyper-parameter search hooks
    in here; it may raise to stop the run). `write=False` keeps everything in memory (no files).
    """
    cfg, d = s.cfg, s.d
    files = write and d.main
    out = Path(cfg.output_dir)
    writer = None
    if files:
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / "config.yaml") as tmp:
            tmp.write_text(OmegaConf.to_yaml(s.cfg))
        truncate_metrics(out / "metrics.csv", s.step)
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out), purge_step=s.step or None)
    set_train_mode(s.net, cfg)
    channels_last = s.device.type == "cuda" if cfg.channels_last == "auto" else bool(cfg.channels_last)
    train_iter = batches(s, "train")
    soft_iter = batches(s, "soft") if s.data.soft_set is not None else None
    val_every = cfg.val_every or s.per_epoch
    bar = progress_bar(total=s.total_steps, initial=s.step, disable=not (d.main and cfg.progress), dynamic_ncols=True,
               desc="train", unit="step")
    running, count, started, smooth = 0.0, 0, time.time(), None
    try:
        while s.step < s.total_steps:
            batch = to_device(next(train_iter), s.device, channels_last)
            soft = None
            if soft_iter is not None and (s.step + 1) % int(cfg.soft_every) == 0:
                soft = to_device(next(soft_iter), s.device, channels_last)
            terms = train_step(s, batch, soft)
            running, count = running + terms["loss"], count + 1
            smooth = terms["loss"] if smooth is None else 0.9 * smooth + 0.1 * terms["loss"]
            lr = s.optimizer.param_groups[0]["lr"]
            bar.update(1)
            bar.set_postfix(loss=f"{smooth:.4f}", lr=f"{lr:.2e}", epoch=s.step // max(s.per_epoch, 1))
            if writer and s.step % int(cfg.log_every) == 0:
                for k, v in terms.items():
                    writer.add_scalar(f"train/{k}", v, s.step)
                writer.add_scalar("train/lr", lr, s.step)
            names = []
            if is_due(s.step, val_every, s.total_steps):
                metrics = validate(s)
                row = {"step": s.step, "epoch": round(s.step / max(s.per_epoch, 1), 3), "lr": lr,
                       "train_loss": running / max(count, 1), **metrics, "time_s": round(time.time() - started, 1)}
                running, count = 0.0, 0
                s.history.append(row)
                improved = metrics["val_jaccard"] > s.best
                if improved:
                    s.best, s.best_step = metrics["val_jaccard"], s.step
                    names.append("best.pth")
                names.append("last.pth")
                if files:
                    write_metrics_row(out / "metrics.csv", row)
                    for k in ("val_loss", "val_jaccard", "val_jaccard_dice"):
                        writer.add_scalar(f"val/{k.removeprefix('val_')}", row[k], s.step)
                    bar.write(f"step {s.step}: val_loss {row['val_loss']:.4f}  jaccard {row['val_jaccard']:.4f}  "
                              f"jaccard(dice head) {row['val_jaccard_dice']:.4f}" + ("  *best*" if improved else ""))
                if on_validation is not None:
                    on_validation(s, row)
            if is_due(s.step, cfg.save_every, s.total_steps) and "last.pth" not in names:
                names.append("last.pth")
            if cfg.keep_every and s.step % int(cfg.keep_every) == 0:
                names.append(f"m{s.step}.pth")
            if names and write:  # same decision on every rank: all of them join the RNG gather
                checkpoint(s, names)
    finally:
        bar.close()
        if writer:
            writer.close()
    if files and s.history:
        plot_curves(s.history, out / "curves.png")
    return summary(s)


def summary(s: Session) -> dict:
    last = s.history[-1] if s.history else {}
    return {"output_dir": str(s.cfg.output_dir), "step": s.step, "best_jaccard": s.best, "best_step": s.best_step,
            "last": last, "history": list(s.history)}


def run(cfg, on_validation=None, write: bool = True) -> dict:
    """Train as configured; returns a summary (output_dir, step, best Jaccard, validation history)."""
    d, device = setup_distributed(cfg.device)
    try:
        s = prepare(cfg, d, device)
        result = fit(s, on_validation=on_validation, write=write)
        if d.main and write:
            print(f"done: {result['step']} steps; best val Jaccard {result['best_jaccard']:.4f} at step "
                  f"{result['best_step']}; outputs in {result['output_dir']}")
        return result
    finally:
        leave_process_group(d)


@cli("train")
def main(cfg):
    run(cfg)


if __name__ == "__main__":
    main()

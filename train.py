"""Train the building segmentation network: the Open Cities 3rd-place recipe, complete and resumable.

    python train.py batch_size=5 data_dir=<chips> max_lr=0.0002 weight_decay=6.3e-7 fold=0 model_name=efficientnet-b1
    python train.py ... model_name=efficientnet-b2 use_mish=True use_context_block=True
    python train.py ... drop_connect_rate=0.5 soft_labels_dir=<soft labels>       # self-training (Noisy Student)
    python train.py data_dir=<chips> arch=light pretrained=false                  # lighter network, new CPU training
    python train.py resume=outputs/train/<run>/last.pth                           # exact continuation
    torchrun --nproc_per_node=4 train.py ...                                      # data parallel
    python train.py task=points data_dir=<prepared SAR> model_name=efficientnet-b4 width=1024  # CircleNet points

This file is the CLI and the segmentation task: config resolution (demo data, default max_lr, run
folder, resume) and `SegmentationTask` -- chips from dataset.py, the network from model.py, the losses
of lib.losses, pixel Jaccard of both heads and SpaceNet polygon precision/recall/F1 of the validation
chips' instances (watershed from the instance head's seeds, or connected components without the head). The task-neutral machinery (session, step, loop,
checkpoints, exact resume, DDP glue, logs) is lib.trainer; data order and augmentation are a pure
function of (seed, epoch, sample index) (dataset.EpochBatches), so a resumed run sees exactly the data
the uninterrupted run would have seen and its next loss is the same, bit for bit on CPU.

Under torchrun each process trains on its own shard with `batch_size` chips (the global batch is
batch_size x processes); only rank 0 writes files. The one-cycle schedule uses `max_lr` as given:
with N processes either keep it (same recipe, N times the samples per step) or scale it yourself or
with `lr_scaling=linear|sqrt` (max_lr x N or x sqrt(N)); sqrt is the safer rule for Adam-type optimisers.
"""

from __future__ import annotations

import datetime
import math
import warnings
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from omegaconf import OmegaConf

import dataset
import point_task
from lib import trainer
from lib.checkpoints import load_checkpoint
from lib.cli import CONFIG_DIR, cli, compose_config
from lib.devices import loader_workers
from lib.distributed import Dist, all_reduce, broadcast_object, leave_process_group, setup_distributed
from lib.errors import UserError
from lib.instances import label_instances
from lib.losses import INSTANCE_LOSSES, LossConfig, soft_label_loss, soft_to_hard, supervised_loss, upsample_to
from lib.metrics import prf, score_polygons
from lib.model_contract import INSTANCE, check_input_multiple
from lib.postprocess import DEFAULTS as POSTPROCESS
from lib.raster_outputs import seed_min_px
from lib.trainer import Session, autocast, to_device
from lib.val_cadence import parse_val_every
from model import DECODER_NORM, DICE, MODEL_KEYS, SEG, build_model, load_model, model_kwargs_from_cfg, set_instance_head
from optim import build_one_cycle

# Keys a resumed run may change; every other key comes from the checkpoint so the run continues exactly.
RUNTIME_KEYS = ("resume", "output_dir", "device", "num_workers", "chip_cache_mb", "progress", "log_every", "save_every",
                "keep_every", "threads", "data_dir", "soft_labels_dir", "compile")
# max_lr when the config leaves it unset: the original recipe's value for fine-tuning an ImageNet encoder,
# a larger one for random initialisation, which tolerates (and needs) bigger steps.
TASKS = ("segmentation", "points")
# select_by -> (metric that picks best.pth, metric that breaks its ties); null = polygon_f1
SELECT_BY = {"polygon_f1": ("val_polygon_f1", "val_jaccard"), "jaccard": ("val_jaccard", None)}
DEFAULT_LR_PRETRAINED = 2e-4
DEFAULT_LR_SCRATCH = 3e-3


# ---------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------


def arch_slug(cfg) -> str:
    """Short architecture name from the model keys themselves: b1, b2_context_mish, ..."""
    slug = str(cfg.model_name).replace("efficientnet-", "")
    if cfg.use_context_block:
        slug += "_context"
    if cfg.use_mish:
        slug += "_mish"
    if not cfg.use_ASPP:
        slug += "_noaspp"
    if cfg.decoder_norm == "none":
        slug += "_nogn"
    return slug


def run_name(cfg) -> str:
    """The architecture part of a run folder's name: the preset's `arch_name` when the model keys are
    exactly that preset's (`arch=b2_context_mish`, or the default b1), otherwise `arch_slug`.

    A run started with `model_name=efficientnet-b2 use_mish=True ...` on the default b1 preset must not be
    filed as "b1", so any architecture key that differs from the named preset falls back to the slug
    derived from the keys (which never lies, but does not show e.g. drop_connect_rate).
    """
    preset_file = CONFIG_DIR / "arch" / f"{cfg.arch_name}.yaml"
    if not preset_file.is_file():
        return arch_slug(cfg)
    preset = OmegaConf.to_container(OmegaConf.load(preset_file), resolve=True)
    same = all(cfg[k] == v for k, v in preset.items() if k != "arch_name" and k in cfg)
    return str(cfg.arch_name) if same else arch_slug(cfg)


def check_config(cfg) -> None:
    """Reject settings that would fail late or silently do something else."""
    if cfg.task not in TASKS:
        raise UserError(f"task={cfg.task}: use {' or '.join(TASKS)}")
    if cfg.task == "segmentation" and cfg.select_by not in (None, *SELECT_BY):
        raise UserError(f"select_by={cfg.select_by}: segmentation chooses best.pth by {' or '.join(SELECT_BY)}")
    if cfg.instance_loss not in INSTANCE_LOSSES:
        raise UserError(f"instance_loss={cfg.instance_loss}: use {' or '.join(INSTANCE_LOSSES)}")
    check_input_multiple("width", cfg.width)
    if int(cfg.batch_size) < 1:
        raise UserError(f"batch_size={cfg.batch_size}: must be at least 1")
    loader_workers(cfg.num_workers)  # a bad value fails before any work
    if cfg.max_steps is None and not cfg.num_epochs:
        raise UserError("num_epochs and max_steps are both unset; give at least one")
    if cfg.precision not in ("auto", "fp32", "bf16", "fp16"):
        raise UserError(f"precision={cfg.precision}: use auto, fp32, bf16 or fp16")
    parse_val_every(cfg.val_every)  # a one-line UserError for anything but auto, N, "Ns" or null
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

    `data_dir` unset -> the built-in demo chips and a short run; `pretrained` unset -> ImageNet weights,
    except on the demo chips (so the README's bare `python train.py` runs on a fresh offline machine);
    `max_lr` unset -> a default suited to pretrained or random initialisation; `output_dir` unset ->
    outputs/train/<date>_<time>_<run_name> (chosen on rank 0, so all processes agree); `resume` -> the
    saved config (see RUNTIME_KEYS).
    """
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    if cfg.resume:
        cfg = merge_resumed_config(cfg)
    if cfg.debug:
        cfg.max_steps = min(int(cfg.max_steps or 10), 10)
        cfg.num_workers = 0
        cfg.log_every = 1
    if cfg.pretrained is None:  # ImageNet weights for real data; the offline-friendly demo trains from scratch
        cfg.pretrained = bool(cfg.data_dir)
    if not cfg.data_dir and cfg.task == "points":
        if d.main:
            point_task.resolve_demo(cfg)
        cfg.data_dir, cfg.shore_root = broadcast_object((cfg.data_dir, cfg.shore_root), d)
        if cfg.max_steps is None:
            cfg.max_steps = int(cfg.demo_steps)
    if not cfg.data_dir:
        cfg.data_dir = str(broadcast_object(str(dataset.demo_chips_dir()) if d.main else None, d))
        if cfg.max_steps is None:
            cfg.max_steps = int(cfg.demo_steps)
    if cfg.max_lr is None:
        cfg.max_lr = DEFAULT_LR_PRETRAINED if (cfg.pretrained or cfg.model) else DEFAULT_LR_SCRATCH
    if not cfg.output_dir:
        stamp = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
        cfg.output_dir = broadcast_object(str(Path("outputs") / "train" / f"{stamp}_{run_name(cfg)}"), d)
    check_config(cfg)
    return cfg


def default_config() -> dict:
    """train.py's composed defaults (train.yaml, its shared groups and the default arch preset)."""
    return OmegaConf.to_container(compose_config("train"), resolve=True)


def merge_resumed_config(cfg):
    """The checkpoint's training config, with only the runtime keys the user changed taken from `cfg`.

    A key counts as changed when it differs from its default, so `train.py resume=<path>` alone continues
    the run exactly as it was configured; other changed keys are reported and ignored.
    """
    ckpt = load_checkpoint(cfg.resume)
    saved = ckpt.get("train_config")
    if not isinstance(saved, dict) or "step" not in ckpt or "optimizer" not in ckpt:
        raise UserError(f"{cfg.resume}: not a training checkpoint (no optimizer state; best.pth holds weights only); "
                        "resume from last.pth, or use model=<path> to start a new run from its weights")
    given = OmegaConf.to_container(cfg, resolve=True)
    defaults = default_config()
    changed = {k for k, v in given.items() if k in defaults and v != defaults[k]}
    merged = OmegaConf.merge(OmegaConf.create(given), OmegaConf.create(saved))
    for key in RUNTIME_KEYS:
        if key in changed:
            merged[key] = given[key]
    merged.resume = cfg.resume
    if "instance_head" not in saved:  # runs from before the instance head had none
        merged.instance_head = False
    if not given["output_dir"]:  # continue in the checkpoint's folder, wherever the run folder now lives
        merged.output_dir = str(Path(cfg.resume).resolve().parent)
    ignored = sorted(k for k in changed if k not in RUNTIME_KEYS and k in saved and given[k] != saved[k])
    if ignored:
        warnings.warn(f"resume: keeping the checkpoint's {', '.join(ignored)} (an exact continuation); "
                      "start a new run with model=<checkpoint> load_state=1 to change them", stacklevel=2)
    return merged


# ---------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------


def model_arch(cfg) -> dict:
    """The architecture keys (MODEL_KEYS) set in the config."""
    return {k: cfg[k] for k in MODEL_KEYS if cfg[k] is not None}


def create_model(cfg) -> torch.nn.Module:
    """Build the network: from `model=<checkpoint>` weights (ours or the original pipeline's) or fresh."""
    if not cfg.model:
        return build_model(**model_kwargs_from_cfg(cfg))
    arch = model_arch(cfg)
    ours = isinstance(load_checkpoint(cfg.model).get("model_config"), dict)
    # Our checkpoints describe themselves; the original pipeline's cannot tell use_mish without a context block.
    net = load_model(cfg.model, drop_connect_rate=arch.get("drop_connect_rate"),
                     **({} if ours else {"use_mish": arch.get("use_mish")}))
    arch[DECODER_NORM] = cfg.decoder_norm
    stored = {DECODER_NORM: "groupnorm", **net.config}  # decoder_norm is stored only when not the seed's
    differ = [k for k in arch if k != "drop_connect_rate" and k in stored and stored[k] != arch[k]]
    if differ:
        have = " ".join(f"{k}={stored[k]}" for k in differ)
        want = " ".join(f"{k}={arch[k]}" for k in differ)
        raise UserError(f"{cfg.model}: the checkpoint is {have} but the training config asks for {want}; "
                        f"add `{have}` to the command line")
    change = set_instance_head(net, bool(cfg.instance_head))
    if change:
        print(f"{cfg.model}: {change}")
    return net


# ---------------------------------------------------------------------------------------------------
# The segmentation task
# ---------------------------------------------------------------------------------------------------


class SegmentationTask:
    """Building segmentation for lib.trainer: chips, the two-head network, its losses and pixel Jaccard.

    A step's input is (labelled batch, soft-labelled batch or None): every `soft_every`-th step also
    trains on a batch of soft labels (Noisy Student), forwarded in the same pass.
    """

    metric_names = ("val_loss", "val_jaccard", "val_jaccard_dice", "val_polygon_f1", "val_polygon_precision",
                    "val_polygon_recall")
    metric_labels: ClassVar[dict] = {"val_loss": "val_loss", "val_jaccard": "jaccard", "val_jaccard_dice": "jaccard(dice head)",
                                     "val_polygon_f1": "polygon F1", "val_polygon_precision": "polygon P",
                                     "val_polygon_recall": "polygon R"}

    def __init__(self, cfg):
        self.cfg = cfg
        self.losses = LossConfig.from_cfg(cfg)
        # best.pth: highest select_metric; on a tie the higher tie_metric (lib.trainer.is_better)
        self.select_metric, self.tie_metric = SELECT_BY[cfg.select_by or "polygon_f1"]

    def build_data(self, cfg, d: Dist) -> dataset.Data:
        return dataset.load_data(cfg, d)

    def build_model(self, cfg) -> torch.nn.Module:
        return create_model(cfg)

    def build_optimizer(self, net, cfg, lr: float, total_steps: int) -> tuple:
        return build_one_cycle(net, cfg, lr, total_steps)

    def train_batches(self, s: Session):
        """Endless (batch, soft) step inputs on the device, resumed after `s.step` steps."""
        cfg = s.cfg
        channels_last = trainer.uses_channels_last(cfg, s.device)
        labelled = dataset.batches(s.data, "train", cfg, s.d, s.device, s.step)
        soft = dataset.batches(s.data, "soft", cfg, s.d, s.device, s.step) if s.data.soft_set is not None else None
        while True:
            batch = to_device(next(labelled), s.device, channels_last)
            extra = None
            if soft is not None and (s.step + 1) % int(cfg.soft_every) == 0:
                extra = to_device(next(soft), s.device, channels_last)
            yield batch, extra

    def compute_loss(self, s: Session, inputs):
        """Forward the labelled batch (and the soft-labelled one, in the same pass) and return (loss, terms)."""
        batch, soft = inputs
        images = batch["image"] if soft is None else torch.cat([batch["image"], soft["image"]])
        with autocast(s):
            out = s.model(images)
        n = batch["image"].shape[0]
        main, extra = {k: v[:n] for k, v in out.items()}, {k: v[n:] for k, v in out.items()}
        loss, terms = supervised_loss(main, batch["mask"], batch["ignore"], batch["gsd"], self.losses, train=True,
                                      **instance_targets(batch))
        if soft is not None:
            if s.cfg.soft_to_hard:
                hard, ignore = soft_to_hard(soft["mask"], soft["ignore"], tuple(s.cfg.soft_band))
                soft_loss, soft_terms = supervised_loss(extra, hard, ignore, soft["gsd"], self.losses, train=True)
                soft_terms = {f"soft_{k}": v for k, v in soft_terms.items()}
            else:
                soft_loss, soft_terms = soft_label_loss(extra, soft["mask"], soft["ignore"], self.losses)
            loss = loss + float(s.cfg.soft_weight) * soft_loss
            terms.update(soft_terms)
        return loss, terms

    def val_loader(self, s: Session):
        """This process's shard of the validation chips (built once per session)."""
        if "val_loader" not in s.cache:
            val_set = s.data.val_set
            shard = torch.utils.data.Subset(val_set, list(range(s.d.rank, len(val_set), s.d.world)))
            workers = loader_workers(s.cfg.num_workers, s.device)
            s.cache["val_loader"] = torch.utils.data.DataLoader(
                shard, batch_size=int(s.cfg.val_batch_size or s.cfg.batch_size), num_workers=workers,
                pin_memory=s.device.type == "cuda", persistent_workers=workers > 0, generator=torch.Generator())
        return s.cache["val_loader"]

    def validate(self, s: Session) -> dict:
        """Loss, global pixel Jaccard (sum of intersections / sum of unions) of the seg and dice heads, and
        SpaceNet polygon precision/recall/F1 of the chips' instances (`chip_polygon_counts`).

        Logits are upsampled to the label resolution and thresholded at 0.5; ignored pixels count for
        nothing. With several processes each scores a shard and the sums are added up.
        """
        sums = np.zeros(9)  # loss*n, n, I_seg, U_seg, I_dice, U_dice, tp, fp, fn
        channels_last = trainer.uses_channels_last(s.cfg, s.device)
        for batch in self.val_loader(s):
            batch = to_device(batch, s.device, channels_last)
            with autocast(s):
                out = s.net(batch["image"])
            loss, _ = supervised_loss(out, batch["mask"], batch["ignore"], batch["gsd"], self.losses, train=False,
                                      **instance_targets(batch))
            valid = batch["ignore"] < 0.5
            truth = (batch["mask"] >= 0.5) & valid
            size = batch["mask"].shape[-2:]
            prob = torch.softmax(upsample_to(out[SEG], size), 1)[:, 1] * valid
            seg = (prob > 0.5) & valid
            dice = (upsample_to(out[DICE], size)[:, 0] > 0) & valid
            n = batch["image"].shape[0]
            maps = torch.sigmoid(upsample_to(out[INSTANCE], size)) if INSTANCE in out else None
            counts = [chip_polygon_counts(prob[i], None if maps is None else maps[i], batch["instances"][i],
                                          float(batch["gsd"][i])) for i in range(n)]
            sums += [float(loss) * n, n, (seg & truth).sum().item(), (seg | truth).sum().item(),
                     (dice & truth).sum().item(), (dice | truth).sum().item(), *np.sum(counts, axis=0)]
        total = all_reduce(sums.tolist(), s.d, s.device)
        polygons = polygon_scores(*total[6:9])
        return {"val_loss": total[0] / max(total[1], 1), "val_jaccard": total[2] / max(total[3], 1.0),
                "val_jaccard_dice": total[4] / max(total[5], 1.0), **polygons}

    def checkpoint_meta(self, s: Session) -> dict:
        """What inference needs beside the weights: the GSD the model saw, crop width and architecture.

        `model_gsd` is what inference matches an image's GSD to: `ref_scale` when the chips (of known
        GSD) were resized to it, else the training chips' median GSD (`train_gsd`), None when unknown;
        `model_gsd_source` says which. `ref_scale`/`train_gsd` stay for older readers.
        """
        ref, train_gsd = s.cfg.ref_scale, s.data.train_gsd
        gsd, source = (float(ref), "ref_scale") if ref and train_gsd else (train_gsd, "train_gsd" if train_gsd else None)
        return {"ref_scale": ref, "train_gsd": train_gsd, "model_gsd": gsd, "model_gsd_source": source,
                "width": int(s.cfg.width), "arch": arch_slug(s.cfg)}


def instance_targets(batch: dict) -> dict:
    """The batch's border/contact targets for supervised_loss (none for batches without them: soft labels)."""
    return {k: batch[k] for k in ("border", "contact", "instance_ok") if k in batch}


# ---------------------------------------------------------------------------------------------------
# Polygon scores of validation chips
# ---------------------------------------------------------------------------------------------------


def area_px(area_m2: float, gsd: float) -> float:
    """A ground area in pixels of a chip of `gsd` m/px (the number itself, as pixels, when the GSD is unknown)."""
    return area_m2 / gsd ** 2 if math.isfinite(gsd) and gsd > 0 else area_m2


def predicted_instances(prob: np.ndarray, maps: np.ndarray | None, gsd: float) -> np.ndarray:
    """Instance labels of one chip with lib.postprocess DEFAULTS: watershed from the instance head's seeds
    (lib.instances.label_instances), or 4-connected components of the mask for a model without the head."""
    border, contact = (None, None) if maps is None else (maps[0], maps[1])
    known = gsd if math.isfinite(gsd) and gsd > 0 else None
    return label_instances(prob, border, contact, threshold=POSTPROCESS["threshold"],
                           seed_threshold=POSTPROCESS["seed_threshold"],
                           seed_min_px=seed_min_px(POSTPROCESS["seed_min_area"], known))  # as inference converts it


def label_polygons(labels: np.ndarray) -> tuple[list, np.ndarray]:
    """One shapely geometry per instance id (pixel coordinates) and the ids, from rasterio.features.shapes."""
    import shapely
    from rasterio.features import shapes
    from shapely.geometry import shape

    parts: dict = {}
    for geom, value in shapes(labels.astype(np.int32), mask=labels > 0, connectivity=4):
        parts.setdefault(int(value), []).append(shape(geom))
    ids = np.array(sorted(parts), dtype=np.int64)
    return [shapely.union_all(parts[i]) for i in ids], ids


def chip_polygon_counts(prob: torch.Tensor, maps: torch.Tensor | None, instances: torch.Tensor,
                        gsd: float) -> tuple[int, int, int]:
    """(tp, fp, fn) of one validation chip: predicted instances against the chip's truth instances
    (ids on valid pixels), matched by lib.metrics.score_polygons (IoU > 0.5) as evaluate.py does, with
    footprints under lib.postprocess's min_area (m^2, converted with the chip's GSD) left out."""
    from scipy import ndimage

    prob_np = prob.float().cpu().numpy()
    labels = predicted_instances(prob_np, None if maps is None else maps.float().cpu().numpy(), gsd)
    pred, ids = label_polygons(labels)
    gt, _ = label_polygons(instances.cpu().numpy())
    confidence = ndimage.mean(prob_np, labels, ids) if len(ids) else None
    r = score_polygons(gt, pred, confidence, min_area=area_px(POSTPROCESS["min_area"], gsd))
    return r["tp"], r["fp"], r["fn"]


def polygon_scores(tp: float, fp: float, fn: float) -> dict:
    """val_polygon_precision/recall/f1 from summed counts; undefined ratios are 1 when there was nothing to
    find and nothing was found, else 0 (so every value is a number the logs can plot)."""
    r = prf(int(tp), int(fp), int(fn))
    empty = 1.0 if tp + fp + fn == 0 else 0.0
    return {f"val_polygon_{k}": empty if r[k] is None else float(r[k]) for k in ("f1", "precision", "recall")}


# ---------------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------------


def prepare(cfg, d: Dist | None = None, device: torch.device | None = None) -> Session:
    """Resolve the config and build the segmentation task's training session (restoring a resumed run)."""
    if d is None or device is None:
        d, device = setup_distributed(cfg.device)
    cfg = resolve_config(cfg, d)
    task = point_task.PointsTask(cfg) if cfg.task == "points" else SegmentationTask(cfg)
    return trainer.prepare(cfg, task, d, device)


def run(cfg, on_validation=None, write: bool = True) -> dict:
    """Train as configured; returns a summary (output_dir, step, best Jaccard, validation history)."""
    d, device = setup_distributed(cfg.device)
    try:
        s = prepare(cfg, d, device)
        result = trainer.fit(s, on_validation=on_validation, write=write)
        if d.main and write:
            name = trainer.best_key(s.task).removeprefix("best_")
            print(f"done: {result['step']} steps; best val {name} {result['best']:.4f} at step "
                  f"{result['best_step']}; outputs in {result['output_dir']}")
        return result
    finally:
        leave_process_group(d)


@cli("train")
def main(cfg):
    run(cfg)


if __name__ == "__main__":
    main()

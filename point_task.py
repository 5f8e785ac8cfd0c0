"""The point-detection task (`train.py task=points`) for lib.trainer: SAR chips, CircleNet, its losses,
and validation with the xView3 metric on held-out scenes.

    python dataset.py task=points base_dir=<xView3 scenes> labels=<labels.csv> out_dir=<prepared>
    python train.py task=points data_dir=<prepared> model_name=efficientnet-b4 width=1024 batch_size=4
    python train.py task=points                        # the built-in synthetic SAR demo, a short CPU run

The training data are point_dataset's chips (`width` px, 90 % around balanced-drawn objects, 10 %
anywhere), in (epoch, index) batches that make a resumed run exact, as for segmentation. The scenes
are split by `fold`/`num_folds` into training and validation scenes (whole scenes, stratified by
fishing / near-shore / object counts). Validation has two parts: the loss on fixed chips around the
validation objects (`val_loss`) and detection on the whole validation scenes exactly as inference
does it (tiling engine, peaks, thresholds), scored with lib.xview3_metric against their labels
(HIGH/MEDIUM scored, LOW dropped, the challenge's 200 m at 10 m/px). `select_by` picks best.pth:
`aggregate` (default) or `loc_fscore` (localisation F1: the score for building points, whose labels
carry no vessel classes).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pandas as pd
import torch

import circlenet
import dataset
import model as model_lib
import point_dataset
from lib import trainer
from lib.distributed import Dist, all_reduce, gather_object
from lib.errors import UserError
from lib.point_decoding import PointDecoder
from lib.point_inference import DEFAULT_THRESHOLDS, detect_scene
from lib.point_losses import PointLoss
from lib.point_outputs import submission_table
from lib.sar import SarSource
from lib.tiling import Engine
from lib.trainer import Session, autocast, to_device
from lib.xview3_metric import score as xview3_score
from optim import build_one_cycle

SELECT_BY = {"aggregate": "val_aggregate", "loc_fscore": "val_loc_fscore"}
VAL_CHIPS = 64  # most validation chips the validation loss is taken on


@dataclass
class PointData:
    """What the trainer needs (`train` sets the epoch length) and what validation scores against."""

    train: list
    train_set: point_dataset.PointChips
    val_set: point_dataset.PointChips | None
    val_scenes: list
    val_labels: pd.DataFrame
    sar: dict


def xview3_labels(points: pd.DataFrame) -> pd.DataFrame:
    """PointLabels -> the xView3 label columns lib.xview3_metric scores (unset confidence = HIGH)."""
    confidence = points["confidence"].fillna("").astype(str).str.upper().replace("", "HIGH")
    return pd.DataFrame({"scene_id": points["scene_id"].astype(str), "detect_scene_row": points["row"],
                         "detect_scene_column": points["col"], "is_vessel": points["is_vessel"],
                         "is_fishing": points["is_fishing"], "vessel_length_m": points["length_m"],
                         "distance_from_shore_km": points["distance_from_shore_km"], "confidence": confidence})


def sar_settings(scenes: list) -> dict:
    """The channels and normalisation of the prepared scenes (stored in checkpoints for inference)."""
    with SarSource(scenes[0].path) as src:
        return {"channels": list(src.channels), "scale": src.scale, "offset": src.offset, "gsd": src.gsd}


def load_data(cfg, d: Dist) -> PointData:
    scenes, points = point_dataset.load_prepared(cfg.data_dir)
    train_scenes, val_scenes = point_dataset.split_scenes(scenes, int(cfg.fold), int(cfg.num_folds),
                                                          int(cfg.split_seed), points)
    if not train_scenes:
        raise UserError(f"{cfg.data_dir}: no training scenes left for fold={cfg.fold} of num_folds={cfg.num_folds} "
                        f"({len(scenes)} scene(s)); lower num_folds")
    train_set = point_dataset.PointChips(train_scenes, points, int(cfg.width), augment=True)
    val_set = point_dataset.PointChips(val_scenes, points, int(cfg.width), augment=False) if val_scenes else None
    ids = {s.scene_id for s in val_scenes}
    val_labels = xview3_labels(points[points["scene_id"].isin(ids)])
    return PointData(list(range(len(train_set))), train_set, val_set, val_scenes, val_labels, sar_settings(scenes))


def create_model(cfg) -> torch.nn.Module:
    """A new CircleNet (`model_name`, 2 SAR channels unless `in_channels` says otherwise), or `model=` weights."""
    if cfg.model:
        net = model_lib.load_model(cfg.model)
        if not isinstance(net, circlenet.CircleNet):
            raise UserError(f"{cfg.model}: not a CircleNet checkpoint; task=points trains CircleNet")
        return net
    channels = int(cfg.in_channels) if int(cfg.in_channels) != 3 else 2  # 3 = the segmentation default (RGB)
    config = circlenet.circlenet_config(model_name=cfg.model_name, in_channels=channels,
                                        drop_connect_rate=float(cfg.drop_connect_rate or 0.0))
    return circlenet.build_circlenet(config, pretrained=bool(cfg.pretrained))


class PointsTask:
    """Point detection for lib.trainer (module docstring)."""

    metric_names = ("val_loss", "val_aggregate", "val_loc_fscore", "val_loc_precision", "val_loc_recall",
                    "val_vessel_fscore", "val_fishing_fscore", "val_length_acc")
    metric_labels: ClassVar[dict] = {"val_loss": "val_loss", "val_aggregate": "aggregate",
                                     "val_loc_fscore": "loc F1", "val_loc_precision": "loc P",
                                     "val_loc_recall": "loc R", "val_vessel_fscore": "vessel F1",
                                     "val_fishing_fscore": "fishing F1", "val_length_acc": "length acc"}

    def __init__(self, cfg):
        self.cfg = cfg
        key = cfg.select_by or "aggregate"
        if key not in SELECT_BY:
            raise UserError(f"select_by={key}: task=points chooses best.pth by {' or '.join(SELECT_BY)}")
        self.select_metric = SELECT_BY[key]
        self.loss = PointLoss(objectness=cfg.objectness_weight, vessel=cfg.vessel_weight, fishing=cfg.fishing_weight,
                              entropy=cfg.point_entropy_weight, length=cfg.length_weight, offset=cfg.offset_weight,
                              label_smoothing=cfg.point_label_smoothing)

    def build_data(self, cfg, d: Dist) -> PointData:
        return load_data(cfg, d)

    def build_model(self, cfg) -> torch.nn.Module:
        return create_model(cfg)

    def build_optimizer(self, net, cfg, lr: float, total_steps: int) -> tuple:
        return build_one_cycle(net, cfg, lr, total_steps)

    def train_batches(self, s: Session):
        """Endless batches of chips on the device, resumed after `s.step` steps (balanced draws)."""
        cfg, items = s.cfg, s.data.train_set
        sampler = dataset.EpochBatches(len(items), int(cfg.batch_size), int(cfg.seed), s.d, items.weights, s.step)
        loader = dataset.make_loader(dataset.SeededItems(items, int(cfg.seed), 0), cfg, sampler, s.device)
        channels_last = trainer.uses_channels_last(cfg, s.device)
        for batch in loader:
            yield to_device(batch, s.device, channels_last)

    def compute_loss(self, s: Session, batch):
        with autocast(s):
            out = s.model(batch["image"])
        return self.loss(out, batch)

    def validate(self, s: Session) -> dict:
        metrics = {"val_loss": self._val_loss(s)}
        metrics.update(self._val_detection(s))
        return metrics

    def _val_loss(self, s: Session) -> float:
        """Mean loss on fixed, unaugmented chips around (up to VAL_CHIPS) validation objects."""
        val = s.data.val_set
        if val is None or len(val) == 0:
            return float("nan")
        keys = [(0, i) for i in range(min(len(val), VAL_CHIPS))][s.d.rank::s.d.world]
        items = dataset.SeededItems(val, int(s.cfg.seed), 2)
        size = int(s.cfg.val_batch_size or s.cfg.batch_size)
        total, n = 0.0, 0
        channels_last = trainer.uses_channels_last(s.cfg, s.device)
        for start in range(0, len(keys), size):
            batch = torch.utils.data.default_collate([items[k] for k in keys[start:start + size]])
            batch = to_device(batch, s.device, channels_last)
            with autocast(s):
                out = s.net(batch["image"])
            loss, _ = self.loss(out, batch)
            total, n = total + float(loss) * len(batch["image"]), n + len(batch["image"])
        summed = all_reduce([total, n], s.d, s.device)
        return summed[0] / max(summed[1], 1)

    def _val_detection(self, s: Session) -> dict:
        """The xView3 scores of detections on the whole validation scenes (each process a share)."""
        cfg, data = s.cfg, s.data
        limits = {k: float(cfg[k] if cfg[k] is not None else v) for k, v in DEFAULT_THRESHOLDS.items()}
        eng = Engine([s.net], widths=[int(cfg.width)], tile_size=int(cfg.width), overlap=int(cfg.width) // 4,
                     batch_size=int(cfg.val_batch_size or cfg.batch_size), device=s.device,
                     precision="fp32" if s.autocast_dtype is None else {torch.bfloat16: "bf16"}.get(
                         s.autocast_dtype, "fp16"),
                     channels_last=trainer.uses_channels_last(cfg, s.device), decoder=PointDecoder())
        tables = []
        for scene in data.val_scenes[s.d.rank::s.d.world]:
            with SarSource(scene.path) as src:
                dets = detect_scene(eng, src, limits["objectness_threshold"], int(cfg.nms_kernel))
                tables.append(submission_table(dets, scene.scene_id, src.transform, src.crs,
                                               limits["vessel_threshold"], limits["fishing_threshold"], src.gsd))
        tables = [t for part in gather_object(tables, s.d) for t in part] if s.d.enabled else tables
        return score_detections(data.val_labels, tables, cfg.shore_root)

    def checkpoint_meta(self, s: Session) -> dict:
        """What inference needs beside the weights: the SAR channels and normalisation, the chip width."""
        name = s.net.config["model_name"].removeprefix("efficientnet-")
        return {"task": "points", "sar": s.data.sar, "width": int(s.cfg.width), "arch": f"circlenet_{name}"}


def score_detections(labels: pd.DataFrame, tables: list[pd.DataFrame], shore_root) -> dict:
    """val_* metrics from submission tables (lib.point_outputs) against xView3 labels; zeros when empty."""
    names = ("aggregate", "loc_fscore", "vessel_fscore", "fishing_fscore", "length_acc")
    preds = pd.concat([t for t in tables if len(t)], ignore_index=True) if any(len(t) for t in tables) else None
    if preds is None or labels.empty:
        return {f"val_{k}": 0.0 for k in (*names, "loc_precision", "loc_recall")}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no shoreline for validation scenes: the shore F1 is 0, said once in docs
        result = xview3_score(labels, preds, shore_root)
    out = {f"val_{k}": float(result[k]) for k in names}
    out["val_loc_precision"] = float(result["loc"]["precision"])
    out["val_loc_recall"] = float(result["loc"]["recall"])
    return out


def resolve_demo(cfg) -> None:
    """`data_dir` unset: the built-in synthetic SAR demo, generated and prepared on first use."""
    from lib.sar_demo import ensure_sar_demo

    demo = ensure_sar_demo()
    prepared = Path(demo.root) / "prepared"
    if not (prepared / point_dataset.SCENES_FILE).is_file():
        point_dataset.prepare(dataset.default_config(task="points", progress=False))
    cfg.data_dir = str(prepared)
    if cfg.shore_root is None:
        cfg.shore_root = str(demo.shoreline_dir)


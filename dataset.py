"""Training chips for the segmentation task: the chips on disk, their split, augmentation and order.

Training (`train.py`) uses `load_data` (chips listed with `list_chips`, split by `split_folds`, served
by `ChipDataset` with `train_transform`/`val_transform`) and `batches`, whose order and augmentation are
a pure function of (seed, epoch, sample index): every sample re-seeds the augmentation pipeline from
those numbers (`SeededItems`), and each epoch's order comes from `DistributedSampler` or a seeded
`WeightedRandomSampler` (`EpochBatches`). A resumed run therefore skips the batches already consumed
and sees exactly the data the uninterrupted run would have seen, whatever the worker or process count.

Data preparation (`python dataset.py base_dir=... out_dir=...`) turns scenes -- a STAC catalog laid out
like Open Cities `train_tier_1`, a `train_metadata.csv` index, or image/label file pairs (plain or
SpaceNet naming) -- into chips on disk; `run` is a thin layer over `lib.scene_sources` (finding the
scenes) and `lib.chip_writer` (planning and writing the chips, layout described there). `mode=buildings`
(the original pipeline's behaviour) writes one chip centred on every building with `pad` pixels around
it; `mode=grid` tiles the scene.
"""

from __future__ import annotations

import json
import os
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from lib.chip_cache import DecodedChips
from lib.chip_writer import IGNORE_SUFFIX, INSTANCES_SUFFIX, MASK_SUFFIX, RESOLUTIONS_FILE, write_chips
from lib.cli import cli, compose_config
from lib.devices import loader_workers
from lib.distributed import Dist
from lib.errors import UserError
from lib.instance_targets import ids_from_mask, instance_targets, widths_px
from lib.model_contract import normalize
from lib.scene_sources import warn

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
MODES = ("buildings", "grid")
IMAGE_FORMATS = ("jpg", "png", "tif")


# ---------------------------------------------------------------------------------------------------
# Chips on disk -> tensors
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Chip:
    """One training sample on disk. `mask`/`ignore`/`instances` are None when absent (no mask = negative
    sample; no instances = prepared by an older version, ids then come from the mask's components)."""
    image: Path
    mask: Path | None
    ignore: Path | None
    scene: str  # "<collection>/<scene>" relative to the chips root: the unit of the fold split
    gsd: float | None = None  # metres per pixel of the chip (scene GSD x chip scale), None if unknown
    instances: Path | None = None  # uint16 instance ids (lib.chip_writer)


_SCALE_PREFIX = re.compile(r"^(\d+(?:\.\d+)?)_")


def chip_scale(name: str) -> float:
    """Scale encoded in a chip name `<scale>_<index>` (1 when the name does not follow the convention)."""
    m = _SCALE_PREFIX.match(name)
    return float(m.group(1)) if m else 1.0


def is_chip_image(path: Path) -> bool:
    name = path.name
    return (path.suffix.lower() in IMAGE_SUFFIXES and not name.startswith(".")
            and not name.endswith((MASK_SUFFIX, IGNORE_SUFFIX, INSTANCES_SUFFIX)))


def list_chips(data_dir: str | os.PathLike) -> list[Chip]:
    """Every chip image under `data_dir` (recursively) with its mask, ignore region, instances, scene and GSD.

    The scene is the chip's folder relative to `data_dir`; the GSD comes from `resolutions.json`
    (scene GSD times the scale in the chip name) when the folder has one.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise UserError(f"{root}: chips folder does not exist; prepare chips with `python dataset.py`")
    resolutions = {}
    if (root / RESOLUTIONS_FILE).exists():
        try:
            resolutions = json.loads((root / RESOLUTIONS_FILE).read_text())
        except json.JSONDecodeError:
            raise UserError(f"{root / RESOLUTIONS_FILE}: not valid JSON; delete it and re-run dataset.py") from None
    chips = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and is_chip_image(p)):
        stem = path.with_suffix("")
        mask = stem.parent / (stem.name + MASK_SUFFIX)
        ignore = stem.parent / (stem.name + IGNORE_SUFFIX)
        instances = stem.parent / (stem.name + INSTANCES_SUFFIX)
        scene = path.parent.relative_to(root).as_posix()
        scene_gsd = resolutions.get(scene)
        gsd = float(scene_gsd) * chip_scale(path.name) if scene_gsd else None
        chips.append(Chip(path, mask if mask.exists() else None, ignore if ignore.exists() else None, scene, gsd,
                          instances if instances.exists() else None))
    return chips


def split_folds(chips: list[Chip], fold: int, num_folds: int = 7, by: str = "scene",
                seed: int = 0) -> tuple[list[Chip], list[Chip]]:
    """Split chips into (train, val) for fold `fold` of `num_folds`.

    `by="scene"` (default) keeps every scene whole, so neighbouring, overlapping chips never sit on
    both sides: scenes are shuffled with `seed` and dealt, largest first, to the fold with the fewest
    chips. With fewer scenes than folds the higher folds are empty (fold 0 always has a scene).
    With a single scene it falls back to the original pipeline's chip-level KFold, with a warning.
    `by="chip"` is that chip-level KFold (shuffled with `seed`).
    """
    if not 0 <= fold < num_folds:
        raise UserError(f"fold={fold}: must be in 0..{num_folds - 1} (num_folds={num_folds})")
    if by not in ("scene", "chip"):
        raise UserError(f"split_by={by}: use 'scene' or 'chip'")
    scenes = sorted({c.scene for c in chips})
    if by == "scene" and len(scenes) < 2:
        if chips:
            warn(f"all {len(chips)} chips come from one scene ({scenes[0]!r}); splitting folds by chip, "
                 "so validation chips may overlap training chips")
        by = "chip"
    if by == "chip":
        order = list(range(len(chips)))
        random.Random(seed).shuffle(order)
        val_idx = {i for k, i in enumerate(order) if k % num_folds == fold}
        return ([c for i, c in enumerate(chips) if i not in val_idx], [c for i, c in enumerate(chips) if i in val_idx])
    counts = {s: 0 for s in scenes}
    for c in chips:
        counts[c.scene] += 1
    random.Random(seed).shuffle(scenes)
    scenes.sort(key=lambda s: -counts[s])  # stable: ties keep the shuffled order
    load = [0] * num_folds
    fold_of = {}
    for s in scenes:
        k = min(range(num_folds), key=lambda i: (load[i], i))
        fold_of[s] = k
        load[k] += counts[s]
    return [c for c in chips if fold_of[c.scene] != fold], [c for c in chips if fold_of[c.scene] == fold]


def train_transform(width: int, level: str = "seed", transpose: bool = False):
    """The original pipeline's augmentations, in albumentations 2.x names.

    Pad/crop at 1.5 x `width`, flips, coarse dropout, shift-scale-rotate (`Affine`), grid and optical
    distortion, RGB shift, blur, motion blur, and a final centre crop to `width`. `level="light"` keeps
    flips, a mild affine and colour jitter only (faster learning on tiny CPU budgets). Masks and the
    ignore region move with the image: the transform must be called with `mask=` and `valid=`
    (255 = imagery), whose fill of 0 makes padded or rotated-in borders ignored, never "background";
    `instances=` (uint16 ids) is a mask target too, so nearest-neighbour warps keep every id exact.
    """
    import albumentations as A

    big = round(width * 1.5)
    border = {"border_mode": cv2.BORDER_CONSTANT, "fill": 0, "fill_mask": 0}
    ops = [
        A.PadIfNeeded(min_height=big, min_width=big, **border),
        A.RandomCrop(height=big, width=big),
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
    ]
    if transpose:
        ops.append(A.Transpose(p=0.5))
    if level == "seed":
        ops += [
            A.CoarseDropout(num_holes_range=(1, 8), hole_height_range=(0.03, 0.1), hole_width_range=(0.03, 0.1),
                            fill=0, p=0.3),
            A.Affine(scale=(0.75, 1.25), translate_percent=(-0.1, 0.1), rotate=(-45, 45), p=0.7, **border),
            A.GridDistortion(p=0.2, **border),
            A.OpticalDistortion(distort_limit=(-0.3, 0.3), p=0.2, **border),
            A.RGBShift(r_shift_limit=20, g_shift_limit=20, b_shift_limit=20, p=0.3),
            A.Blur(blur_limit=(3, 5), p=0.1),
            A.MotionBlur(blur_limit=(3, 5), p=0.1),
        ]
    elif level == "light":
        ops += [
            A.Affine(scale=(0.9, 1.1), rotate=(-15, 15), p=0.5, **border),
            A.RGBShift(r_shift_limit=10, g_shift_limit=10, b_shift_limit=10, p=0.3),
        ]
    else:
        raise UserError(f"augment={level}: use 'seed' or 'light'")
    ops.append(A.CenterCrop(height=width, width=width))
    return A.Compose(ops, additional_targets=_TARGETS)


_TARGETS = {"valid": "mask", "instances": "mask"}  # moved like the mask (nearest, fill 0)


def val_transform(width: int):
    """Centre `width` x `width` crop (padded with ignored pixels when the chip is smaller)."""
    import albumentations as A

    return A.Compose([
        A.PadIfNeeded(min_height=width, min_width=width, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0),
        A.CenterCrop(height=width, width=width),
    ], additional_targets=_TARGETS)


def read_chip_image(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(RGB uint8 [H, W, 3], valid bool [H, W]) for a chip image; GeoTIFF alpha/nodata -> invalid."""
    if path.suffix.lower() in (".tif", ".tiff"):
        from lib.geo_io import check_readable, open_raster, read_window

        with open_raster(path) as ds:
            check_readable(ds, path)
            return read_window(ds)
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise UserError(f"{path}: not a readable image; delete it and re-run dataset.py")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB), np.ones(img.shape[:2], dtype=bool)


def read_gray(path: Path, shape: tuple[int, int], what: str = "mask", dtype=np.uint8) -> np.ndarray:
    """A single-band PNG as `dtype` (uint8 masks, uint16 instance ids), its size checked against the image."""
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise UserError(f"{path}: not a readable {what}; delete it and re-run dataset.py")
    if img.ndim == 3:
        img = img[..., 0]
    if img.shape != shape:
        raise UserError(f"{path}: {what} is {img.shape[1]}x{img.shape[0]} but its image is {shape[1]}x{shape[0]}")
    if img.dtype != dtype:
        img = np.clip(img, 0, np.iinfo(dtype).max).astype(dtype)
    return img


class ChipDataset:
    """Map-style dataset of chips for `torch.utils.data.DataLoader`.

    Each item is a dict: "image" float32 [3, H, W] (ImageNet-normalised), "mask" float32 [H, W] in 0..1
    (soft masks kept soft), "ignore" float32 [H, W] (1 = nodata / padding), "has_building" float32
    scalar, "gsd" float32 scalar (m/px after rescaling, NaN unknown), "path" str, and for touching
    buildings "instances" int32 [H, W] (ids, 0 on ignored pixels), "border"/"contact" float32 0/1 [H, W]
    (lib.instance_targets, widths `border_m`/`contact_m` at the chip's GSD, else `border_px`/`contact_px`)
    and "instance_ok" float32 scalar (1 = ids from the chip's instances file; 0 = from the mask's connected
    components, or no widths given: the contact target is then unknown).
    With `ref_scale` (m/px), chips whose GSD is known are first resized to that GSD, so a model sees
    buildings at one size whatever the source resolution. With `cache_mb` > 0 the decoded (and rescaled)
    chips are kept in memory up to that size per process (`DecodedChips`).
    """
    def __init__(self, chips: list[Chip], transform=None, ref_scale: float | None = None, *,
                 border_m=None, contact_m=None, border_px=None, contact_px=None, cache_mb: float = 0):
        self.chips = list(chips)
        self.transform = transform
        self.ref_scale = float(ref_scale) if ref_scale else None
        self.widths = (border_m, contact_m, border_px, contact_px)
        self.decoded = DecodedChips(cache_mb) if cache_mb and float(cache_mb) > 0 else None

    def __len__(self) -> int:
        return len(self.chips)

    def load(self, i: int) -> dict:
        """Raw arrays of chip `i` (uint8 image, mask 0..255, valid 0/255, uint16 instance ids) after GSD
        rescaling; "instance_ok" says whether the ids came from an instances file. Read-only when cached."""
        raw = self.decoded.get(i) if self.decoded is not None else None
        if raw is None:
            raw = self._read(i)
            if self.decoded is not None:
                self.decoded.put(i, raw)
        return raw

    def _read(self, i: int) -> dict:
        chip = self.chips[i]
        image, valid = read_chip_image(chip.image)
        shape = image.shape[:2]
        mask = read_gray(chip.mask, shape) if chip.mask else np.zeros(shape, np.uint8)
        if chip.instances:
            ids = read_gray(chip.instances, shape, "instance mask", np.uint16)
        else:
            ids = ids_from_mask(mask)
        valid = valid.astype(np.uint8) * 255
        if chip.ignore:
            valid[read_gray(chip.ignore, shape) > 127] = 0
        gsd = chip.gsd
        if self.ref_scale and gsd:
            factor = gsd / self.ref_scale
            if abs(factor - 1) > 1e-3:
                size = (max(1, round(shape[1] * factor)), max(1, round(shape[0] * factor)))
                image = cv2.resize(image, size, interpolation=cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR)
                mask = cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST)
                valid = cv2.resize(valid, size, interpolation=cv2.INTER_NEAREST)
                ids = cv2.resize(ids, size, interpolation=cv2.INTER_NEAREST)
            gsd = self.ref_scale
        return {"image": image, "mask": mask, "valid": valid, "instances": ids, "gsd": gsd, "path": str(chip.image),
                "instance_ok": chip.instances is not None}

    def __getitem__(self, i: int) -> dict:
        import torch

        raw = self.load(i)
        image, mask, valid, ids = raw["image"], raw["mask"], raw["valid"], raw["instances"]
        if self.transform is not None:
            out = self.transform(image=image, mask=mask, valid=valid, instances=ids)
            image, mask, valid, ids = out["image"], out["mask"], out["valid"], out["instances"]
        x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None]
        ignore = valid < 128
        mask = mask.astype(np.float32) / 255.0
        mask[ignore] = 0.0
        ids = ids.astype(np.int32)
        ids[ignore] = 0
        widths = widths_px(raw["gsd"], *self.widths)
        if widths is None:
            border = contact = np.zeros(ids.shape, np.float32)
        else:
            border, contact = instance_targets(ids, *widths)
        return {
            "instances": torch.from_numpy(ids),
            "border": torch.from_numpy(border),
            "contact": torch.from_numpy(contact),
            "instance_ok": torch.tensor(float(raw["instance_ok"] and widths is not None), dtype=torch.float32),
            "image": normalize(x)[0].float().contiguous(),
            "mask": torch.from_numpy(mask),
            "ignore": torch.from_numpy(ignore.astype(np.float32)),
            "has_building": torch.tensor(float((mask >= 0.5).any()), dtype=torch.float32),
            "gsd": torch.tensor(raw["gsd"] if raw["gsd"] else float("nan"), dtype=torch.float32),
            "path": raw["path"],
        }


def demo_chips_dir() -> Path:
    """Chips of the built-in demo scene, prepared with default settings on first use."""
    from lib.demo_scene import ensure_demo_scene

    root = ensure_demo_scene()
    chips = root / "chips"
    if not (chips / ".complete").exists():
        run(default_config(progress=False))  # no base_dir: the demo, into <demo>/chips
        (chips / ".complete").write_text("prepared with default dataset.py settings\n")
    return chips


# ---------------------------------------------------------------------------------------------------
# Sampling: deterministic, resumable order and augmentation
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
    """The task's chips (train/val/soft-label lists), their datasets and the median training GSD."""
    train: list
    val: list
    soft: list
    train_set: object = None
    val_set: object = None
    soft_set: object = None
    train_gsd: float | None = None


def load_data(cfg, d: Dist) -> Data:
    """List and split the chips, build the datasets; every problem a user can fix is a UserError."""
    chips = list_chips(cfg.data_dir)
    if not chips:
        raise UserError(f"{cfg.data_dir}: no training chips found (image + <name>_mask.png); "
                        "prepare them with `python dataset.py base_dir=<data> out_dir=<chips>`")
    train, val = split_folds(chips, int(cfg.fold), int(cfg.num_folds), by=cfg.split_by, seed=int(cfg.split_seed))
    if not val:
        raise UserError(f"fold={cfg.fold}: no validation chips in {cfg.data_dir} ({len(chips)} chips, "
                        f"{len({c.scene for c in chips})} scenes, num_folds={cfg.num_folds}); choose another fold, "
                        "lower num_folds or use split_by=chip")
    if cfg.debug:
        train, val = train[:16], val[:8]
    soft = []
    if cfg.soft_labels_dir:
        soft = [c for c in list_chips(cfg.soft_labels_dir) if c.mask is not None]
        if not soft:
            raise UserError(f"{cfg.soft_labels_dir}: no soft-labelled images (<name> + <name>_mask.png); "
                            "write them with `python combine_images.py base_dir=<runs> add_mask_suffix=True`")
    need = int(cfg.batch_size) * d.world
    if len(train) < need:
        raise UserError(f"{cfg.data_dir}: only {len(train)} training chips for a batch of {cfg.batch_size} x "
                        f"{d.world} process(es); lower batch_size or add chips")
    if soft and len(soft) < need:
        raise UserError(f"{cfg.soft_labels_dir}: only {len(soft)} soft-label chips for a batch of {cfg.batch_size} "
                        f"x {d.world} process(es); cut them smaller (combine_images.py soft_chip_size=256 "
                        "into a new out_dir), add unlabelled images or lower batch_size")
    older = sum(c.mask is not None and c.instances is None for c in chips)
    if older:  # one note per dataset; the contact loss is masked for these chips (instance_ok = 0)
        which = "chips have" if older == sum(c.mask is not None for c in chips) else f"{older} chips have"
        print(f"note: {cfg.data_dir}: {which} no instance masks (prepared by an older version); "
              "contact targets off -- re-run dataset.py", flush=True)
    width, ref = int(cfg.width), cfg.ref_scale
    widths = {k: cfg[k] for k in ("border_m", "contact_m", "border_px", "contact_px")}
    widths["cache_mb"] = float(cfg.get("chip_cache_mb") or 0)

    def augmenting(items):
        tf = train_transform(width, level=cfg.augment, transpose=bool(cfg.transpose))
        return ChipDataset(items, tf, ref_scale=ref, **widths)

    gsds = [c.gsd for c in train if c.gsd]
    return Data(train, val, soft, augmenting(train), ChipDataset(val, val_transform(width), ref, **widths),
                augmenting(soft) if soft else None, float(np.median(gsds)) if gsds else None)


def make_loader(items, cfg, sampler, device) -> torch.utils.data.DataLoader:
    """DataLoader over (epoch, index) batches; its own generator keeps the global torch RNG untouched.
    `num_workers=auto`: lib.devices.loader_workers for `device`."""
    workers = loader_workers(cfg.num_workers, device)
    return torch.utils.data.DataLoader(
        items, batch_sampler=sampler, num_workers=workers, pin_memory=device.type == "cuda",
        persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
        generator=torch.Generator(),
    )


def batches(data: Data, which: str, cfg, d: Dist, device: torch.device, step: int):
    """Endless iterator over this process's batches of the training (or soft-label) set, resumed after
    `step` optimiser steps (the soft-label set advances once every `soft_every` steps)."""
    if which == "train":
        items, stream, start = data.train_set, 0, step
        weights = balanced_weights(building_fractions(data.train)) if cfg.balanced_sampling else None
    else:
        items, stream, start = data.soft_set, 1, step // int(cfg.soft_every)
        weights = None
    sampler = EpochBatches(len(items), int(cfg.batch_size), int(cfg.seed) + stream, d, weights, start)
    return iter(make_loader(SeededItems(items, int(cfg.seed), stream), cfg, sampler, device))


# ---------------------------------------------------------------------------------------------------
# Data preparation CLI: scenes -> chips on disk (lib.scene_sources, lib.chip_writer)
# ---------------------------------------------------------------------------------------------------


def default_config(**overrides):
    """dataset.py's composed config (`config/dataset.yaml` and its shared groups) with `overrides` merged,
    as a plain OmegaConf object (usable inside another running script, e.g. train.py's demo chips)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(OmegaConf.to_container(compose_config("dataset"), resolve=True))
    return OmegaConf.merge(cfg, overrides)


def _validate(cfg) -> None:
    if cfg.mode not in MODES:
        raise UserError(f"mode={cfg.mode}: use one of {', '.join(MODES)}")
    if cfg.image_format not in IMAGE_FORMATS:
        raise UserError(f"image_format={cfg.image_format}: use one of {', '.join(IMAGE_FORMATS)}")
    if cfg.mode == "grid" and int(cfg.tile_size) < 1:
        raise UserError(f"tile_size={cfg.tile_size}: must be a positive number of pixels")
    from lib.geo_io import check_bands

    check_bands(cfg.bands)


def run(cfg) -> dict:
    """Prepare chips as configured (no base_dir: the built-in demo); returns counts and the output folder.

    Every scene is validated and planned before the first chip is written; a scene that cannot be read
    is reported and left out (`failed` in the result) while the others are written. Chips that already
    exist are skipped, so a rerun resumes an interrupted run and retries the failed scenes.
    """
    _validate(cfg)
    if cfg.base_dir in (None, ""):
        from lib.demo_scene import ensure_demo_scene

        base_dir = ensure_demo_scene()
        out_dir = Path(cfg.out_dir) if cfg.out_dir else base_dir / "chips"
        cfg = default_config(**{**_plain(cfg), "base_dir": str(base_dir), "out_dir": str(out_dir)})
    if not cfg.out_dir:
        raise UserError("out_dir is not set; add out_dir=<folder for the chips>")
    return write_chips(cfg)


def _plain(cfg) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)


@cli("dataset")
def main(cfg) -> None:
    if cfg.task == "points":  # the point task's preparation lives in point_dataset.py
        from point_dataset import main as prepare_points

        return prepare_points(cfg)
    if cfg.task != "segmentation":
        raise UserError(f"task={cfg.task}: use segmentation or points")
    if cfg.base_dir in (None, ""):
        print("no base_dir given: using the built-in demo scene (generated on first use)")
    summary = run(cfg)
    print(f"{summary['written']} chips written ({summary['positive']} with buildings), {summary['skipped']} "
          f"already there" + (f", {summary['nodata']} without imagery left out" if summary["nodata"] else "")
          + (f", instance masks added to {summary['instances_added']} older chips" if summary["instances_added"] else "")
          + f", from {summary['scenes']} scene(s) -> {summary['out_dir']}")
    if summary["failed"]:  # the other scenes are done; the exit status (1, as inference.py) says not all are
        print(f"error: {len(summary['failed'])} scene(s) could not be read and were skipped (listed above); "
              "fix them and rerun: chips already written are kept", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

"""Predict building probabilities, masks and footprints for images, folders or STAC catalogs.

    python inference.py data_dir=<images> model=models/m40000.pth width=672 threshold=0.56 flip=3 output_dir=out
    python inference.py data_dir=<images> model=[b1.pth,b2.pth] tta=[none,hflip,vflip,hvflip,transpose] widths=[672]

One run can hold a whole TTA/multi-scale/multi-model ensemble (averaged in memory, batched); the
original pipeline's one-transform-per-run commands (`flip`, `transpose`) still work and their runs can
be averaged afterwards with combine_images.py. Tiling, TTA and blending are lib.tiling's `Engine`; the
rasters are written by lib.raster_outputs' `SceneWriter`.

Outputs under `output_dir` (lib.run_folder): probabilities/<stem>.tif (uint8 0-255), masks/<stem>.tif
(0/255), footprints/<stem>.geojson (EPSG:4326) + .gpkg (image CRS), and run.json (provenance).
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import rasterio

import model as model_lib
from lib import footprints, geo_io, run_folder
from lib.cli import VERSION, cli, progress_bar
from lib.devices import cpu_has_native_bf16, resolve_device
from lib.errors import UserError, one_line
from lib.exported import onnxruntime_models
from lib.files import copy_file, file_sha256
from lib.image_sources import RasterSource
from lib.raster_outputs import SceneWriter, raster_profile
from lib.segmentation import BUILDING, BUILDING_PRESENT
from lib.tiling import Engine
from lib.tta import TTA_NAMES, seed_tta_name

IMAGE_SUFFIXES = (".tif", ".tiff", ".jpg", ".jpeg", ".png")
SIDE_SUFFIXES = ("_mask", "_ignore")  # training-chip companions, never inputs
BACKENDS = ("auto", "torch", "onnxruntime")


@dataclass
class ImageInput:
    stem: str
    path: Path


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------

def default_data_dir() -> Path:
    """The built-in demo's held-out test images (generated on first use)."""
    from lib import demo_scene

    return Path(demo_scene.ensure_demo_scene()) / "test" / "images"


def list_images(data_dir: str | os.PathLike, exclude: Sequence[Path] = ()) -> list[ImageInput]:
    """One image, a folder of images (searched recursively) or a STAC catalog (its image items).

    Files under `exclude` (this run's own output folders) are left out.
    """
    path = Path(data_dir)
    if not path.exists():
        raise UserError(f"{path}: data_dir does not exist; pass an image, a folder of images or a STAC catalog.json")
    if path.is_dir() and (path / "catalog.json").is_file():
        path = path / "catalog.json"
    if path.is_file() and path.suffix.lower() == ".json":
        images = _stac_images(path)
    elif path.is_file():
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise UserError(f"{path}: not an image ({', '.join(IMAGE_SUFFIXES)}) or STAC catalog.json")
        images = [ImageInput(path.stem, path)]
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                       and not p.stem.endswith(SIDE_SUFFIXES) and not p.name.startswith("."))
        excluded = [Path(d).resolve() for d in exclude]
        images = [ImageInput(p.stem, p) for p in files
                  if not any(p.resolve().is_relative_to(d) for d in excluded)]
    if not images:
        raise UserError(f"{path}: no images found (looked for {', '.join(IMAGE_SUFFIXES)})")
    seen: dict[str, Path] = {}
    for im in images:
        if im.stem in seen:
            raise UserError(f"{im.path}: same name as {seen[im.stem]}; outputs are named by stem, so rename one")
        seen[im.stem] = im.path
    return images


def _stac_images(catalog_path: Path) -> list[ImageInput]:
    """Image assets of every item in a STAC catalog; label items (label extension) are skipped."""
    import pystac

    try:
        catalog = pystac.read_file(str(catalog_path))
    except Exception as err:  # noqa: BLE001 - pystac raises many types for broken catalogs
        raise UserError(f"{catalog_path}: not a readable STAC catalog ({one_line(err)})") from None
    out = []
    for item in catalog.get_items(recursive=True):
        if any("label" in ext for ext in item.stac_extensions):
            continue
        for key, asset in item.assets.items():
            media = (asset.media_type or "").lower()
            href = asset.get_absolute_href() or asset.href
            if "labels" in (asset.roles or []):
                continue
            if media.startswith("image/") or Path(href).suffix.lower() in IMAGE_SUFFIXES:
                if not Path(href).is_file():
                    raise UserError(f"{catalog_path}: item {item.id} asset {key} points to missing file {href}")
                out.append(ImageInput(item.id, Path(href)))
                break
    return sorted(out, key=lambda im: im.stem)


def check_images(images: list[ImageInput]) -> list[int]:
    """Open every image before any work, so a bad file fails the run at once with its name.

    Returns each image's pixel count (the work it will take, used to share images among ranks).
    """
    pixels = []
    for im in images:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            ds = geo_io.open_raster(im.path)
        try:
            geo_io.check_readable(ds, im.path)
            geo_io.band_layout(ds)
            pixels.append(ds.width * ds.height)
        finally:
            ds.close()
    return pixels


def shard_images(images: list[ImageInput], pixels: list[int], rank: int, world: int) -> list[ImageInput]:
    """This rank's share of the images under `torchrun`: largest first, each to the least-loaded rank.

    Every rank computes the same assignment from the same sorted list, so no communication is needed,
    and ranks finish close together even when one city scene dwarfs the other images.
    """
    if world <= 1:
        return images
    load = [0] * world
    mine = []
    for size, im in sorted(zip(pixels, images), key=lambda t: (-t[0], t[1].stem)):
        owner = min(range(world), key=lambda r: (load[r], r))
        load[owner] += size
        if owner == rank:
            mine.append(im)
    return sorted(mine, key=lambda im: im.stem)


def open_source(path: Path, cfg) -> RasterSource:
    """Open an image with the data-preparation rules (bands, alpha/nodata, stretch, zero = nodata)."""
    low, high = cfg.stretch_percentiles
    src = RasterSource(path, cfg.stretch, low, high, cfg.stretch_range, False)
    src.zero_is_nodata = geo_io.resolve_zero_is_nodata(cfg.zero_is_nodata, src.ds)
    return src


# --------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------

def model_list(value) -> list[str]:
    if value is None:
        raise UserError("model=<checkpoint.pth> is required (a list [a.pth,b.pth] averages several models)")
    return [str(value)] if isinstance(value, (str, os.PathLike)) else [str(v) for v in value]


def _plain(value):
    """OmegaConf lists (possibly nested) -> plain Python lists."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def build_engine(cfg, models=None, device=None) -> tuple[Engine, list[dict]]:
    """Models + TTA/width plan from the config; returns the engine and the model records for run.json."""
    paths = model_list(cfg.model)
    overrides = {k: cfg[k] for k in model_lib.ARCH_OVERRIDES}
    device = device or resolve_device(cfg.device)
    loaded = models is None
    if loaded:
        models = model_lib.load_models(paths, **overrides)
    records = [{"path": str(Path(p).resolve()), "sha256": file_sha256(p),
                "config": getattr(m, "config", None), "meta": _jsonable(getattr(m, "meta", None))}
               for p, m in zip(paths, models)]
    if loaded:
        models = choose_backend(cfg, models, paths, device)
    widths = _plain(cfg.widths) if cfg.widths is not None else [cfg.width]
    tta = _plain(cfg.tta) if cfg.tta is not None else [seed_tta_name(cfg.flip, cfg.transpose)]
    if device.type == "cuda":
        import torch

        torch.backends.cudnn.benchmark = True
    eng = Engine(models, widths=widths, tta=tta, tile_size=cfg.tile_size, overlap=cfg.overlap,
                 batch_size=cfg.batch_size, device=device, precision=cfg.precision,
                 scale_factor=cfg.scale_factor, match_gsd=cfg.match_gsd, num_workers=cfg.num_workers,
                 progress=cfg.progress)
    return eng, records


def choose_backend(cfg, models: list, paths: list[str], device) -> list:
    """`backend=auto`: ONNX Runtime on CPU for fp32 (about 2-4x faster than eager PyTorch on CPUs without
    AMX, measured on b1 at 672 px), PyTorch elsewhere (CUDA AMP, bf16/fp16 autocast). An automatic export
    that fails falls back to PyTorch with a warning; an explicit `backend=onnxruntime` fails loudly."""
    backend = str(cfg.backend)
    if backend not in BACKENDS:
        raise UserError(f"backend={backend}: choose {', '.join(BACKENDS[:-1])} or {BACKENDS[-1]}")
    if backend == "auto":
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return models
        if device.type != "cpu" or cfg.precision in ("bf16", "fp16") or (
                cfg.precision == "auto" and cpu_has_native_bf16()):
            return models
    if backend == "torch":
        return models
    try:
        return onnxruntime_models(models, paths, cfg.onnx_cache)
    except (RuntimeError, ValueError, OSError, UserError) as err:
        if backend == "onnxruntime":
            raise
        print(f"warning: ONNX Runtime unavailable for these models ({one_line(err, 120)}); "
              "using PyTorch", file=sys.stderr)
        return models


def _jsonable(obj):
    import json

    try:
        json.dumps(obj)
        return obj
    except TypeError:
        return {k: str(v) for k, v in (obj or {}).items()}


def provenance(cfg, eng: Engine, records: list[dict]) -> dict:
    return {
        "toolkit_version": VERSION,
        "models": [{"path": r["path"], "sha256": r["sha256"], "config": r["config"]} for r in records],
        "passes": [{"model": p.model, "width": p.width, "tta": list(p.tta)} for p in eng.passes],
        "tta": sorted({t for p in eng.passes for t in p.tta}, key=TTA_NAMES.index),
        "widths": sorted({p.width for p in eng.passes}),
        "tile_size": eng.tile_size, "overlap": eng.overlap, "threshold": float(cfg.threshold),
        "scale_factor": eng.scale_factor, "match_gsd": eng.match_gsd,
        "precision": cfg.precision, "device": str(eng.device),
        "backend": "onnxruntime" if any(eng.is_onnx) else "torch",
        "min_area": cfg.min_area, "simplify": cfg.simplify,
    }


def geotiff_tags(info: dict) -> dict:
    """Short provenance tags stored inside every output raster."""
    return {
        "BUILDINGS_TOOLKIT_VERSION": info["toolkit_version"],
        "BUILDINGS_MODELS": ";".join(f"{Path(m['path']).name}:sha256={m['sha256'][:16]}" for m in info["models"]),
        "BUILDINGS_TTA": ",".join(info["tta"]),
        "BUILDINGS_WIDTHS": ",".join(str(w) for w in info["widths"]),
        "BUILDINGS_TILE_SIZE": info["tile_size"], "BUILDINGS_OVERLAP": info["overlap"],
        "BUILDINGS_THRESHOLD": info["threshold"], "BUILDINGS_PRECISION": info.get("precision_used", info["precision"]),
    }


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------

def predict_image(eng: Engine, image: ImageInput, paths: dict[str, Path], cfg, tags: dict) -> dict:
    """Predict one image and write its probability map, mask and footprints (all or nothing)."""
    start = time.perf_counter()
    with geo_io.gdal_env(), open_source(image.path, cfg) as src:
        ds = src.ds
        georef = geo_io.is_georeferenced(ds)
        profile = raster_profile(ds, georef)
        poly = footprints.Polygonizer(ds.height, ds.width)
        with SceneWriter(paths["probability"], paths["mask"], profile, tags, cog=cfg.cog, polygonizer=poly,
                         threshold=cfg.threshold) as writer:
            stats = eng.predict_into(src, writer)
            gdf = footprints.footprints_frame(poly.finish(), ds.transform if georef else None,
                                              ds.crs if georef else None, min_area=cfg.min_area,
                                              simplify=cfg.simplify)
            footprints.write_footprints(gdf, paths["geojson"], cfg.vector_format)
            writer.tags["BUILDINGS_PRECISION"] = eng.precision_name  # `auto` is resolved on the first batch
            writer.commit()
        cls_prob = stats.scores[BUILDING_PRESENT]
        return {
            "path": str(image.path.resolve()), "height": ds.height, "width": ds.width,
            "crs": ds.crs.to_string() if georef else None, "gsd": src.gsd,
            "windows": stats.windows, "skipped_nodata_windows": stats.skipped,
            "cls_prob": None if math.isnan(cls_prob) else round(cls_prob, 5),
            "max_prob": round(stats.map_max[BUILDING], 5), "buildings": len(gdf),
            "seconds": round(time.perf_counter() - start, 3),
        }


def is_empty(record: dict, threshold: float) -> bool:
    """Negative mining: both the image-level head and the strongest pixel say 'no building'."""
    cls_prob = record.get("cls_prob")
    if record.get("windows", 0) == 0:
        return False  # all nodata: not a useful negative
    return (cls_prob is None or cls_prob < threshold) and record["max_prob"] < threshold


def previous_records(output_dir: Path) -> dict:
    """Image records of earlier runs: run.json plus progress left by ranks of an interrupted torchrun job."""
    done = dict(run_folder.read_run(output_dir).get("images", {}))
    for part in run_folder.rank_files(output_dir):
        done.update(run_folder.read_record(part).get("images", {}))
    return done


def run(cfg, models=None) -> dict:
    """Predict every input image; returns the run record (also written to output_dir/run.json).

    `models` (already built modules, one per `model` path) skips loading, for programmatic callers.
    Under `torchrun` each rank predicts its share of the images (`shard_images`) and rank 0 writes
    the merged run.json, so the outputs are those of one process.
    """
    from lib.distributed import gather_object, leave_process_group, setup_distributed

    output_dir = Path(cfg.output_dir)
    # outputs and mined copies written inside data_dir are not inputs of a later run
    own = [output_dir] + ([Path(cfg.output_dir_empty)] if cfg.output_dir_empty else [])
    images = list_images(cfg.data_dir if cfg.data_dir is not None else default_data_dir(), exclude=own)
    if cfg.mine_empty and not cfg.output_dir_empty:
        raise UserError("mine_empty=True needs output_dir_empty=<folder> for the images found empty")
    if cfg.num_threads:
        import torch

        torch.set_num_threads(int(cfg.num_threads))
    pixels = check_images(images)
    d, device = setup_distributed(cfg.device)
    try:
        mine = shard_images(images, pixels, d.rank, d.world)
        if not d.main:
            cfg.progress = False  # one bar (rank 0's) rather than interleaved ones
        eng, records = build_engine(cfg, models, device)
        info = provenance(cfg, eng, records)
        done = previous_records(output_dir) if not cfg.overwrite else {}
        progress_path = run_folder.rank_file(output_dir, d.rank) if d.enabled else run_folder.run_file(output_dir)
        summary = predict_images(eng, mine, cfg, info, done, progress_path)
        parts = gather_object((done, summary, info.get("precision_used")), d)
        if d.enabled:
            for part_done, _, _ in parts:
                done.update(part_done)
            summary = {"predicted": sum(p[1]["predicted"] for p in parts),
                       "skipped": sum(p[1]["skipped"] for p in parts),
                       "empty": sorted(stem for p in parts for stem in p[1]["empty"])}
            if d.main:
                info["precision_used"] = parts[0][2]
                _write_run(run_folder.run_file(output_dir), info, done)
        if d.main:
            for part in run_folder.rank_files(output_dir):  # merged into run.json (now or earlier)
                part.unlink(missing_ok=True)
            print(f"{summary['predicted']} predicted, {summary['skipped']} already done"
                  + (f", {len(summary['empty'])} empty -> {cfg.output_dir_empty}" if cfg.mine_empty else "")
                  + f"; outputs in {output_dir}" + (f" ({d.world} processes)" if d.enabled else ""))
    finally:
        leave_process_group(d)
    return {**info, "images": done, "summary": summary}


def predict_images(eng: Engine, images: list[ImageInput], cfg, info: dict, done: dict,
                   progress_path: Path) -> dict:
    """Predict (or skip, when their outputs exist) `images`, recording each in `done` and `progress_path`."""
    output_dir = Path(cfg.output_dir)
    tags = geotiff_tags(info)
    summary = {"predicted": 0, "skipped": 0, "empty": []}
    for image in progress_bar(images, disable=not cfg.progress or len(images) < 2, unit="image"):
        paths = run_folder.output_paths(output_dir, image.stem, cfg.vector_format)
        if not cfg.overwrite and all(p.exists() for p in paths.values()):
            summary["skipped"] += 1
            record = done.get(image.stem) or {"path": str(image.path.resolve())}
        else:
            record = predict_image(eng, image, paths, cfg, tags)
            summary["predicted"] += 1
        info["precision_used"] = eng.precision_name
        tags = geotiff_tags(info)
        if cfg.mine_empty and "max_prob" in record:
            record["empty"] = is_empty(record, cfg.empty_threshold)
            if record["empty"]:
                target = Path(cfg.output_dir_empty) / image.path.name
                if cfg.overwrite or not target.exists():
                    copy_file(image.path, target)
                summary["empty"].append(image.stem)
        done[image.stem] = record
        if cfg.debug:
            print(f"{image.stem}: {record}")
        _write_run(progress_path, info, done)
    return summary


def _write_run(path: Path, info: dict, done: dict) -> None:
    run_folder.write_record(path, {**info, "created": datetime.now(UTC).isoformat(timespec="seconds"),
                                   "images": done})


@cli("inference")
def main(cfg):
    run(cfg)


if __name__ == "__main__":
    main()

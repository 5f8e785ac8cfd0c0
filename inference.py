"""Predict building probabilities, masks and footprints for images, folders or STAC catalogs.

    python inference.py data_dir=<images> model=models/m40000.pth width=672 threshold=0.56 flip=3 output_dir=out
    python inference.py data_dir=<images> model=[b1.pth,b2.pth] tta=[none,hflip,vflip,hvflip,transpose] widths=[672]

One run can hold a whole TTA/multi-scale/multi-model ensemble (averaged in memory, batched); the
original pipeline's one-transform-per-run commands (`flip`, `transpose`) still work and their runs can
be averaged afterwards with combine_images.py. Tiling, TTA and blending are lib.tiling's `Engine`; the
rasters are written by lib.raster_outputs' `SceneWriter`.

Outputs under `output_dir` (lib.run_folder): probabilities/<stem>.tif (uint8 0-255) and masks/<stem>.tif
(0/255), both with an internal nodata mask, footprints/<stem>.geojson (EPSG:4326) + .gpkg (image CRS),
stac/<stem>.json + stac/catalog.json (lib.stac_outputs), and run.json. With instances on (`instances=auto`
and every model has the instance head) also instances/<stem>.tif (border, contact 0-255), and touching
buildings become separate footprints (seeds + watershed, lib.instances). Threshold, min_area and the
seed settings are resolved by lib.postprocess (given, else the first model's tuned meta.postprocess,
else the defaults) and recorded with their source. Provenance is per image
(lib.provenance): an image's tags, run.json entry and STAC item say what made it. Re-run rule: an image
is skipped only when its recorded settings fingerprint equals the current one; otherwise it is
recomputed and the log says why; `overwrite=true` recomputes all. Unreadable images are reported,
recorded as failed and skipped; the run then exits with status 1 and a summary.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path

import rasterio

import circlenet  # noqa: F401  (registers CircleNet checkpoints with model.load_models)
import model as model_lib
from lib import footprints, geo_io, int8, postprocess, provenance, raster_outputs, run_folder, scene_bands, stac_outputs
from lib.backends import choose_backend, trial_width
from lib.cli import VERSION, cli, progress_bar
from lib.devices import finishing_threads, resolve_device
from lib.errors import UserError, one_line
from lib.files import copy_file, file_sha256
from lib.image_sources import (
    ImageInput,
    RasterSource,
    check_images,
    default_data_dir,
    image_gsd,
    image_shape,
    list_images,
)
from lib.raster_outputs import SceneWriter, footprint_polygonizer, raster_profile
from lib.segmentation import BUILDING, BUILDING_PRESENT, SegmentationDecoder, has_instance_head
from lib.tiling import Engine, model_gsd, wait_quietly
from lib.tta import TTA_NAMES, seed_tta_name

# torchrun: ranks wait at a barrier while the others finish their bands and merge a city's outputs
# (COGs, footprints) -- minutes to hours for the largest mosaics, not a hang
RANKS_TIMEOUT = timedelta(hours=12)


# --------------------------------------------------------------------------------------------------
# Inputs (listing and checking: lib.image_sources)
# --------------------------------------------------------------------------------------------------

def shard_images(images: list[ImageInput], pixels: list[int], rank: int, world: int) -> list[ImageInput]:
    """This rank's share of whole images under `torchrun`: largest first, each to the least-loaded rank.

    Every rank computes the same assignment from the same sorted list, so no communication is needed.
    `run` shares its work the same way, with large scenes cut into bands first (lib.scene_bands).
    """
    return scene_bands.share(images, pixels, [im.stem for im in images], rank, world)


def open_source(path: Path, cfg) -> RasterSource:
    """Open an image with the data-preparation rules (bands, alpha/nodata, stretch, zero = nodata)."""
    low, high = cfg.stretch_percentiles
    src = RasterSource(path, cfg.stretch, low, high, cfg.stretch_range, False, cfg.bands)
    src.zero_is_nodata = geo_io.resolve_zero_is_nodata(cfg.zero_is_nodata, src.ds, src.layout)
    return src


# --------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------

def model_list(value) -> list[str]:
    if value is None:
        raise UserError("model=<checkpoint.pth> is required (a list [a.pth,b.pth] averages several models)")
    return [str(value)] if isinstance(value, (str, os.PathLike)) else [str(v) for v in value]


_plain = provenance.plain


def build_engine(cfg, models=None, device=None, d=None, images=None) -> tuple[Engine, list[dict]]:
    """Models + TTA/width plan from the config; returns the engine and one record per model.

    A model's record (path, sha256, config, meta, backend, an export's built-in TTA, the GSD it saw in
    training and where that comes from) is taken from the loaded model, before `choose_backend` may
    swap it for an ONNX Runtime or OpenVINO copy (lib.backends; `backend=auto` times the candidates, and
    the trial is returned in the first record as "backend_trial"); the engine gets the GSDs explicitly
    for the same reason. `d`: torchrun's Dist, so that rank 0 alone runs the trial. `images`: the inputs
    int8 graphs are calibrated on (lib.int8.calibration_for)."""
    paths = model_list(cfg.model)
    overrides = {k: cfg[k] for k in model_lib.ARCH_OVERRIDES}
    device = device or resolve_device(cfg.device)
    loaded = models is None
    if loaded:
        models = model_lib.load_models(paths, **overrides)
    records = [model_record(p, m) for p, m in zip(paths, models)]
    mode = postprocess.instance_mode(cfg.instances)
    heads = [mode != "false" and has_instance_head(m) for m in models]
    precision, trial, calibration = cfg.precision, None, None
    if loaded:
        ids = [f"{r['sha256']}:{json.dumps(r['config'], sort_keys=True, default=str)}" for r in records]
        calibration = int8.calibration_for([im.path for im in images], lambda p: open_source(p, cfg), cfg,
                                           trial_width(cfg), records[0]["model_gsd"]) if images else None
        chosen = choose_backend(cfg, models, paths, device, ids, keep_heads=any(heads), d=d, calibration=calibration)
        models, precision, trial = chosen.models, chosen.precision, chosen.trial
        heads = [h and has_instance_head(m) for h, m in zip(heads, models)]  # an ONNX copy may lack it
    instance = mode != "false" and all(heads)
    if mode == "true" or (mode == "auto" and any(heads) and not instance):
        for path, head in zip(paths, heads):
            if not head:
                print(f"{path}: no instance head; footprints are the mask's connected components", file=sys.stderr)
    for record, m in zip(records, models):
        record.update(backend=provenance.backend_of(m), **int8.provenance(m, calibration))
    widths = _plain(cfg.widths) if cfg.widths is not None else [cfg.width]
    tta = _plain(cfg.tta) if cfg.tta is not None else [seed_tta_name(cfg.flip, cfg.transpose)]
    if device.type == "cuda":
        import torch

        torch.backends.cudnn.benchmark = True
    eng = Engine(models, widths=widths, tta=tta, tile_size=cfg.tile_size, overlap=cfg.overlap,
                 batch_size=cfg.batch_size, device=device, precision=precision,
                 scale_factor=cfg.scale_factor, match_gsd=cfg.match_gsd, num_workers=cfg.num_workers,
                 progress=cfg.progress, model_gsds=[r["model_gsd"] for r in records],
                 decoder=SegmentationDecoder(instance=instance))
    records[0]["backend_trial"] = trial
    if all(eng.exported) and cfg.precision in ("bf16", "fp16") and eng.precision_used == "fp32":
        print(f"warning: precision={cfg.precision} has no effect on exported graphs run by ONNX Runtime or "
              "TorchScript; they run in fp32 (recorded as such)", file=sys.stderr)
    return eng, records


def model_record(path, net) -> dict:
    config = getattr(net, "config", None)
    meta = _jsonable(getattr(net, "meta", None))
    gsd, source = model_gsd(meta if isinstance(meta, dict) else None)
    return {"path": str(Path(path).resolve()), "sha256": file_sha256(path), "config": _jsonable(config),
            "meta": meta, "export_tta": provenance.export_tta(config), "model_gsd": gsd, "model_gsd_source": source}


def _jsonable(obj):
    try:
        json.dumps(obj)
        return obj
    except TypeError:
        return {k: str(v) for k, v in (obj or {}).items()}


def run_settings(cfg, eng: Engine, records: list[dict]) -> dict:
    """The run's own settings (top of run.json): what this invocation asked for. Each image's record
    holds its own provenance (lib.provenance), which is what its outputs were made with."""
    post, source = provenance.postprocess_of(cfg, records[0]["meta"])
    return {
        "toolkit_version": VERSION,
        "models": [{k: r[k] for k in ("path", "sha256", "config", "backend", "export_tta", "model_gsd",
                                      "model_gsd_source", "quantization") if k in r} for r in records],
        "passes": [{"model": p.model, "width": p.width, "tta": list(p.tta)} for p in eng.passes],
        "tta": sorted({t for p in eng.passes for t in p.tta}, key=TTA_NAMES.index),
        "widths": sorted({p.width for p in eng.passes}),
        "tile_size": eng.tile_size, "overlap": eng.overlap, "threshold": post.threshold,
        "scale_factor": eng.scale_factor, "match_gsd": eng.match_gsd,
        "precision": cfg.precision, "device": str(eng.device),
        "backend": "+".join(dict.fromkeys(r["backend"] for r in records)),
        "min_area": post.min_area, "simplify": cfg.simplify, "seed_threshold": post.seed_threshold,
        "seed_min_area": post.seed_min_area, "postprocess_source": source,
        "instances": "on" if provenance.instances_on(eng) else "off",
        "backend_trial": records[0].get("backend_trial"),
    }


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------

def start_image(eng: Engine, image: ImageInput, cfg, record: dict, bands: list | str | None = None,
                rank: int = 0, ahead: tuple | None = None):
    """Predict one image and write its probability map, mask, footprints and STAC item (all or nothing),
    in two halves. `record` holds the image's settings and fingerprint; it is completed (precision used,
    figures, windows per rank), and its provenance is what the GeoTIFF tags and the STAC item say.
    `bands` (rows of a scene split among ranks): merge their finished partial files instead.

    This call runs the model over the image (or replays its bands) and
    returns the other half, a function that finishes the outputs (the polygons' last blocks, COGs, tags,
    STAC item) and returns the record. `predict_images` calls it in a worker thread while the model runs
    on the next image, so a scene's last writes cost the model no time. Until it has run, the outputs
    are temporary files; an error in either half leaves nothing."""
    start = time.perf_counter()
    output_dir = Path(cfg.output_dir)
    settings = record["settings"]  # post-processing as resolved for this image (lib.provenance)
    instance = settings["instances"] == "on"
    paths = run_folder.output_paths(output_dir, image.stem, cfg.vector_format, instance)
    metas = None if bands is None else _band_records(output_dir, image, bands, record["fingerprint"])
    with geo_io.gdal_env(), ExitStack() as stack:
        src, first = ahead if ahead is not None else (open_source(image.path, cfg), None)
        stack.enter_context(src)
        ds = src.ds
        georef = geo_io.is_georeferenced(ds)
        profile = raster_profile(ds, georef)
        vectors = stack.enter_context(footprints.FootprintWriter(
            paths["geojson"], ds.transform if georef else None, ds.crs if georef else None,
            provenance.with_postprocess(cfg, settings)))
        poly = footprint_polygonizer(ds.height, ds.width, vectors, instance=instance,
                                     seed_threshold=settings["seed_threshold"],
                                     seed_min_area=settings["seed_min_area"], gsd=src.gsd if georef else None)
        writer = stack.enter_context(SceneWriter(paths["probability"], paths["mask"], profile, None, cog=cfg.cog,
                                                 cog_level=cfg.cog_level, polygonizer=poly, threshold=settings["threshold"],
                                                 nodata_mask=True, instance_path=paths.get("instance")))
        if metas is None:  # the last blocks are written while the next image's model call runs
            stats, written = eng.start_into(src, writer, first=first)
            stack.callback(wait_quietly, written)  # on an error below, before the writers are aborted
            record["precision"] = eng.precision_used  # `auto` is resolved on the first batch
            record["ranks"] = {str(rank): stats.windows}
        else:  # the same blocks, in the same order, as a single-process run
            stats, written = scene_bands.replay(output_dir, image.stem, metas, writer), lambda: None
            record["precision"] = scene_bands.precision_of(metas)
            record["ranks"] = scene_bands.windows_per_rank(metas)
        rest = stack.pop_all()  # the writers and the source stay open for `finish`

    def finish() -> dict:
        with geo_io.gdal_env(), rest:
            written()
            poly.finish()
            buildings = vectors.close()
            writer.tags = {k: str(v) for k, v in provenance.geotiff_tags(record).items()}
            writer.commit()
            cls_prob = stats.scores[BUILDING_PRESENT]
            record.update({
                "height": ds.height, "width": ds.width, "crs": ds.crs.to_string() if georef else None,
                "gsd": src.gsd, "windows": stats.windows, "skipped_nodata_windows": stats.skipped,
                "cls_prob": None if math.isnan(cls_prob) else round(cls_prob, 5),
                "max_prob": round(stats.map_max[BUILDING], 5), "buildings": buildings,
            })
            grid = {"bounds": ds.bounds, "crs": ds.crs, "transform": ds.transform,
                    "shape": [ds.height, ds.width]} if georef else None
        if not instance:  # left by an earlier run with the instance head: not this image's output now
            run_folder.instance_map(output_dir, image.stem).unlink(missing_ok=True)
        item = stac_outputs.scene_item(image.stem, paths, grid, provenance.stac_properties(record), cog=cfg.cog,
                                       source=image.path)
        stac_outputs.write_item(output_dir, item)
        scene_bands.remove_bands(output_dir, image.stem)  # merged, or left by an interrupted split run
        record["seconds"] = round(time.perf_counter() - start, 3)
        return record

    return finish


def _band_records(output_dir: Path, image: ImageInput, bands: list, fingerprint: str) -> list[dict]:
    """The finished partial files of a split scene's bands; a band that is missing fails the image."""
    if isinstance(bands, str):  # a rank could not compute its band: its error
        raise UserError(bands)
    metas = [scene_bands.finished_band(output_dir, image.stem, b, fingerprint) for b in bands]
    missing = [f"{b[0]}-{b[1]}" for b, m in zip(bands, metas) if m is None]
    if missing:
        raise UserError(f"{image.path}: rows {', '.join(missing)} were not predicted by their process")
    return metas


def predict_bands(eng: Engine, units: list, cfg, models: list[dict], done: dict, rank: int) -> dict[str, str]:
    """Compute this rank's bands of split scenes into partial files (lib.scene_bands); a band finished
    earlier with the same settings, or of an image already finished, is skipped. Returns
    {stem: error} for the scenes whose band could not be read (their merge records the failure)."""
    output_dir = Path(cfg.output_dir)
    failed: dict[str, str] = {}
    for unit in units:
        image, (r0, r1) = unit.image, unit.band
        if image.stem in failed:
            continue
        try:
            settings = provenance.image_settings(cfg, eng, models, image.path, image_gsd(image.path))
            fingerprint = run_folder.fingerprint(settings)
            outputs = run_folder.image_outputs(output_dir, image.stem, cfg.vector_format, settings)
            finished = not cfg.overwrite and run_folder.rerun_reason(done.get(image.stem), settings, outputs) is None
            if finished or (not cfg.overwrite and scene_bands.finished_band(output_dir, image.stem, unit.band,
                                                                            fingerprint)):
                print(f"{image.path.name}: rows {r0}-{r1} finished earlier; skipped")
                continue
            with geo_io.gdal_env(), open_source(image.path, cfg) as src, scene_bands.BandWriter(
                    output_dir, image.stem, unit.band, src.width, settings["threshold"],
                    instance=settings["instances"] == "on") as band:
                stats = eng.predict_into(src, band, rows=unit.band)
                meta = band.commit(stats, fingerprint, rank, eng.precision_used)
            print(f"{image.path.name}: rows {r0}-{r1}, {stats.windows} windows on rank {rank}; {meta['seconds']:.1f} s")
        except (UserError, rasterio.errors.RasterioError) as err:
            failed[image.stem] = str(err) if isinstance(err, UserError) else \
                f"{image.path}: not a readable raster ({one_line(err)})"
    return failed


def is_empty(record: dict, threshold: float) -> bool:
    """Negative mining: both the image-level head and the strongest pixel say 'no building'."""
    cls_prob = record.get("cls_prob")
    if record.get("windows", 0) == 0:
        return False  # all nodata: not a useful negative
    return (cls_prob is None or cls_prob < threshold) and record["max_prob"] < threshold


class ImagesFailed(UserError):
    """Some images could not be predicted; the others were. `record` is the run record."""

    def __init__(self, message: str, record: dict):
        super().__init__(message)
        self.record = record


def run(cfg, models=None) -> dict:
    """Predict every input image; returns the run record (also written to output_dir/run.json).

    Re-run rule: an image is skipped only when its outputs exist and the settings fingerprint in its
    run.json record equals the current one (lib.run_folder, lib.provenance); otherwise it is
    recomputed and the log says why. `overwrite=true` recomputes all. An image that cannot be read
    (or fails while being read) is reported in one line, recorded as failed and skipped; the others
    are predicted, and then `ImagesFailed` names the failures (exit status 1 on the command line).

    `models` (already built modules, one per `model` path) skips loading, for programmatic callers.
    Under `torchrun` each rank predicts its share of the work -- whole images, and bands of rows of
    scenes with at least `split_windows` windows per rank, merged by one rank once all are written
    (lib.scene_bands) -- and rank 0 writes the merged run.json, so the outputs are those of one process.
    """
    from lib.distributed import gather_object, leave_process_group, setup_distributed

    if cfg.task == "points":
        return run_points(cfg, models)
    if cfg.task != "segmentation":
        raise UserError(f"task={cfg.task}: use segmentation or points")
    output_dir = Path(cfg.output_dir)
    # outputs and mined copies written inside data_dir are not inputs of a later run
    own = [output_dir] + ([Path(cfg.output_dir_empty)] if cfg.output_dir_empty else [])
    listed = list_images(cfg.data_dir if cfg.data_dir is not None else default_data_dir(), exclude=own)
    if cfg.mine_empty and not cfg.output_dir_empty:
        raise UserError("mine_empty=True needs output_dir_empty=<folder> for the images found empty")
    if cfg.num_threads:
        import torch

        torch.set_num_threads(int(cfg.num_threads))
    images, _, failures = check_images(listed, cfg.bands)
    footprints.check_inputs(cfg)  # a bad existing= file fails before any prediction
    raster_outputs.check_settings(cfg)
    finishing_threads(cfg.finish_workers)  # a bad value fails before any work
    d, device = setup_distributed(cfg.device, RANKS_TIMEOUT, share_gpus=True)
    try:
        if not d.main:
            cfg.progress = False  # one bar (rank 0's) rather than interleaved ones
        eng, records = build_engine(cfg, models, device, d, images)
        info = run_settings(cfg, eng, records)
        done = run_folder.previous_records(output_dir)
        # whole images and bands of large scenes, shared among ranks (lib.scene_bands)
        units = scene_bands.plan(images, [image_shape(im.path) for im in images] if d.enabled else None, eng,
                                 d.world, cfg.split_windows)
        mine = scene_bands.share(units, [u.cost for u in units], [u.key for u in units], d.rank, d.world)
        split = scene_bands.split_images(units)
        progress_path = run_folder.rank_file(output_dir, d.rank) if d.enabled else run_folder.run_file(output_dir)
        summary = {"predicted": 0, "skipped": 0, "empty": [], "failed": []}
        if d.main:  # unreadable inputs are set aside (every rank found the same); the others are predicted
            for failure in failures:
                print(f"error: {failure.message}", file=sys.stderr)
                done[failure.image.stem] = _failed(failure.image, failure.message, output_dir, cfg)
                summary["failed"].append(failure.image.stem)
        predict_images(eng, [u.image for u in mine if u.band is None], cfg, info, done, progress_path, records,
                       summary, d.rank)
        if split:  # every rank writes its bands; after all are done, each split scene is merged by one rank
            failed = predict_bands(eng, [u for u in mine if u.band is not None], cfg, records, done, d.rank)
            failed = {k: v for part in gather_object(failed, d) for k, v in part.items()}
            stems = sorted(split)[d.rank::d.world]
            by_stem = {im.stem: im for im in images}
            predict_images(eng, [by_stem[s] for s in stems], cfg, info, done, progress_path, records, summary,
                           d.rank, bands={s: failed.get(s) or split[s] for s in stems})
        parts = gather_object((done, summary), d)
        if d.enabled:
            for part_done, _ in parts:
                done.update(part_done)
            summary = {key: sum(p[1][key] for p in parts) if key in ("predicted", "skipped")
                       else sorted(s for p in parts for s in p[1][key]) for key in summary}
        if d.main:
            _write_run(run_folder.run_file(output_dir), info, done)
            for part in run_folder.rank_files(output_dir):  # merged into run.json (now or earlier)
                part.unlink(missing_ok=True)
            stac_outputs.write_catalog(output_dir, [s for s, r in done.items() if _finished(r)],
                                       f"Building footprint predictions ({len(done)} scenes)")
            print(f"{summary['predicted']} predicted, {summary['skipped']} already done"
                  + (f", {len(summary['failed'])} failed" if summary["failed"] else "")
                  + (f", {len(summary['empty'])} empty -> {cfg.output_dir_empty}" if cfg.mine_empty else "")
                  + f"; outputs in {output_dir}" + (f" ({d.world} processes)" if d.enabled else ""))
    finally:
        leave_process_group(d)
    result = {**info, "images": done, "summary": summary}
    if summary["failed"]:
        raise ImagesFailed(failure_summary(summary["failed"], done, len(listed)), result)
    return result


def failure_summary(stems: list[str], done: dict, total: int) -> str:
    """`2 of 10 images failed: a.tif (not a readable raster), b.tif (...)`."""
    parts = [f"{Path(done[s]['path']).name} ({done[s]['reason']})" for s in stems]
    return f"{len(stems)} of {total} images failed: " + ", ".join(parts)


def _finished(record: dict) -> bool:
    return record.get("status", run_folder.STATUS_DONE) == run_folder.STATUS_DONE


def _failed(image: ImageInput, message: str, output_dir: Path, cfg) -> dict:
    """A failed image's record; any outputs it had (from other settings or an earlier file) are
    removed, so the folder never holds outputs that run.json does not vouch for."""
    for path in run_folder.image_outputs(output_dir, image.stem, cfg.vector_format):
        path.unlink(missing_ok=True)
    prefix = f"{image.path}: "
    reason = message.removeprefix(prefix)
    return {"path": str(image.path.resolve()), "status": run_folder.STATUS_FAILED, "error": message,
            "reason": reason.split(" (")[0]}


MODEL_RECORD_KEYS = ("path", "sha256", "backend", "export_tta", "model_gsd", "model_gsd_source")  # per image
PROGRESS_EVERY_S = 5.0  # the run's progress record is rewritten at most this often (and at the end)


def predict_images(eng: Engine, images: list[ImageInput], cfg, info: dict, done: dict, progress_path: Path,
                   models: list[dict], summary: dict, rank: int = 0, bands: dict | None = None) -> None:
    """Predict, skip (finished with the same settings) or set aside (unreadable) each of `images`,
    recording each in `done` and `progress_path` (in the images' order) and counting it in `summary`.
    An image's outputs are finished in worker threads (`finish_workers`: lib.devices.finishing_threads)
    while the model runs on the next ones (`start_image`; at most one image more than there are workers
    is in their hands), and the next image's settings are planned and its first window read in another
    thread meanwhile. `bands`: stem -> the rows of a scene split among
    ranks, merged from their partial files (or why a band failed)."""
    bands = bands or {}
    output_dir = Path(cfg.output_dir)
    last_write = -math.inf

    def save_progress(force: bool = False) -> None:
        """Rewrite the progress record at most every PROGRESS_EVERY_S: it holds every image of the folder,
        so one write per image would cost O(images^2). A killed run redoes the images finished since."""
        nonlocal last_write
        if force or time.monotonic() - last_write >= PROGRESS_EVERY_S:
            _write_run(progress_path, info, done)
            last_write = time.monotonic()

    def settle(image: ImageInput, record: dict) -> None:
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
        save_progress()

    def failure(image: ImageInput, err: Exception) -> dict:
        message = str(err) if isinstance(err, UserError) else f"{image.path}: not a readable raster ({one_line(err)})"
        print(f"error: {message}", file=sys.stderr)
        summary["failed"].append(image.stem)
        return _failed(image, message, output_dir, cfg)

    def finished(image: ImageInput, gsd, job) -> None:
        try:
            record = job.result()
            summary["predicted"] += 1
            print(f"{image.path.name}: {provenance.describe_scale(eng, models, gsd)}; precision "
                  f"{record['precision']}; {record['buildings']} buildings; {record['seconds']:.1f} s")
        except (UserError, rasterio.errors.RasterioError) as err:
            record = failure(image, err)
        settle(image, record)

    def plan(image: ImageInput) -> tuple:
        """The image's GSD, settings, earlier record, why it must be (re)computed (None: skip it) and,
        when it will be, its source opened with the first window read (so the model need not wait)."""
        gsd = image_gsd(image.path)
        settings = provenance.image_settings(cfg, eng, models, image.path, gsd)
        old = done.get(image.stem)
        reason = "overwrite=true" if cfg.overwrite else run_folder.rerun_reason(
            old, settings, run_folder.image_outputs(output_dir, image.stem, cfg.vector_format, settings))
        return gsd, settings, old, reason, (None if reason is None or image.stem in bands else read_ahead(image))

    def read_ahead(image: ImageInput) -> tuple:
        with geo_io.gdal_env():
            src = open_source(image.path, cfg)
            try:
                return src, eng.read_ahead(src)
            except BaseException:
                src.close()
                raise

    # (image, gsd, future finishing its outputs | None, record | None), in the images' order (run.json's)
    queue: deque = deque()

    def settle_ready(keep: int) -> None:
        """Settle the leading images whose outputs are finished; wait for them while more than `keep`
        are queued (so the model never waits for the last image's writes, and memory stays bounded)."""
        while queue and (len(queue) > keep or queue[0][2] is None or queue[0][2].done()):
            settle_queued(*queue[0])  # left queued until settled: Ctrl-C while waiting keeps it
            queue.popleft()

    def settle_queued(image: ImageInput, gsd, job, record: dict | None) -> None:
        if job is None:
            settle(image, record)
        else:
            finished(image, gsd, job)

    def keep_finished() -> None:
        """After an error that stops the run (the model failing, Ctrl-C): record the images whose outputs
        were finished, in order, so that a rerun skips them instead of computing them again."""
        for image, gsd, job, record in queue:
            error = job.exception() if job is not None else None
            if error is None or isinstance(error, (UserError, rasterio.errors.RasterioError)):
                settle_queued(image, gsd, job, record)
        queue.clear()
        save_progress(force=True)

    # workers finish earlier images' outputs and one plans the next image, all during the model call
    workers = finishing_threads(cfg.finish_workers, eng.device)
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="finish") as pool, \
                ThreadPoolExecutor(1, thread_name_prefix="plan") as planner:
            plans = [planner.submit(plan, images[0])] if images else []
            bar = progress_bar(images, disable=not cfg.progress or len(images) < 2, unit="image")
            for n, image in enumerate(bar):
                if n + 1 < len(images):
                    plans.append(planner.submit(plan, images[n + 1]))
                try:
                    gsd, settings, old, reason, ahead = plans[n].result()
                    if reason is None:
                        summary["skipped"] += 1
                        print(f"{image.path.name}: finished with the same settings; skipped")
                        queue.append((image, gsd, None, old))
                    else:
                        if reason != run_folder.NEW and (old or cfg.overwrite):
                            print(f"recomputing {image.path.name}: {reason}")
                        record = {"path": str(image.path.resolve()), "status": run_folder.STATUS_DONE,
                                  "fingerprint": run_folder.fingerprint(settings), "settings": settings,
                                  "models": [{k: m[k] for k in MODEL_RECORD_KEYS} for m in models]}
                        finish = start_image(eng, image, cfg, record, bands.get(image.stem), rank, ahead)
                        queue.append((image, gsd, pool.submit(finish), None))
                except (UserError, rasterio.errors.RasterioError) as err:
                    queue.append((image, None, None, failure(image, err)))
                settle_ready(keep=workers + 1)
            settle_ready(keep=0)
    except BaseException:  # the workers are done: keep every image they finished, then stop
        keep_finished()
        raise
    if images:
        save_progress(force=True)


def _write_run(path: Path, info: dict, done: dict) -> None:
    run_folder.write_record(path, {**info, "created": datetime.now(UTC).isoformat(timespec="seconds"),
                                   "images": done})


def run_points(cfg, models=None) -> dict:
    """`task=points`: CircleNet detections for SAR scenes (lib.point_inference), one process."""
    from lib import point_inference

    paths = model_list(cfg.model)
    if models is None:
        models = model_lib.load_models(paths)
    for path, net in zip(paths, models):
        if (getattr(net, "config", None) or {}).get("task") != "points":
            raise UserError(f"{path}: not a point-detection (CircleNet) checkpoint; task=points needs one")
    if cfg.num_threads:
        import torch

        torch.set_num_threads(int(cfg.num_threads))
    return point_inference.run(cfg, models, paths, resolve_device(cfg.device))


@cli("inference")
def main(cfg):
    try:
        run(cfg)
    except ImagesFailed as err:  # the other images are done; the exit status says not all are
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

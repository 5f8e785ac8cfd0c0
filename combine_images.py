"""Average the probability maps of several inference runs into one ensemble (or into soft labels).

    python combine_images.py base_dir=outputs_final                       # -> outputs_final/ensemble
    python combine_images.py base_dir=outputs_masks add_mask_suffix=True out_dir=soft_labels

Every folder under `base_dir` holding `probabilities/` is a run (or list them with `inputs=[...]`).
Same-named maps are averaged band by band (memory does not grow with the scene), thresholded, and
written through inference's writer (lib.raster_outputs) into a run folder of its own (lib.run_folder):
georeferenced `probabilities/`, `masks/` and `footprints/`. When every run has an image's border/contact
maps (`instances/`, models with the instance head), they are averaged too (`instances/` of the ensemble)
and touching buildings become separate footprints (seeds + watershed, lib.instances); otherwise the
footprints are the mask's connected components, and a line names the runs without instance maps.
`threshold`, `min_area` and the seed settings: as given, else lib.postprocess's defaults.

With `add_mask_suffix=True` the output is instead a training folder for self-training (train.py
`soft_labels_dir=`): the averaged probability as a 0-255 soft label `<name>_mask.png` beside its image.
An image no larger than `soft_chip_size` is kept whole (`<stem><ext>`, a copy of or a link to the source
image found through the runs' run.json), as the original pipeline did with the 1024 px Open Cities test
tiles; a bigger scene is cut into `soft_chip_size` chips `<stem>_<row>_<col>.tif` (georeferenced RGB,
`_ignore.png` where the scene has no imagery, chips without any imagery left out), so one orthomosaic
gives enough soft-labelled chips for a batch. `soft_labels.json` records what each image gave.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import rasterio
import torch
from rasterio.enums import MaskFlags
from rasterio.windows import Window

from lib import footprints, geo_io, postprocess, provenance, raster_outputs, run_folder
from lib.chip_writer import IGNORE_SUFFIX, MASK_SUFFIX
from lib.cli import VERSION, cli, progress_bar
from lib.errors import UserError
from lib.files import atomic_path, copy_file
from lib.raster_outputs import SceneWriter, footprint_polygonizer, quantize, raster_profile, to_u8
from lib.windows import OUT_COLS

BAND_ROWS = 512  # rows averaged at a time (in blocks of OUT_COLS columns)
SOFT_RECORD = "soft_labels.json"  # in a soft-label folder: what each image gave (chips, chip size)


def find_runs(base_dir: Path | None, inputs, out_dir: Path) -> list[Path]:
    """Run folders (those with probabilities/), excluding the output folder and earlier ensembles."""
    if inputs:
        runs = []
        for p in inputs:
            p = Path(p)
            run = p.parent if p.name == run_folder.PROBABILITIES else p
            if not run_folder.is_run(run):
                raise UserError(f"{p}: no {run_folder.PROBABILITIES}/ folder; pass inference output folders")
            runs.append(run)
    else:
        if base_dir is None or not base_dir.is_dir():
            raise UserError(f"base_dir={base_dir}: not a folder; pass base_dir=<folder of runs> or inputs=[run1,run2]")
        runs = sorted(p.parent for p in base_dir.rglob(run_folder.PROBABILITIES) if p.is_dir())
        runs = [r for r in runs if r.resolve() != out_dir.resolve() and not _is_ensemble(r)]
    if not runs:
        raise UserError(f"{base_dir}: no run folders with {run_folder.PROBABILITIES}/ found under it")
    return runs


def _is_ensemble(run: Path) -> bool:
    return "combined_from" in run_folder.read_run(run)


def matched_maps(runs: list[Path]) -> dict[str, list[Path]]:
    """stem -> probability map of every run; a stem missing from some run is an error."""
    per_run = [run_folder.probability_maps(r) for r in runs]
    stems = sorted(set().union(*per_run))
    if not stems:
        raise UserError(f"{runs[0] / run_folder.PROBABILITIES}: no probability maps (.tif) found")
    missing = [(s, r) for s in stems for r, m in zip(runs, per_run) if s not in m]
    if missing:
        s, r = missing[0]
        raise UserError(f"{run_folder.output_paths(r, s, None)['probability']}: missing ({len(missing)} maps missing across {len(runs)} runs); "
                        f"finish that run or leave it out with inputs=[...]")
    return {s: [m[s] for m in per_run] for s in stems}


def check_aligned(paths: list[Path]) -> None:
    """Same size, CRS and transform in every run, or a one-line error naming the odd file."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(paths[0]) as ref:
            shape, crs, transform = (ref.height, ref.width), ref.crs, ref.transform
        for p in paths[1:]:
            with rasterio.open(p) as ds:
                if (ds.height, ds.width) != shape:
                    raise UserError(f"{p}: size {ds.width}x{ds.height} differs from {paths[0]} "
                                    f"({shape[1]}x{shape[0]}); runs must cover the same images")
                if ds.crs != crs:
                    raise UserError(f"{p}: CRS {ds.crs} differs from {paths[0]} ({crs})")
                if not ds.transform.almost_equals(transform):
                    raise UserError(f"{p}: georeferencing (transform) differs from {paths[0]}")


def average_bands(paths: list[Path]):
    """Yield (row_off, col_off, mean probability 0..1 as a float tensor, valid pixels) over blocks of the maps.

    A pixel is valid where every input map's mask says so (inference writes nodata as an internal mask),
    so the ensemble keeps the inputs' nodata instead of turning it into probability 0."""
    for row, col, mean, valid in average_blocks(paths):
        yield row, col, mean[0], valid


def average_blocks(paths: list[Path]):
    """Yield (row_off, col_off, mean of every band 0..1 as a [bands, h, w] float tensor, valid pixels)
    over blocks of the maps (BAND_ROWS x OUT_COLS, the same grid for any map of the same size)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        dss = [rasterio.open(p) for p in paths]
    try:
        h, w, count = dss[0].height, dss[0].width, dss[0].count
        for row in range(0, h, BAND_ROWS):
            for col in range(0, w, OUT_COLS):
                win = Window(col, row, min(OUT_COLS, w - col), min(BAND_ROWS, h - row))
                total = np.zeros((count, win.height, win.width), np.float32)
                valid = np.ones((win.height, win.width), bool)
                for ds in dss:
                    total += ds.read(window=win).astype(np.float32)
                    valid &= ds.read_masks(1, window=win) > 0
                yield row, col, torch.from_numpy(total / (255.0 * len(dss))), valid
    finally:
        for ds in dss:
            ds.close()


def has_nodata_mask(path: Path) -> bool:
    """Whether a map carries a per-dataset (internal) nodata mask, as inference writes them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(path) as ds:
            return MaskFlags.per_dataset in ds.mask_flag_enums[0]


def source_images(runs: list[Path]) -> dict[str, Path]:
    """stem -> source image path recorded by the runs (run.json)."""
    out: dict[str, Path] = {}
    for r in runs:
        for stem, rec in run_folder.read_run(r).get("images", {}).items():
            if rec.get("path"):
                out.setdefault(stem, Path(rec["path"]))
    return out


def write_ensemble(stem: str, paths: list[Path], out_dir: Path, cfg, tags: dict,
                   instance_paths: list[Path] | None = None) -> int:
    """Average one image's maps and write probability, mask (with `instance_paths`: the averaged
    border/contact maps too) and footprints; returns the building count. `cfg`: post-processing resolved."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(paths[0]) as ref:
            georef = geo_io.is_georeferenced(ref)
            profile = raster_profile(ref, georef)
            transform, crs, height = ref.transform, ref.crs, ref.height
            masked = any(has_nodata_mask(p) for p in paths)
            gsd = geo_io.raster_gsd(ref) if georef else None
    out = run_folder.output_paths(out_dir, stem, cfg.vector_format, bool(instance_paths))
    poly = footprint_polygonizer(height, profile["width"], instance=bool(instance_paths),
                                 seed_threshold=cfg.seed_threshold, seed_min_area=cfg.seed_min_area, gsd=gsd)
    instance_blocks = average_blocks(instance_paths) if instance_paths else None
    with geo_io.gdal_env(), SceneWriter(out["probability"], out["mask"], profile, tags, cog=cfg.cog,
                                        cog_level=cfg.cog_level, polygonizer=poly, nodata_mask=masked,
                                        instance_path=out.get("instance")) as writer:
        for row, col, prob, valid in average_bands(paths):
            prob_u8, mask = quantize(prob, valid, cfg.threshold)
            maps = {} if instance_blocks is None else dict(zip(("border_u8", "contact_u8"),
                                                              to_u8(next(instance_blocks)[2])))
            writer.write(row, prob_u8, mask, col, valid=valid, **maps)
        gdf = footprints.save_footprints(poly.finish(), transform if georef else None, crs if georef else None,
                                         out["geojson"], cfg)
        writer.commit()
    if not instance_paths:  # left by an earlier ensemble of runs with instance maps
        run_folder.instance_map(out_dir, stem).unlink(missing_ok=True)
    return len(gdf)


def instance_inputs(maps: dict[str, list[Path]], runs: list[Path], mode: str) -> dict[str, list[Path]]:
    """stem -> every run's instance map of it, for the images all runs have one of (none with
    `instances=false`); one line names the runs without them when some runs have them (or `true` asked)."""
    if mode == "false":
        return {}
    out, lacking = {}, set()
    for stem in maps:
        paths = [run_folder.instance_map(r, stem) for r in runs]
        have = [p.is_file() for p in paths]
        if all(have):
            out[stem] = paths
        lacking |= {str(r) for r, h in zip(runs, have) if not h}
    if lacking and (out or mode == "true" or len(lacking) < len(runs)):
        print(f"no instance maps ({run_folder.INSTANCES}/) in {', '.join(sorted(lacking))}: footprints of the images "
              "they lack are the mask's connected components")
    return out


def soft_label(paths: list[Path]) -> np.ndarray:
    """The runs' averaged probability of one image as a 0-255 uint8 array."""
    label = np.zeros(_shape(paths[0]), np.uint8)
    for row, col, prob, _ in average_bands(paths):
        h, w = prob.shape
        label[row:row + h, col:col + w] = (prob * 255.0).round().clamp(0, 255).to(torch.uint8).numpy()
    return label


def chip_offsets(length: int, size: int) -> list[int]:
    """Chip starts along one axis: every `size` pixels, the last chip moved back to end at the edge, so
    every chip is `size` long (or the whole axis when it is shorter)."""
    if length <= size:
        return [0]
    starts = list(range(0, length - size + 1, size))
    return starts if starts[-1] + size == length else [*starts, length - size]


def write_soft_label(stem: str, paths: list[Path], image: Path | None, out_dir: Path, cfg) -> list[str]:
    """One image's soft labels: whole, or cut into `soft_chip_size` chips; returns the chip names."""
    if image is None or not image.is_file():
        raise UserError(f"{stem}: source image {image or '(not recorded)'} not found; the runs' run.json records "
                        "where inference read it -- restore the file or re-run inference")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(paths[0]) as ref, rasterio.open(image) as src:
            if (ref.height, ref.width) != (src.height, src.width):
                raise UserError(f"{image}: size differs from its probability map {paths[0]}")
    label = soft_label(paths)
    size = int(cfg.soft_chip_size)
    if max(label.shape) <= size:
        _write_whole(stem, image, label, out_dir, cfg.link_images)
        return [stem]
    names = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with geo_io.gdal_env(), geo_io.open_raster(image) as src:
            for row in chip_offsets(label.shape[0], size):
                for col in chip_offsets(label.shape[1], size):
                    name = f"{stem}_{row}_{col}"
                    if _write_chip(src, Window(col, row, min(size, src.width - col), min(size, src.height - row)),
                                   label, out_dir / name):
                        names.append(name)
    return names


def _write_whole(stem: str, image: Path, label: np.ndarray, out_dir: Path, link: bool) -> None:
    """`<stem>_mask.png` beside a copy of / link to the source image."""
    target = out_dir / f"{stem}{image.suffix.lower()}"
    if not target.exists():
        if link:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(image.resolve(), target)
        else:
            copy_file(image, target)
    _write_png(out_dir / f"{stem}{MASK_SUFFIX}", label)


def _write_chip(src, window: Window, label: np.ndarray, stem: Path) -> bool:
    """One soft-label chip (GeoTIFF RGB, soft label, ignore mask); False (nothing written) without imagery.

    The image is written last, so its presence marks a complete chip.
    """
    rgb, valid = geo_io.read_window(src, window)
    if not valid.any():
        return False
    r, c, h, w = int(window.row_off), int(window.col_off), int(window.height), int(window.width)
    chip = label[r:r + h, c:c + w].copy()
    chip[~valid] = 0
    _write_png(stem.with_name(stem.name + MASK_SUFFIX), chip)
    ignore = stem.with_name(stem.name + IGNORE_SUFFIX)
    if not valid.all():
        _write_png(ignore, (~valid).astype(np.uint8) * 255)
    elif ignore.exists():
        ignore.unlink()
    georef = geo_io.is_georeferenced(src)
    profile = {"driver": "GTiff", "compress": "deflate", "photometric": "RGB",
               **({"crs": src.crs, "transform": src.window_transform(window)} if georef else {})}
    geo_io.write_raster(stem.with_name(stem.name + ".tif"), np.moveaxis(rgb, -1, 0), profile)
    return True


def _write_png(path: Path, array: np.ndarray) -> None:
    import cv2

    with atomic_path(path) as tmp:
        if not cv2.imwrite(str(tmp), array):
            raise UserError(f"{path}: could not write it (disk full or folder not writable?)")


def soft_done(record: dict, stem: str, out_dir: Path, size: int) -> bool:
    """Whether an earlier run already wrote this image's soft labels at this chip size."""
    rec = record.get("images", {}).get(stem)
    if not rec:
        return False
    if rec.get("soft_chip_size") != size:
        raise UserError(f"{out_dir}: holds soft labels cut at soft_chip_size={rec.get('soft_chip_size')}, "
                        f"not {size}; write them into a new out_dir")
    return all((out_dir / f"{name}{MASK_SUFFIX}").exists() for name in rec.get("chips", []))


def _shape(path: Path) -> tuple[int, int]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(path) as ds:
            return ds.height, ds.width


def run(cfg) -> dict:
    base_dir = Path(cfg.base_dir) if cfg.base_dir is not None else None
    inputs = list(cfg.inputs) if cfg.inputs else None
    if base_dir is None and not inputs:
        raise UserError("pass base_dir=<folder of inference runs> or inputs=[run1,run2,...]")
    if cfg.out_dir is not None:
        out_dir = Path(cfg.out_dir)
    else:
        out_dir = (base_dir if base_dir is not None else Path(inputs[0]).resolve().parent) / "ensemble"
    runs = find_runs(base_dir, inputs, out_dir)
    footprints.check_inputs(cfg)  # a bad existing= file fails before any map is combined
    raster_outputs.check_settings(cfg)
    maps = matched_maps(runs)
    images = source_images(runs)
    post, source = provenance.postprocess_of(cfg, None)  # no checkpoint here: as given, else the defaults
    cfg = provenance.with_postprocess(cfg, post.as_dict())
    instances = {} if cfg.add_mask_suffix else instance_inputs(maps, runs, postprocess.instance_mode(cfg.instances))
    info = {"toolkit_version": VERSION, "combined_from": [str(r.resolve()) for r in runs],
            "threshold": post.threshold, "soft_labels": bool(cfg.add_mask_suffix),
            "postprocess": post.as_dict(), "postprocess_source": source,
            "instances": "on" if instances else "off",
            "models": [m for r in runs for m in run_folder.read_run(r).get("models", [])]}
    tags = {"BUILDINGS_TOOLKIT_VERSION": VERSION, "BUILDINGS_ENSEMBLE_OF": len(runs),
            "BUILDINGS_THRESHOLD": post.threshold, "BUILDINGS_MIN_AREA": post.min_area}

    done = {}
    soft_record = run_folder.read_record(out_dir / SOFT_RECORD) if cfg.add_mask_suffix else {}
    size = int(cfg.soft_chip_size)
    if size < 32:
        raise UserError(f"soft_chip_size={size}: must be at least 32 pixels")
    for stem, paths in progress_bar(maps.items(), disable=not cfg.progress or len(maps) < 2, unit="image"):
        check_aligned(paths)
        if cfg.add_mask_suffix:
            if cfg.overwrite or not soft_done(soft_record, stem, out_dir, size):
                chips = write_soft_label(stem, paths, images.get(stem), out_dir, cfg)
            else:
                chips = soft_record["images"][stem]["chips"]
            done[stem] = {"path": str(images.get(stem, "")), "soft_chip_size": size, "chips": chips}
            run_folder.write_record(out_dir / SOFT_RECORD, {**info, "images": {**soft_record.get("images", {}),
                                                                                **done}})
        else:
            inst = instances.get(stem)
            if inst:
                check_aligned([paths[0], *inst])
            out = run_folder.output_paths(out_dir, stem, cfg.vector_format, bool(inst))
            if cfg.overwrite or not all(p.exists() for p in out.values()):
                write_ensemble(stem, paths, out_dir, cfg, {**tags, "BUILDINGS_INSTANCES": "on" if inst else "off"},
                               inst)
            done[stem] = {"path": str(images[stem]) if stem in images else None, "instances": "on" if inst else "off"}
    if not cfg.add_mask_suffix:
        run_folder.write_record(run_folder.run_file(out_dir), {**info, "images": done})
    if cfg.add_mask_suffix:
        chips = sum(len(rec["chips"]) for rec in done.values())
        print(f"{chips} soft-labelled chips of {len(done)} images from {len(runs)} runs -> {out_dir}")
    else:
        print(f"{len(done)} ensemble maps from {len(runs)} runs -> {out_dir}")
    return {**info, "out_dir": str(out_dir), "images": done}


@cli("combine_images")
def main(cfg):
    run(cfg)


if __name__ == "__main__":
    main()

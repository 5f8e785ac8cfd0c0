"""Point detection over whole scenes (`inference.py task=points`): scenes in, detections CSV + GeoJSON out.

    python inference.py task=points data_dir=<xView3 scene folder, root of scenes, or prepared folder>
        model=<CircleNet checkpoint or list> output_dir=<run>

A scene is predicted by the tiling engine with lib.point_decoding's decoder (overlapping windows, flip
TTA, ensembles, maps blended across windows) and its peaks found block by block by `PeakSink`, so
memory follows the tile size, not the scene. Outputs under `output_dir`:

    detections/<scene_id>.csv       the xView3 submission columns + lat, lon, score (lib.point_outputs)
    detections/<scene_id>.geojson   the same points in EPSG:4326
    detections.csv                  every finished scene's detections (what evaluate.py task=points scores)
    run.json                        settings, and per scene: status, fingerprint, counts, seconds; rewritten
                                    after every scene, so a rerun of a stopped run skips the scenes it finished

A scene is skipped on a rerun when its outputs exist and its settings fingerprint is unchanged
(lib.run_folder's rule); a scene that cannot be read is reported in one line and recorded as failed
while the others are predicted.

Thresholds: `objectness_threshold`, `vessel_threshold`, `fishing_threshold`; each unset value comes
from the first model's checkpoint (`meta.postprocess`, written by `find_hyperparameters.py
task=points`), else DEFAULT_THRESHOLDS. The SAR normalisation of raw dB scenes is the one the model
was trained with (checkpoint `meta.sar`), unless `sar_scale`/`sar_offset` are given.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pandas as pd
import rasterio

from lib import run_folder
from lib.cli import VERSION
from lib.errors import UserError, one_line
from lib.files import file_sha256
from lib.point_decoding import PeakSink, PointDecoder
from lib.point_outputs import merge_detections, write_detections
from lib.sar import SarSource, is_scene_dir
from lib.tiling import Engine, is_exported

# objectness 0.3: the blended map is upsampled from stride 2, so even a perfect peak reads ~0.85 at input pixels
# and a young model's peaks lower still (0.3 gave the best detection F1 on the synthetic demo's test scene)
DEFAULT_THRESHOLDS = {"objectness_threshold": 0.3, "vessel_threshold": 0.5, "fishing_threshold": 0.5}
DETECTIONS_DIR, DETECTIONS_FILE = "detections", "detections.csv"
PREPARED_SCENES = "scenes.csv"  # point_dataset's table of prepared scenes


# ----- which scenes ------------------------------------------------------------------------------

def list_scenes(data_dir, channels) -> list[tuple[str, Path]]:
    """(scene_id, path) of every scene under `data_dir`: an xView3 scene folder, a folder of them, a
    prepared folder (`dataset.py task=points` output: its scenes.csv), or one GeoTIFF / a folder of them."""
    root = Path(data_dir)
    if not root.exists():
        raise UserError(f"{root}: data_dir does not exist")
    if root.is_file():
        return [(root.stem, root)]
    if is_scene_dir(root, channels):
        return [(root.name, root)]
    if (root / PREPARED_SCENES).is_file():
        table = pd.read_csv(root / PREPARED_SCENES, dtype={"scene_id": str})
        return [(r.scene_id, root / r.path) for r in table.itertuples()]
    scenes = sorted((p.name, p) for p in root.iterdir() if p.is_dir() and is_scene_dir(p, channels))
    if not scenes:
        scenes = sorted((p.stem, p) for p in root.glob("*.tif*") if p.is_file())
    if not scenes:
        raise UserError(f"{root}: no SAR scenes found (folders with {'/'.join(f'{c}_dB.tif' for c in channels)}, "
                        "a prepared folder with scenes.csv, or GeoTIFFs)")
    return scenes


def open_scene(path: Path, cfg, meta: dict) -> SarSource:
    """The scene as the model saw its training data: the checkpoint's channels and normalisation."""
    sar = meta.get("sar") or {}
    channels = list(cfg.channels)
    if sar.get("channels") and list(sar["channels"]) != channels:
        raise UserError(f"the model was trained on channels {sar['channels']}, not {channels}; "
                        f"add channels=[{','.join(sar['channels'])}]")
    scale = list(cfg.sar_scale) if cfg.sar_scale is not None else sar.get("scale")
    offset = list(cfg.sar_offset) if cfg.sar_offset is not None else sar.get("offset")
    return SarSource(path, channels=channels, scale=scale, offset=offset)


# ----- one scene ---------------------------------------------------------------------------------

def detect_scene(eng: Engine, src, threshold: float, kernel: int = 3) -> pd.DataFrame:
    """Peaks of the scene's blended objectness map (lib.point_decoding columns), block by block."""
    sink = PeakSink(src.height, src.width, threshold, kernel)
    eng.predict_into(src, sink)
    dets = sink.finish()
    # an offset may point past the edge; a detection is of this scene, so it stays on its pixels
    dets["row"] = dets["row"].clip(0, src.height - 1)
    dets["col"] = dets["col"].clip(0, src.width - 1)
    return dets


def thresholds(cfg, meta: dict) -> dict:
    """Each threshold from the command line, else the checkpoint's tuned value, else the default."""
    tuned = meta.get("postprocess") or {}
    return {k: float(cfg[k] if cfg[k] is not None else tuned.get(k, v)) for k, v in DEFAULT_THRESHOLDS.items()}


def scene_settings(cfg, eng: Engine, models: list[dict], path: Path, src, limits: dict) -> dict:
    """Everything that changes a scene's detections (its fingerprint decides whether a rerun redoes it)."""
    return {"input": str(Path(path).resolve()), "models": [m["sha256"] for m in models],
            "tta": [list(p.tta) for p in eng.passes], "tile_size": eng.tile_size, "overlap": eng.overlap,
            "precision": str(cfg.precision), "channels": list(src.channels),
            "sar_scale": list(src.scale or []), "sar_offset": list(src.offset or []),
            "nms_kernel": int(cfg.nms_kernel), **limits, "version": VERSION}


def predict_scene(eng: Engine, scene_id: str, src, cfg, limits: dict, out: Path) -> dict:
    """Detect one open scene and write its CSV and GeoJSON; returns its record for run.json."""
    started = time.time()
    dets = detect_scene(eng, src, limits["objectness_threshold"], int(cfg.nms_kernel))
    table = write_detections(dets, scene_id, src.transform, src.crs, out / f"{scene_id}.csv",
                             out / f"{scene_id}.geojson", limits["vessel_threshold"],
                             limits["fishing_threshold"], src.gsd)
    return {"detections": len(table), "windows": eng.stats.windows, "skipped_windows": eng.stats.skipped,
            "precision": eng.precision_used, "seconds": round(time.time() - started, 2)}


# ----- the run -----------------------------------------------------------------------------------

def build_engine(cfg, models: list, device) -> Engine:
    """The engine at the models' own resolution (lengths are in pixels: no resizing for points)."""
    # the seed: left-right flip TTA; an exported ensemble carries its TTA inside the graph
    exported = all(is_exported(m) for m in models)
    tta = list(cfg.tta) if cfg.tta is not None else (["none"] if exported else ["none", "hflip"])
    return Engine(models, widths=[int(cfg.tile_size)], tta=tta, tile_size=int(cfg.tile_size), overlap=cfg.overlap,
                  batch_size=int(cfg.batch_size), device=device, precision=str(cfg.precision),
                  num_workers=int(cfg.num_workers), progress=bool(cfg.progress), decoder=PointDecoder())


def run(cfg, models: list, paths: list[str], device) -> dict:
    """Detect every scene of `data_dir` (module docstring); returns the run record (run.json)."""
    output_dir = Path(cfg.output_dir)
    det_dir = output_dir / DETECTIONS_DIR
    meta = getattr(models[0], "meta", None) or {}
    eng = build_engine(cfg, models, device)
    records = [{"path": str(Path(p).resolve()), "sha256": file_sha256(p)} for p in paths]
    limits = thresholds(cfg, meta)
    old = _previous(output_dir)
    info = {"task": "points", "version": VERSION, "models": records, "thresholds": limits,
            "tta": [list(p.tta) for p in eng.passes], "tile_size": eng.tile_size, "overlap": eng.overlap}
    done: dict = {}
    failed = []
    for scene_id, path in list_scenes(cfg.data_dir, list(cfg.channels)):
        try:
            with open_scene(path, cfg, meta) as src:  # opened once: settings, then (if needed) detection
                settings = scene_settings(cfg, eng, records, path, src, limits)
                outputs = [det_dir / f"{scene_id}.csv", det_dir / f"{scene_id}.geojson"]
                reason = "overwrite=true" if cfg.overwrite else run_folder.rerun_reason(old.get(scene_id),
                                                                                      settings, outputs)
                if reason is None:
                    done[scene_id] = old[scene_id]
                    print(f"{scene_id}: finished with the same settings; skipped")
                    continue
                record = predict_scene(eng, scene_id, src, cfg, limits, det_dir)
            done[scene_id] = {"path": str(Path(path).resolve()), "status": run_folder.STATUS_DONE,
                              "fingerprint": run_folder.fingerprint(settings), "settings": settings, **record}
            print(f"{scene_id}: {record['detections']} detections; {record['windows']} windows; precision "
                  f"{record['precision']}; {record['seconds']:.1f} s")
        except (UserError, rasterio.errors.RasterioError) as err:
            message = str(err) if isinstance(err, UserError) else f"{path}: not a readable raster ({one_line(err)})"
            print(f"error: {message}", file=sys.stderr)
            for p in (det_dir / f"{scene_id}.csv", det_dir / f"{scene_id}.geojson"):
                p.unlink(missing_ok=True)
            done[scene_id] = {"path": str(Path(path).resolve()), "status": run_folder.STATUS_FAILED, "error": message}
            failed.append(scene_id)
        # after every scene (minutes each): a run stopped later still vouches for it, so a rerun skips it
        progress = {**info, "scenes": {**old, **done}, "detections": None}
        run_folder.write_record(run_folder.run_file(output_dir), progress)
    finished = [s for s, r in done.items() if r.get("status") == run_folder.STATUS_DONE]
    total = merge_detections([det_dir / f"{s}.csv" for s in finished], output_dir / DETECTIONS_FILE)
    info = {**info, "scenes": done, "detections": int(total)}
    run_folder.write_record(run_folder.run_file(output_dir), info)
    print(f"{len(finished)} scene(s), {total} detections -> {output_dir / DETECTIONS_FILE}"
          + (f"; {len(failed)} failed: {', '.join(failed)}" if failed else ""))
    if failed:
        raise UserError(f"{len(failed)} of {len(done)} scenes failed: {', '.join(failed)}")
    return info


def _previous(output_dir: Path) -> dict:
    """Scene records of an earlier run in the same folder (the rerun rule compares with them)."""
    return dict(run_folder.read_record(run_folder.run_file(output_dir)).get("scenes") or {})


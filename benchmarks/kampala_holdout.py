"""Held-out quality on the shared Kampala scene: train on its left part, score footprints on the right.

    python benchmarks/kampala_holdout.py --work outputs/holdout                       # the documented run
    python benchmarks/kampala_holdout.py --work outputs/holdout_noinst --tag no_instances \\
        --train instance_head=false                                                  # a variant
    python benchmarks/kampala_holdout.py --work outputs/holdout --skip-train         # re-score a trained run
    python benchmarks/kampala_holdout.py --work outputs/holdout_left --side left     # the mirrored holdout
    python find_hyperparameters.py mode=postprocess model=outputs/holdout/train_default/best.pth \
        data_dir=outputs/holdout/chips                                               # tune on its validation chips
    python benchmarks/kampala_holdout.py --work outputs/holdout --tag tuned --run train_default --skip-train

The scene (3072 x 2048 px, 7.46 cm, 108 OpenStreetMap footprints) is cut at column `--split` (2048):
columns left of it are prepared (`dataset.py`, one chip per building) and trained on with the
documented CPU budget (EfficientNet-b0 from scratch, 400 steps, 256 px crops, batch 8, max_lr 1e-3);
the right part (1024 x 2048 px, with every building that reaches into it, clipped to it) is never seen
in training or model selection. `inference.py` runs there with its defaults and `evaluate.py` scores
the footprints (SpaceNet polygon F1 at IoU 0.5, pixel Jaccard, vertices per polygon, right-angle
share, building count). One JSON line with the figures, the commands and the CPU is printed and
written to `<work>/<tag>.json`. Training dominates the time: 53 and 70 minutes on a 2-core CPU shared
with other jobs (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHARED = Path(os.environ.get("SHARED_DIR", REPO.parent / "shared"))
SCENE = SHARED / "data/kampala/kam/81046528/81046528.tif"
LABELS = SHARED / "data/kampala/kam/81046528-labels/81046528.geojson"
TRAIN = ["arch=b0", "pretrained=false", "max_steps=400", "width=256", "batch_size=8", "max_lr=1e-3"]


def cpu_name() -> str:
    """CPU model and the flags that change results (native bf16 or not)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    keep = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8") if f in flags]
    return f"{model} ({os.cpu_count()} cores; {' '.join(keep)})"


DEFAULT_SPLIT, DEFAULT_SIDE = 2048, "right"  # the documented cut; a folder cut before cut.json existed has it


def split_scene(work: Path, split: int, side: str = DEFAULT_SIDE) -> dict[str, Path]:
    """Write the training part (image + labels in a pairs folder) and the holdout part (image + truth).
    `side="left"` mirrors the cut: the holdout is the scene's left `width - split` columns and training
    uses the `split` columns right of them (a second holdout that shares no building with the first)."""
    import geopandas as gpd
    import rasterio
    import shapely
    from rasterio.windows import Window, bounds

    paths = {"train_dir": work / "train_scene", "test_image": work / "holdout" / "holdout.tif",
             "test_truth": work / "holdout" / "holdout.geojson"}
    cut, record = {"split": split, "side": side}, work / "holdout" / "cut.json"
    if paths["test_truth"].exists():  # cut before: only the same cut may be reused (older folders: the default)
        old = json.loads(record.read_text()) if record.exists() else {"split": DEFAULT_SPLIT, "side": DEFAULT_SIDE}
        if old != cut:
            raise SystemExit(f"{work}: already cut with --split {old['split']} --side {old['side']}; "
                             "give another --work for this cut")
        return paths
    for p in (paths["train_dir"], paths["test_image"].parent):
        p.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(cut))  # before the parts: a folder whose cut was interrupted is cut again
    with rasterio.open(SCENE) as ds:
        labels = gpd.read_file(LABELS).to_crs(ds.crs)
        labels["geometry"] = shapely.make_valid(labels.geometry.values)  # OSM rings can self-intersect
        rest = ds.width - split
        parts = ({"train": Window(0, 0, split, ds.height), "holdout": Window(split, 0, rest, ds.height)}
                 if side == "right" else
                 {"train": Window(rest, 0, split, ds.height), "holdout": Window(0, 0, rest, ds.height)})
        for name, win in parts.items():
            profile = dict(ds.profile, width=win.width, height=win.height, transform=ds.window_transform(win))
            out = paths["train_dir"] / "kampala_train.tif" if name == "train" else paths["test_image"]
            with rasterio.open(out, "w", **profile) as dst:
                dst.write(ds.read(window=win))
            box = shapely.box(*bounds(win, ds.transform))
            keep = labels[labels.intersects(box)].copy()  # every building seen in the part, clipped to it
            keep["geometry"] = keep.geometry.intersection(box)
            keep = keep[~keep.geometry.is_empty]
            target = paths["train_dir"] / "kampala_train.geojson" if name == "train" else paths["test_truth"]
            keep.to_crs("EPSG:4326").to_file(target, driver="GeoJSON")
    return paths


def run(cmd: list[str], log: Path) -> float:
    """Run one CLI step, its output appended to `log`; seconds taken."""
    start = time.perf_counter()
    with log.open("a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, check=False, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd[:2])} failed (exit {proc.returncode}); see {log}")
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("outputs/holdout"))
    ap.add_argument("--tag", default="default")
    ap.add_argument("--split", type=int, default=DEFAULT_SPLIT, help="width of the training part (with --side right, the first holdout column)")
    ap.add_argument("--side", choices=("right", "left"), default=DEFAULT_SIDE,
                    help="where the holdout lies: right of the training part (documented) or, mirrored, left")
    ap.add_argument("--train", nargs="*", default=[], help="extra train.py overrides")
    ap.add_argument("--infer", nargs="*", default=[], help="extra inference.py overrides")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--run", default=None, help="training run to score (default: train_<tag>), e.g. after tuning")
    args = ap.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    py, log = sys.executable, work / f"{args.tag}.log"
    paths = split_scene(work, args.split, args.side)
    chips, pred = work / "chips", work / f"pred_{args.tag}"
    run_dir = work / (args.run or f"train_{args.tag}")
    cmds = {
        "dataset": [py, "dataset.py", f"base_dir={paths['train_dir']}", f"out_dir={chips}", "progress=false"],
        "train": [py, "train.py", f"data_dir={chips}", *TRAIN, f"output_dir={run_dir}", "progress=false",
                  *args.train],
        "inference": [py, "inference.py", f"data_dir={paths['test_image']}", f"model={run_dir / 'best.pth'}",
                      f"output_dir={pred}", "progress=false", "overwrite=true", *args.infer],
        "evaluate": [py, "evaluate.py", f"gt={paths['test_truth']}", f"pred={pred}",
                     f"images={paths['test_image']}", f"output={work / (args.tag + '_scores.json')}"],
    }
    seconds = {}
    if not (chips / "resolutions.json").exists():
        seconds["dataset"] = run(cmds["dataset"], log)
    if not args.skip_train:
        seconds["train"] = run(cmds["train"], log)
    seconds["inference"] = run(cmds["inference"], log)
    seconds["evaluate"] = run(cmds["evaluate"], log)
    scores = json.loads((work / (args.tag + "_scores.json")).read_text())
    result = {"tag": args.tag, "cpu": cpu_name(), "seconds": {k: round(v, 1) for k, v in seconds.items()},
              "commands": {k: " ".join(c[1:]) for k, c in cmds.items()}, "scores": scores}
    (work / f"{args.tag}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""Find max_lr and weight_decay for train.py (an optuna search, or a learning-rate range test), and the
point task's detection thresholds.

    python find_hyperparameters.py batch_size=5 data_dir=<chips>                       # optuna search
    python find_hyperparameters.py ... storage=sqlite:///outputs/hyper.db n_trials=40   # resumable study
    python find_hyperparameters.py ... mode=lr_range                                   # loss-vs-lr plot
    python find_hyperparameters.py task=points model=<ckpt or list> data_dir=<prepared folder or scenes>
        [labels=<xView3 CSV>] [scenes=[a,b] | fold=0 num_folds=7] [shore_root=<dir>] [metric=loc_fscore]
    python find_hyperparameters.py mode=postprocess model=<ckpt or list> [data_dir=<chips> | images=<tif>
        labels=<geojson>] [metric=jaccard] ['inference_args={width:672}']        # footprint post-processing

Search (the original pipeline's method): every trial trains `steps_per_trial` steps with max_lr and
weight_decay drawn log-uniformly (TPE sampler), reports the validation loss `reports_per_trial` times and
is stopped early by optuna's median pruner when it is worse than the median of earlier trials at the
same step; the objective is the final validation loss. The study lives in `storage` (SQLite) when
given, so re-running the command continues it up to `n_trials` finished trials. The best values are
printed as train.py overrides.

Range test: one run whose learning rate grows geometrically from `lr_range_start` to `lr_range_end`
over `lr_range_steps` steps, stopping once the smoothed loss diverges; writes lr_range.png/.csv and
suggests max_lr a tenth of the learning rate at the lowest smoothed loss (the usual rule of thumb:
fast descent, safely before the blow-up).

Trials and the range test train through train.py (`run`, `prepare`) and lib.trainer's step: one loop.

Thresholds (`task=points`, mode `thresholds`): the models run once over the labelled holdout scenes
exactly as `inference.py task=points` runs them (lib.point_inference's engine and scene reading, TTA
and tiling as configured), keeping every peak at the grid's lowest objectness threshold; then every
objectness x vessel x fishing threshold of `threshold_grid` is scored on those peaks with the xView3
metric, no model run per trial (lib.point_tuning says why that is exact, and why a plain grid rather
than optuna). Holdout: `scenes=[ids]`, else the validation scenes of `fold`/`num_folds` (train.py's
split; num_folds=1 = every scene); labels from `labels=<xView3 CSV>`, else the prepared folder's
points.csv. A threshold given on the command line is held fixed. Printed: the best thresholds and
scores beside those of the defaults (0.5/0.5/0.5); written: a JSON report (`output`, default
<checkpoint>_thresholds.json beside the first checkpoint) and, unless `store=false`, the choice in the
first checkpoint's meta.postprocess, which inference.py task=points then uses by default
(thresholds on its command line still win).

Post-processing (`mode=postprocess`): the models run once, through inference.py's engine (its
build_engine and config; `inference_args={...}` sets any inference option), over the labelled holdout
-- the validation chips of `fold`/`num_folds` of data_dir as train.py splits them (truth: each chip's
_instances.png, else its mask's connected components), or `images=<scene> labels=<buildings>` --
keeping the building (and, with the instance head, border/contact) maps in memory; then every
threshold x seed_threshold x min_area of `threshold_grid`, `seed_threshold_grid` and `min_area_grid`
becomes footprints as inference makes them and is scored (metric polygon_f1, SpaceNet; or jaccard)
by lib.postprocess_tuning, no model run per trial. Models without the instance head: seed_threshold
is not searched. Printed: best vs lib.postprocess.DEFAULTS; written: a JSON report and, unless
store=false, the choice in the first checkpoint's meta.postprocess, which inference.py and
combine_images.py use when threshold/seed_threshold/min_area are not given.
"""

from __future__ import annotations

import csv
import datetime
import math
import time
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

import train
from lib import point_tuning, postprocess_tuning, trainer
from lib.cli import VERSION, cli, progress_bar
from lib.errors import UserError, one_line
from lib.files import atomic_path, file_sha256, write_json


def output_dir(cfg) -> Path:
    if cfg.output_dir:
        return Path(cfg.output_dir)
    stamp = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
    return Path("outputs") / "find_hyperparameters" / f"{stamp}_{cfg.mode}_{train.run_name(cfg)}"


def trial_config(cfg, max_lr: float, weight_decay: float, out: Path, number: int):
    """The training config of one trial: a short run, validated `reports_per_trial` times, no files."""
    steps = int(cfg.steps_per_trial)
    t = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    t.max_lr, t.weight_decay = float(max_lr), float(weight_decay)
    t.max_steps = steps
    t.val_every = max(1, steps // max(1, int(cfg.reports_per_trial)))
    t.output_dir = str(out / f"trial_{number:03d}")
    t.resume = None
    return t


def search(cfg) -> dict:
    """Run (or continue) the optuna study; returns the best parameters and value."""
    import optuna

    if int(cfg.n_trials) < 1 or int(cfg.steps_per_trial) < 1:
        raise UserError(f"n_trials={cfg.n_trials}, steps_per_trial={cfg.steps_per_trial}: both must be at least 1")
    (lr_lo, lr_hi), (wd_lo, wd_hi) = cfg.lr_bounds, cfg.wd_bounds
    if not (0 < lr_lo < lr_hi and 0 < wd_lo < wd_hi):
        raise UserError(f"lr_bounds={list(cfg.lr_bounds)}, wd_bounds={list(cfg.wd_bounds)}: give [low, high] with "
                        "0 < low < high (the search is log-uniform)")
    out = output_dir(cfg)
    name = cfg.study_name or f"buildings-{train.arch_slug(cfg)}"
    if cfg.storage and str(cfg.storage).startswith("sqlite:///"):
        Path(str(cfg.storage)[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(
        study_name=name, storage=cfg.storage or None, load_if_exists=True, direction="minimize",
        sampler=optuna.samplers.TPESampler(seed=int(cfg.seed)),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=int(cfg.pruner_startup_trials), n_warmup_steps=0),
    )
    finished = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    remaining = int(cfg.n_trials) - len(finished)
    print(f"study {name!r}: {len(finished)} finished trial(s), running {max(remaining, 0)} more")

    def objective(trial) -> float:
        lr = trial.suggest_float("max_lr", float(lr_lo), float(lr_hi), log=True)
        wd = trial.suggest_float("weight_decay", float(wd_lo), float(wd_hi), log=True)

        def report(session, row):
            trial.report(row["val_loss"], session.step)
            if trial.should_prune():
                raise optuna.TrialPruned()

        try:
            result = train.run(trial_config(cfg, lr, wd, out, trial.number), on_validation=report, write=False)
        except trainer.DivergedError:
            raise optuna.TrialPruned() from None  # a learning rate that blows up is simply a bad trial
        return result["last"]["val_loss"]

    if remaining > 0:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study.optimize(objective, n_trials=remaining, callbacks=[_print_trial])
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        raise UserError(f"study {name!r}: no trial completed (all pruned or diverged); lower lr_bounds or "
                        "raise steps_per_trial")
    best = study.best_trial
    result = {"study": name, "storage": cfg.storage, "trials": len(study.trials), "best_val_loss": best.value,
              "max_lr": best.params["max_lr"], "weight_decay": best.params["weight_decay"]}
    write_json(out / "best.json", result)
    print(f"best of {len(done)} completed trial(s): val_loss {best.value:.4f}")
    print(f"train.py overrides: max_lr={best.params['max_lr']:.3g} weight_decay={best.params['weight_decay']:.3g}")
    return result


def _print_trial(study, trial) -> None:
    value = "pruned" if trial.value is None else f"val_loss {trial.value:.4f}"
    print(f"trial {trial.number}: max_lr={trial.params.get('max_lr', float('nan')):.3g} "
          f"weight_decay={trial.params.get('weight_decay', float('nan')):.3g} -> {value}")


def lr_range(cfg) -> dict:
    """Learning-rate range test with train.py's model, data and step; writes the plot and the suggestion."""
    import torch

    steps, start, end = int(cfg.lr_range_steps), float(cfg.lr_range_start), float(cfg.lr_range_end)
    if steps < 2 or not 0 < start < end:
        raise UserError(f"lr_range_steps={steps}, lr_range_start={start}, lr_range_end={end}: need at least 2 steps "
                        "and 0 < start < end")
    out = output_dir(cfg)
    t = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    t.max_steps, t.max_lr, t.output_dir, t.resume = steps, start, str(out), None
    s = train.prepare(t)
    for group in s.optimizer.param_groups:
        group["lr"] = start
    s.scheduler = torch.optim.lr_scheduler.ExponentialLR(s.optimizer, gamma=(end / start) ** (1.0 / (steps - 1)))
    batches = s.task.train_batches(s)
    rows, best, smooth = [], math.inf, None
    for i in range(steps):
        lr = s.optimizer.param_groups[0]["lr"]
        try:
            loss = trainer.train_step(s, next(batches))["loss"]
        except trainer.DivergedError:
            break
        smooth = loss if smooth is None else 0.8 * smooth + 0.2 * loss
        debiased = smooth / (1 - 0.8 ** (i + 1)) if i < 20 else smooth
        rows.append({"lr": lr, "loss": loss, "smoothed": debiased})
        best = min(best, debiased)
        if i > 5 and debiased > 4 * best:
            break
    if len(rows) < 3:
        raise UserError(f"lr_range: the loss diverged within {len(rows)} steps; lower lr_range_start")
    lrs = np.array([r["lr"] for r in rows])
    smoothed = np.array([r["smoothed"] for r in rows])
    at_min = float(lrs[int(np.argmin(smoothed))])
    suggestion = at_min / 10.0
    if s.d.main:
        write_curve(out, rows, suggestion)
        print(f"lowest smoothed loss at lr {at_min:.3g}; suggested max_lr={suggestion:.3g} "
              f"(plot: {out / 'lr_range.png'})")
    return {"suggested_max_lr": suggestion, "lr_at_min_loss": at_min, "steps": len(rows), "output_dir": str(out)}


def write_curve(out: Path, rows: list[dict], suggestion: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "lr_range.csv") as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["lr", "loss", "smoothed"])
        writer.writeheader()
        writer.writerows(rows)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["lr"] for r in rows], [r["loss"] for r in rows], alpha=0.3, label="loss")
    ax.plot([r["lr"] for r in rows], [r["smoothed"] for r in rows], label="smoothed")
    ax.axvline(suggestion, color="red", linestyle="--", label=f"suggested max_lr {suggestion:.2g}")
    ax.set(xscale="log", xlabel="learning rate", ylabel="training loss", title="Learning-rate range test")
    ax.legend()
    fig.tight_layout()
    with atomic_path(out / "lr_range.png") as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def run(cfg, models=None) -> dict:
    """The configured mode; `models` (thresholds, postprocess) replaces loading `model=` (tests, callers)."""
    mode = cfg.mode or ("thresholds" if cfg.task == "points" else "search")
    if mode == "thresholds":
        if cfg.task != "points":
            raise UserError("mode=thresholds tunes the point task's detection thresholds; add task=points")
        return tune_thresholds(cfg, models)
    if mode == "postprocess":
        if cfg.task != "segmentation":
            raise UserError("mode=postprocess tunes building footprints; use it with task=segmentation")
        return tune_postprocess(cfg, models)
    if mode == "search":
        return search(cfg)
    if mode == "lr_range":
        return lr_range(cfg)
    raise UserError(f"mode={cfg.mode}: use search, lr_range, postprocess or thresholds (task=points)")


# ----- task=points: detection thresholds on a labelled holdout ------------------------------------

def tune_thresholds(cfg, models=None) -> dict:
    """Tune objectness / vessel / fishing thresholds (module docstring); returns the JSON report."""
    from inference import model_list
    from lib.checkpoints import update_meta
    from lib.point_inference import DEFAULT_THRESHOLDS

    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))  # the demo fills data_dir in
    cfg.metric = cfg.metric or "aggregate"
    paths = model_list(cfg.model)
    grids = point_tuning.search_grids(threshold_grids(cfg), cfg.metric)
    if cfg.store:
        _check_storable(paths[0])
    if cfg.data_dir is None:
        import point_task

        point_task.resolve_demo(cfg)  # the synthetic SAR demo train.py task=points trains on
    scenes, labels, how = holdout(cfg)
    if models is None:
        models = load_point_models(paths)
    records = [{"path": str(Path(p).resolve()), "sha256": file_sha256(p)} for p in paths]  # as tuned
    low = min(float(grids["objectness_threshold"].min()), DEFAULT_THRESHOLDS["objectness_threshold"])
    cand = candidates(cfg, models, scenes, low)
    print(f"holdout: {len(scenes)} scene(s) ({how}), {len(labels)} labels; {len(cand)} candidate peaks at "
          f"objectness >= {low:g}; grid {' x '.join(str(len(g)) for g in grids.values())}, metric {cfg.metric}")
    found = point_tuning.search(labels, cand, grids, cfg.metric, cfg.shore_root)
    best = found["thresholds"]
    scores = {"best": point_tuning.evaluate(labels, cand, best, cfg.shore_root)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # missing shore data was just reported, once is enough
        scores["default"] = point_tuning.evaluate(labels, cand, DEFAULT_THRESHOLDS, cfg.shore_root)
    ids = [s for s, _ in scenes]
    stored = None
    if cfg.store:
        entry = {**best, "metric": str(cfg.metric), "score": scores["best"][cfg.metric], "scenes": ids}
        update_meta(paths[0], {"postprocess": entry})  # atomically; weights and the rest kept as they are
        stored = str(paths[0])
    report = {"task": "points", "version": VERSION, "metric": str(cfg.metric), "scenes": ids, "holdout": how,
              "labels": len(labels), "models": records, "shore_root": cfg.shore_root, "candidate_threshold": low,
              "candidates": len(cand), "grid": found["grid"], "best": {**best, "scores": scores["best"]},
              "default": {**DEFAULT_THRESHOLDS, "scores": scores["default"]}, "curve": found["curve"],
              "stored_in": stored}
    out = Path(cfg.output) if cfg.output else Path(paths[0]).with_name(f"{Path(paths[0]).stem}_thresholds.json")
    write_json(out, report)
    _print_thresholds(str(cfg.metric), report, out)
    return report


def threshold_grids(cfg) -> dict:
    """Values searched per threshold: `threshold_grid`, or the one value given on the command line."""
    grid = cfg.threshold_grid
    if grid is None or len(grid) != 3:
        raise UserError(f"threshold_grid={grid}: give [first, last, step], e.g. [0.05,0.95,0.05]")
    base = point_tuning.threshold_grid(*grid)
    out = {}
    for key in point_tuning.AXES:
        if cfg[key] is not None and not 0 < float(cfg[key]) <= 1:
            raise UserError(f"{key}={cfg[key]}: a threshold is a probability in (0, 1]")
        out[key] = base if cfg[key] is None else np.array([float(cfg[key])])
    return out


def _check_storable(path) -> None:
    from lib.checkpoints import check_file, exported_kind

    if exported_kind(check_file(path)):
        raise UserError(f"{path}: an exported model cannot store thresholds; give the .pth it came from or "
                        "store=false (then pass the printed thresholds to inference.py)")


def holdout(cfg) -> tuple[list, pd.DataFrame, str]:
    """The labelled scenes to tune on, as (scene_id, path), their labels (xView3 columns), and how chosen."""
    import point_dataset
    import point_task
    from lib.point_inference import list_scenes
    from lib.point_labels import read_xview3_csv

    found = list_scenes(cfg.data_dir, list(cfg.channels))
    ids = [s for s, _ in found]
    if cfg.labels:
        points = read_xview3_csv(cfg.labels, scenes=ids)
    elif (Path(cfg.data_dir) / point_dataset.POINTS_FILE).is_file():
        points = point_dataset.load_prepared(cfg.data_dir)[1]
    else:
        raise UserError(f"{cfg.data_dir}: not a prepared folder with {point_dataset.POINTS_FILE}; give the scenes' "
                        "labels with labels=<xView3 CSV>")
    if cfg.scenes is not None:
        wanted = [str(s) for s in (cfg.scenes if OmegaConf.is_list(cfg.scenes) else [cfg.scenes])]
        unknown = [s for s in wanted if s not in ids]
        if unknown:
            raise UserError(f"{cfg.data_dir}: no scene(s) {', '.join(unknown[:5])} (scenes=); found "
                            f"{', '.join(ids[:5])}{' ...' if len(ids) > 5 else ''}")
        how = "scenes="
    else:
        wanted = point_dataset.split_scenes(ids, int(cfg.fold), int(cfg.num_folds), int(cfg.split_seed), points)[1]
        if not wanted:
            raise UserError(f"{cfg.data_dir}: fold={cfg.fold} of num_folds={cfg.num_folds} holds none of its "
                            f"{len(ids)} scene(s); lower num_folds (1 = every scene) or give scenes=[...]")
        how = f"fold {cfg.fold} of {cfg.num_folds}"
    chosen = [(s, p) for s, p in found if s in set(wanted)]
    labels = point_task.xview3_labels(points[points["scene_id"].isin(set(wanted))])
    bare = sorted(set(wanted) - set(labels["scene_id"]))
    if len(bare) == len(chosen):
        raise UserError(f"{cfg.labels or cfg.data_dir}: no labels in the holdout scene(s) {', '.join(bare[:5])}; "
                        "nothing to tune on")
    if bare:
        print(f"warning: no labels in scene(s) {', '.join(bare[:5])}: their detections count nowhere")
    return chosen, labels, how


def load_point_models(paths: list[str]) -> list:
    """The CircleNet checkpoints (or exports) of `model=`, as inference.py task=points loads them."""
    import circlenet  # noqa: F401  (registers CircleNet checkpoints with model.load_models)
    import model as model_lib

    models = model_lib.load_models(paths)
    for path, net in zip(paths, models):
        if (getattr(net, "config", None) or {}).get("task") != "points":
            raise UserError(f"{path}: not a point-detection (CircleNet) checkpoint; task=points needs one")
    return models


def candidates(cfg, models: list, scenes: list, threshold: float) -> pd.DataFrame:
    """Every holdout scene's peaks at `threshold` (lib.point_tuning.candidate_table rows), one model run."""
    import torch

    from lib.devices import resolve_device
    from lib.point_inference import build_engine, detect_scene, open_scene

    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    meta = getattr(models[0], "meta", None) or {}
    eng = build_engine(cfg, models, resolve_device(cfg.device))
    tables = []
    for scene_id, path in scenes:
        started = time.time()
        with open_scene(path, cfg, meta) as src:
            dets = detect_scene(eng, src, threshold, int(cfg.nms_kernel))
            tables.append(point_tuning.candidate_table(dets, scene_id, src.transform, src.crs, src.gsd))
        print(f"{scene_id}: {len(dets)} candidate peaks; {eng.stats.windows} windows; precision "
              f"{eng.precision_used}; {time.time() - started:.1f} s")
    filled = [t for t in tables if len(t)]
    return pd.concat(filled, ignore_index=True) if filled else tables[0]


def _print_thresholds(metric: str, report: dict, out: Path) -> None:
    def line(scores: dict) -> str:
        parts = ", ".join(f"{k} {scores[k]:.4f}" for k in point_tuning.HEADLINE if k != metric)
        return f"{metric} {scores[metric]:.4f} ({parts}; {scores['detections']} detections)"

    default = "/".join(f"{report['default'][k]:g}" for k in point_tuning.AXES)
    print(f"default thresholds {default}: {line(report['default']['scores'])}")
    print(f"best: {line(report['best']['scores'])}")
    print("inference.py overrides: " + " ".join(f"{k}={report['best'][k]:g}" for k in point_tuning.AXES))
    if report["stored_in"]:
        print(f"stored in {report['stored_in']} (meta.postprocess): inference.py task=points uses them unless "
              "thresholds are given on its command line")
    print(f"report: {out}")


# ----- mode=postprocess: threshold x seed_threshold x min_area of footprints -----------------------

def tune_postprocess(cfg, models=None) -> dict:
    """Tune the footprint post-processing on a labelled holdout (module docstring); returns the JSON report."""
    import evaluate
    from inference import build_engine, model_list
    from lib.checkpoints import update_meta
    from lib.postprocess import DEFAULTS, resolve

    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    metric = str(cfg.metric or "polygon_f1")
    if metric not in postprocess_tuning.METRICS:
        raise UserError(f"metric={metric}: mode=postprocess scores {' or '.join(postprocess_tuning.METRICS)}")
    paths = model_list(cfg.model)
    if cfg.store:
        _check_storable(paths[0])
    icfg = inference_config(cfg, paths)
    eng, records = build_engine(icfg, models)
    meta = records[0]["meta"] if isinstance(records[0]["meta"], dict) else {}
    samples, how = postprocess_holdout(cfg, icfg, eng)
    heads = all(s.instance_maps for s in samples)
    georef = all(s.georeferenced for s in samples)
    grids = postprocess_tuning.grids(cfg.threshold_grid, cfg.seed_threshold_grid, cfg.min_area_grid, heads)
    options = {"simplify": icfg.simplify, "regularize": icfg.regularize, "angles": icfg.regularize_angles,
               "seed_min_area": resolve(icfg, meta).seed_min_area, "iou": 0.5,
               "score_min_area": cfg.score_min_area if cfg.score_min_area is not None
               else (evaluate.MIN_AREA_M2 if georef else evaluate.MIN_AREA_PX)}
    units = "m^2" if georef else "px"
    print(f"holdout: {len(samples)} image(s) ({how}), {sum(len(s.truth) for s in samples)} buildings; grid "
          f"{' x '.join(str(len(grids[k])) for k in postprocess_tuning.AXES)}, metric {metric}, areas in {units}"
          + ("" if heads else "; no instance head: seed_threshold not searched (footprints = mask components)"))
    found = postprocess_tuning.search(samples, grids, metric, options)
    best = {k: found["best"][k] for k in postprocess_tuning.AXES}
    default = {k: (DEFAULTS[k] if heads or k != "seed_threshold" else None) for k in postprocess_tuning.AXES}
    scores = {"best": postprocess_tuning.headline(found["best"]),
              "default": postprocess_tuning.headline(postprocess_tuning.evaluate(samples, default, options))}
    stored = None
    if cfg.store:
        entry = {**{k: v for k, v in best.items() if v is not None}, "metric": metric,
                 "score": scores["best"][metric], "holdout": how}
        update_meta(paths[0], {"postprocess": entry})  # atomically; weights and the rest kept as they are
        stored = str(paths[0])
    report = {"task": "segmentation", "mode": "postprocess", "version": VERSION, "metric": metric, "holdout": how,
              "images": [s.name for s in samples], "buildings": sum(len(s.truth) for s in samples),
              "instance_head": heads, "area_units": units, "models": [{k: r[k] for k in ("path", "sha256")}
                                                                      for r in records],
              "options": options, "grid": found["grid"], "best": {**best, "scores": scores["best"]},
              "default": {**default, "scores": scores["default"]}, "curve": found["curve"], "stored_in": stored}
    out = Path(cfg.output) if cfg.output else Path(paths[0]).with_name(f"{Path(paths[0]).stem}_postprocess.json")
    write_json(out, report)
    postprocess_tuning.print_report(report, out)
    return report


def inference_config(cfg, paths: list[str]):
    """inference.py's config for the model run: its defaults, `inference_args={...}`, and this run's shared keys."""
    from lib.cli import compose_config

    icfg = compose_config("inference", [])
    icfg = OmegaConf.create(OmegaConf.to_container(icfg, resolve=True))
    given = cfg.inference_args
    if given is not None and not isinstance(given, Mapping):
        raise UserError(f"inference_args={given}: give a mapping in quotes, e.g. 'inference_args={{width:672,flip:3}}' "
                        "(unquoted, the shell splits the braces)")
    for key, value in (given or {}).items():
        if key not in icfg:
            raise UserError(f"inference_args: {key} is not an inference.py option")
        icfg[key] = value
    icfg.model = list(paths)
    for key in ("device", "precision", "tile_size", "overlap", "batch_size", "progress"):
        icfg[key] = cfg[key]
    if cfg.num_workers != "auto":  # a count given for training's loader also reads windows ahead; auto: inference's
        icfg.num_workers = cfg.num_workers
    if cfg.tta is not None:
        icfg.tta = list(cfg.tta)
    return icfg


def postprocess_holdout(cfg, icfg, eng) -> tuple[list, str]:
    """The holdout as postprocess_tuning Samples (maps from one model run), and how it was chosen."""
    if cfg.images is not None or (cfg.labels is not None and cfg.data_dir is None):
        if cfg.images is None or cfg.labels is None:
            raise UserError("a labelled scene needs both images=<GeoTIFF> and labels=<GeoJSON/GPKG of its buildings>")
        return [scene_sample(Path(cfg.images), Path(cfg.labels), icfg, eng)], "images= labels="
    if cfg.data_dir is None:
        raise UserError("mode=postprocess needs data_dir=<chips> (its validation fold) or images=<scene> "
                        "labels=<buildings>")
    import dataset

    chips = dataset.list_chips(cfg.data_dir)
    val = dataset.split_folds(chips, int(cfg.fold), int(cfg.num_folds), by=cfg.split_by, seed=int(cfg.split_seed))[1]
    if not val:
        raise UserError(f"{cfg.data_dir}: fold={cfg.fold} of num_folds={cfg.num_folds} holds none of its "
                        f"{len(chips)} chip(s); lower num_folds (1 = every chip)")
    return [chip_sample(c, eng) for c in progress_bar(val, disable=not cfg.progress, unit="chip")], \
        f"fold {cfg.fold} of {cfg.num_folds}"


def predicted_maps(eng, src) -> dict:
    """Every map the engine's decoder gives for a source, pasted into whole-image float32 arrays."""
    out = {name: np.zeros((src.height, src.width), np.float32) for name in eng.decoder.maps}
    for block in eng.predict(src):
        h, w = block.valid.shape
        for name, m in block.maps.items():
            out[name][block.row_off:block.row_off + h, block.col_off:block.col_off + w] = m.float().cpu().numpy()
    return out


def _sample(name, maps: dict, truth: list, truth_mask, ignore=None, transform=None, crs=None):
    from lib.segmentation import BUILDING

    prob = maps[BUILDING]
    border, contact = maps.get("border"), maps.get("contact")
    if ignore is not None:
        for m in (prob, border, contact):
            if m is not None:
                m[ignore] = 0.0  # unlabelled pixels: nothing predicted there is scored
    return postprocess_tuning.Sample(name, prob, border, contact, truth, truth_mask, ignore, transform, crs)


def chip_sample(chip, eng):
    """A validation chip: its maps, and its buildings from <name>_instances.png (else the mask's components)."""
    import cv2
    from affine import Affine

    import dataset
    from lib.image_sources import ArraySource

    rgb, valid = dataset.read_chip_image(chip.image)
    shape = rgb.shape[:2]
    ignore = ~valid
    if chip.ignore is not None:
        ignore |= dataset.read_gray(chip.ignore, shape) > 127
    ids_path = chip.image.with_name(chip.image.with_suffix("").name + "_instances.png")
    if ids_path.exists():
        ids = cv2.imread(str(ids_path), cv2.IMREAD_UNCHANGED)
        if ids is None or ids.shape[:2] != shape:
            raise UserError(f"{ids_path}: not a readable instance-id PNG of its chip's size; re-run dataset.py")
        ids = ids.astype(np.int32)
    else:
        mask = dataset.read_gray(chip.mask, shape) > 127 if chip.mask is not None else np.zeros(shape, bool)
        ids = cv2.connectedComponents(mask.astype(np.uint8), connectivity=4, ltype=cv2.CV_32S)[1]
    ids[ignore] = 0
    maps = predicted_maps(eng, ArraySource(rgb, valid, chip.gsd))
    transform = Affine.scale(chip.gsd, -chip.gsd) if chip.gsd else None  # ground units without a CRS
    return _sample(f"{chip.scene}/{chip.image.stem}", maps, postprocess_tuning.truth_from_ids(ids), ids > 0, ignore,
                   transform)


def scene_sample(image: Path, labels: Path, icfg, eng):
    """A labelled scene read as inference reads it, its buildings moved to pixel coordinates."""
    import geopandas as gpd
    import shapely
    from rasterio.features import rasterize

    from inference import open_source
    from lib import geo_io

    try:
        truth = gpd.read_file(labels)
    except Exception as err:  # noqa: BLE001 - any unreadable vector file is the user's input
        raise UserError(f"{labels}: not a readable vector file ({one_line(err)})") from None
    with geo_io.gdal_env(), open_source(image, icfg) as src:
        georef = geo_io.is_georeferenced(src.ds)
        transform, crs = (src.ds.transform, src.ds.crs) if georef else (None, None)
        maps = predicted_maps(eng, src)
    if georef and truth.crs is not None:
        truth = truth.to_crs(crs)
    geoms = np.asarray([g for g in truth.geometry.values if g is not None and not g.is_empty], dtype=object)
    if transform is not None and len(geoms):
        a, b, c, d, e, f = tuple(~transform)[:6]
        geoms = shapely.transform(geoms, lambda xy: np.column_stack([a * xy[:, 0] + b * xy[:, 1] + c,
                                                                     d * xy[:, 0] + e * xy[:, 1] + f]))
    shape = maps["building"].shape
    mask = rasterize(list(geoms), out_shape=shape, all_touched=True).astype(bool) if len(geoms) else \
        np.zeros(shape, bool)
    return _sample(image.stem, maps, list(geoms), mask, None, transform, crs)


@cli("find_hyperparameters")
def main(cfg):
    run(cfg)


if __name__ == "__main__":
    main()

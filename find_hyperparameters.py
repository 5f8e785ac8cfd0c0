"""Find max_lr and weight_decay for train.py: an optuna search, or a learning-rate range test.

    python find_hyperparameters.py batch_size=5 data_dir=<chips>                       # optuna search
    python find_hyperparameters.py ... storage=sqlite:///outputs/hyper.db n_trials=40   # resumable study
    python find_hyperparameters.py ... mode=lr_range                                   # loss-vs-lr plot

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
"""

from __future__ import annotations

import csv
import datetime
import math
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

import train
from lib import trainer
from lib.cli import cli
from lib.errors import UserError
from lib.files import atomic_path, write_json


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


def run(cfg) -> dict:
    if cfg.mode == "search":
        return search(cfg)
    if cfg.mode == "lr_range":
        return lr_range(cfg)
    raise UserError(f"mode={cfg.mode}: use search or lr_range")


@cli("find_hyperparameters")
def main(cfg):
    run(cfg)


if __name__ == "__main__":
    main()

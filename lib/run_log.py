"""What a training run leaves beside its checkpoints: config.yaml, metrics.csv, TensorBoard events, curves.png.

One `RunLog` per run folder, written by rank 0 only. The columns of metrics.csv are the trainer's
(step, epoch, lr, train_loss, time_s) around the task's validation metrics, so any task logs the same way.
On resume the rows and TensorBoard events after the checkpoint's step are dropped, so the folder reads
as one continuous run.
"""

from __future__ import annotations

import csv
from pathlib import Path

from lib.files import atomic_path


def metric_fields(metric_names) -> list[str]:
    """metrics.csv columns for a task whose validation returns `metric_names`."""
    return ["step", "epoch", "lr", "train_loss", *metric_names, "time_s"]


def write_metrics_row(path: Path, row: dict, fields: list[str]) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow(row)


def truncate_metrics(path: Path, step: int, fields: list[str]) -> None:
    """On resume drop rows written after the checkpoint, so metrics.csv reads as one continuous run."""
    if not path.exists():
        return
    with path.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def plot_curves(history: list[dict], path: Path, metric_names, labels: dict | None = None) -> None:
    """PNG of the train/validation loss and the other validation metrics against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = labels or {}
    steps = [h["step"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(steps, [h.get("train_loss") for h in history], "o-", label="train")
    ax1.plot(steps, [h["val_loss"] for h in history], "o-", label="validation")
    ax1.set(xlabel="step", ylabel="loss", title="Loss")
    ax1.legend()
    for name in (n for n in metric_names if n != "val_loss"):
        ax2.plot(steps, [h[name] for h in history], "o-", label=labels.get(name, name))
    ax2.set(xlabel="step", title="Validation")
    ax2.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


class RunLog:
    """The run folder's logs; every method is a no-op when `enabled` is false (other ranks, `write=False`)."""

    def __init__(self, out: Path, metric_names, enabled: bool, labels: dict | None = None):
        self.out, self.metric_names, self.enabled = Path(out), tuple(metric_names), enabled
        self.fields = metric_fields(self.metric_names)
        self.labels = labels or {}
        self.writer = None

    def open(self, config_yaml: str, step: int) -> None:
        """Write config.yaml, drop metrics rows past `step` and open TensorBoard (purging later events)."""
        if not self.enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.out / "config.yaml") as tmp:
            tmp.write_text(config_yaml)
        truncate_metrics(self.out / "metrics.csv", step, self.fields)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(self.out), purge_step=step or None)

    def scalars(self, prefix: str, values: dict, step: int) -> None:
        if self.writer:
            for k, v in values.items():
                self.writer.add_scalar(f"{prefix}/{k}", v, step)

    def validation(self, row: dict) -> None:
        """One metrics.csv row and the validation scalars (val/loss, val/jaccard, ...)."""
        if not self.enabled:
            return
        write_metrics_row(self.out / "metrics.csv", row, self.fields)
        self.scalars("val", {k.removeprefix("val_"): row[k] for k in self.metric_names}, row["step"])

    def close(self) -> None:
        if self.writer:
            self.writer.close()
            self.writer = None

    def curves(self, history: list[dict]) -> None:
        """curves.png of a finished run."""
        if self.enabled and history:
            plot_curves(history, self.out / "curves.png", self.metric_names, self.labels)

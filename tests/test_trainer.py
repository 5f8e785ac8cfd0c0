"""lib.trainer: a task-neutral loop (a toy regression task trains, logs, checkpoints and resumes exactly),
and the segmentation task's exactness -- same seed same steps, resume after SIGKILL, DDP gloo parity."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import ClassVar

import pytest
import torch

import train
from lib import trainer
from lib.checkpoints import load_checkpoint
from lib.cli import REPO_DIR, compose_config
from lib.distributed import Dist
from lib.errors import UserError
from lib.run_log import metric_fields, truncate_metrics
from model import load_model

torch.set_num_threads(1)
TINY = ["arch=b0", "pretrained=false", "width=64", "batch_size=2", "num_workers=0", "threads=1", "progress=false",
        "augment=light"]


def tb_losses(run_dir: Path) -> dict[int, float]:
    """Per-step training loss from a run's TensorBoard events (last write wins, as TensorBoard shows it)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for events in sorted(Path(run_dir).glob("events.out.tfevents.*"), key=os.path.getmtime):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        if "train/loss" in acc.Tags()["scalars"]:
            out.update({e.step: e.value for e in acc.Scalars("train/loss")})
    return out


# --------------------------------------------------------------------------------------------------
# A task that is not segmentation: y = 3x - 1 with noise, batches a function of (seed, step)
# --------------------------------------------------------------------------------------------------


class Line(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(1, 1)
        self.drop = torch.nn.Dropout(0.5)
        self.config = {"kind": "line"}

    def forward(self, x):
        return self.fc(self.drop(x))


class RegressionTask:
    metric_names = ("val_loss", "val_score")
    select_metric = "val_score"
    metric_labels: ClassVar[dict] = {}

    def build_data(self, cfg, d):
        return type("Data", (), {"train": list(range(40))})()

    def build_model(self, cfg):
        return Line()

    def build_optimizer(self, net, cfg, lr, total_steps):
        opt = torch.optim.AdamW(net.parameters(), lr=lr)
        return opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total_steps)

    def train_batches(self, s):
        while True:
            g = torch.Generator().manual_seed(1000 + s.step)
            x = torch.randn(s.cfg.batch_size, 1, generator=g)
            yield x, 3 * x - 1 + 0.1 * torch.randn(x.shape, generator=g)

    def compute_loss(self, s, inputs):
        x, y = inputs
        loss = torch.nn.functional.mse_loss(s.model(x), y)
        return loss, {"mse": loss}

    def validate(self, s):
        x = torch.linspace(-1, 1, 16)[:, None]
        loss = float(torch.nn.functional.mse_loss(s.net(x), 3 * x - 1))
        return {"val_loss": loss, "val_score": -loss}

    def checkpoint_meta(self, s):
        return {"task": "line"}


def line_config(out: Path, **overrides):
    args = ["max_steps=12", "batch_size=4", "max_lr=0.05", "val_every=4", "save_every=3", "log_every=1",
            "progress=false", "threads=1", f"output_dir={out}", *[f"{k}={v}" for k, v in overrides.items()]]
    return compose_config("train", args)


@pytest.mark.slow
def test_a_non_segmentation_task_trains_logs_and_keeps_its_best_score(tmp_path):
    s = trainer.prepare(line_config(tmp_path / "run", max_lr=0.5, dropout=False), RegressionTask(), Dist(),
                        torch.device("cpu"))
    assert s.per_epoch == 10 and s.total_steps == 12
    result = trainer.fit(s)
    assert result["step"] == 12 and result["best_score"] == result["best"] == max(h["val_score"] for h in s.history)
    assert result["last"]["val_loss"] < 0.5 * s.history[0]["val_loss"]
    with (tmp_path / "run" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == metric_fields(RegressionTask.metric_names) and [r["step"] for r in rows] == ["4", "8", "12"]
    ckpt = load_checkpoint(tmp_path / "run" / "last.pth")
    assert ckpt["meta"]["task"] == "line" and ckpt["metrics"]["best_score"] == result["best"]
    assert (tmp_path / "run" / "curves.png").stat().st_size > 0 and (tmp_path / "run" / "best.pth").exists()


def test_a_resumed_session_continues_with_bit_identical_losses(tmp_path):
    task, cpu = RegressionTask(), torch.device("cpu")
    straight = trainer.prepare(line_config(tmp_path / "a"), task, Dist(), cpu)
    inputs = task.train_batches(straight)
    losses = [trainer.train_step(straight, next(inputs))["loss"] for _ in range(7)]

    first = trainer.prepare(line_config(tmp_path / "b"), task, Dist(), cpu)
    inputs = task.train_batches(first)
    for _ in range(4):
        trainer.train_step(first, next(inputs))
    trainer.checkpoint(first, ["last.pth"])
    torch.manual_seed(123)  # the resumed process starts with other random streams
    resumed = trainer.prepare(line_config(tmp_path / "b", resume=tmp_path / "b" / "last.pth"), task, Dist(), cpu)
    assert resumed.step == 4
    inputs = task.train_batches(resumed)
    assert [trainer.train_step(resumed, next(inputs))["loss"] for _ in range(3)] == losses[4:]  # dropout included


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    import random

    import numpy as np

    state = trainer.rng_state()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.save(state, tmp_path / "rng.pt")
    trainer.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert torch.equal(torch.rand(3), expected[0]) and (np.random.rand(3) == expected[1]).all()
    assert random.random() == expected[2]


def test_checkpoints_are_due_on_their_cadence_and_at_the_end():
    assert [s for s in range(1, 13) if trainer.is_due(s, 5, 12)] == [5, 10, 12]
    assert [s for s in range(1, 13) if trainer.is_due(s, None, 12)] == [12]


def test_truncated_metrics_keep_rows_up_to_the_resumed_step(tmp_path):
    path, fields = tmp_path / "metrics.csv", metric_fields(("val_loss",))
    path.write_text("step,epoch,lr,train_loss,val_loss,time_s\n5,0,1,1,1,1\n10,0,1,1,1,1\n15,0,1,1,1,1\n")
    truncate_metrics(path, 10, fields)
    assert [r.split(",")[0] for r in path.read_text().splitlines()] == ["step", "5", "10"]


# --------------------------------------------------------------------------------------------------
# The segmentation task: determinism, resume after SIGKILL, DDP
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_same_seed_gives_identical_steps(chips, tmp_path):
    losses = []
    for k in range(2):
        s = train.prepare(compose_config("train", [*TINY, f"data_dir={chips}", "max_steps=2", "augment=seed",
                                                   f"output_dir={tmp_path / str(k)}"]))
        it = s.task.train_batches(s)
        losses.append([trainer.train_step(s, next(it))["loss"] for _ in range(2)])
    assert losses[0] == losses[1]


@pytest.mark.slow
def test_run_killed_with_sigkill_resumes_exactly(chips, tmp_path):
    common = [*TINY, f"data_dir={chips}", "max_steps=10", "val_every=5", "save_every=3", "log_every=1",
              "augment=seed", "use_over9000_optimizer=true"]
    train.run(compose_config("train", [*common, f"output_dir={tmp_path / 'straight'}"]))
    straight = tb_losses(tmp_path / "straight")
    assert sorted(straight) == list(range(1, 11))

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "train.py", *common, f"output_dir={killed}"], cwd=REPO_DIR,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (killed / "last.pth").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    step = load_checkpoint(killed / "last.pth")["step"]
    assert step in (3, 5, 6, 9)

    result = train.run(compose_config("train", ["threads=1", "progress=false", f"resume={killed / 'last.pth'}"]))
    assert result["step"] == 10
    resumed = tb_losses(killed)
    for k in range(step + 1, 11):
        assert resumed[k] == straight[k], f"step {k}"  # bit-identical continuation
    rows = (killed / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["5", "10"]


@pytest.mark.slow
def test_two_process_gloo_training_matches_one_process_with_the_same_global_batch(chips, tmp_path):
    common = [*TINY, f"data_dir={chips}", "max_steps=3", "val_every=3", "log_every=1", "freeze_bn=true",
              "dropout=false"]
    train.run(compose_config("train", [*common, "batch_size=4", f"output_dir={tmp_path / 'one'}"]))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "train.py", *common, "batch_size=2", f"output_dir={tmp_path / 'two'}"],
                          cwd=REPO_DIR, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = tb_losses(tmp_path / "one"), tb_losses(tmp_path / "two")
    assert sorted(two) == [1, 2, 3]
    for k in (1, 2, 3):
        assert two[k] == pytest.approx(one[k], rel=1e-5), f"step {k}"  # float32 rounding only
    assert len(list((tmp_path / "two").glob("events.out.tfevents.*"))) == 1  # only rank 0 writes
    v1 = (tmp_path / "one" / "metrics.csv").read_text().splitlines()[1].split(",")
    v2 = (tmp_path / "two" / "metrics.csv").read_text().splitlines()[1].split(",")
    assert float(v2[5]) == pytest.approx(float(v1[5]), abs=1e-4)  # validation Jaccard over the shards




def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(chips, tmp_path):
    out = tmp_path / "run"
    s = train.prepare(compose_config("train", [*TINY, f"data_dir={chips}", "max_steps=4", "save_every=1",
                                               f"output_dir={out}"]))
    it = s.task.train_batches(s)
    trainer.train_step(s, next(it))
    trainer.checkpoint(s, ["last.pth"])
    with torch.no_grad():
        next(s.net.parameters()).fill_(float("nan"))
    with pytest.raises(UserError, match="last good checkpoint"):
        trainer.train_step(s, next(it))
    good = load_model(out / "last.pth")
    assert all(torch.isfinite(p).all() for p in good.parameters())




def test_best_checkpoint_is_lean_and_cannot_be_resumed(tmp_path):
    """best.pth: weights, config, meta and scores for inference; last.pth: everything resume needs."""
    s = trainer.prepare(line_config(tmp_path / "run", max_steps=4), RegressionTask(), Dist(), torch.device("cpu"))
    trainer.fit(s)
    best, last = (load_checkpoint(tmp_path / "run" / n) for n in ("best.pth", "last.pth"))
    assert {"optimizer", "scheduler", "rng"} <= set(last) and "history" in last["metrics"]
    assert not {"optimizer", "scheduler", "scaler", "rng"} & set(best)
    assert best["meta"]["task"] == "line" and best["train_config"]["max_steps"] == 4 and best["step"] == 4
    assert best["metrics"]["best_score"] == s.best and "history" not in best["metrics"]
    cfg = compose_config("train", ["arch=b0", "pretrained=false", f"resume={tmp_path / 'run' / 'best.pth'}"])
    with pytest.raises(UserError, match="not a training checkpoint") as err:
        train.resolve_config(cfg, Dist())
    assert "resume from last.pth" in str(err.value) and "\n" not in str(err.value)


def test_progress_bar_is_not_redrawn_every_step_when_stderr_is_a_log(tmp_path, capsys):
    """stderr not a terminal (captured here): the bar is drawn at the start, the end and around the
    validation lines only -- not once per step, as a postfix update with refresh would."""
    s = trainer.prepare(line_config(tmp_path / "run", max_steps=24, val_every=12, progress=True), RegressionTask(),
                        Dist(), torch.device("cpu"))
    trainer.fit(s)
    captured = capsys.readouterr()
    assert "step 12:" in captured.out and "step 24:" in captured.out
    assert 2 <= captured.err.count("train:") <= 6  # 24 steps, 2 validations: a handful of draws

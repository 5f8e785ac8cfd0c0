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
# precision=fp32: runs compared with each other must not each take precision=auto's timing-based choice
TINY = ["arch=b0", "pretrained=false", "width=64", "batch_size=2", "num_workers=0", "threads=1", "progress=false",
        "augment=light", "precision=fp32"]


def load_model_free_b0() -> torch.nn.Module:
    """A b0 network with random weights, in evaluation mode."""
    import model as M

    return M.build_model("efficientnet-b0", pretrained=False).eval()


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


# --------------------------------------------------------------------------------------------------
# Validation cadence (lib.val_cadence)
# --------------------------------------------------------------------------------------------------


def test_auto_cadence_keeps_validation_within_five_percent_of_training():
    from lib.val_cadence import steps_between, val_share

    assert steps_between(4.1, 2.0) == 39  # 19 x 4.1 / 2.0 = 38.95
    assert steps_between(2.0, 2.0) == 19 and steps_between(0.01, 10.0) == 1 and steps_between(30.0, 1.0) == 570
    for val_s, step_s in ((4.1, 2.0), (1.6, 1.05), (0.3, 2.9), (12.0, 0.4)):
        n = steps_between(val_s, step_s)
        assert val_share(n, val_s, step_s) <= 0.05 + 1e-12
        assert n == 1 or val_share(n - 1, val_s, step_s) > 0.05  # the fewest steps that keep the budget


def test_val_every_accepts_auto_steps_seconds_and_null():
    from lib.val_cadence import parse_val_every

    assert parse_val_every("auto") == ("auto", None) and parse_val_every(None) == parse_val_every(0) == ("epoch", None)
    assert parse_val_every(10) == ("steps", 10) and parse_val_every("10") == ("steps", 10)
    assert parse_val_every("10s") == ("seconds", 10.0) and parse_val_every("2.5s") == ("seconds", 2.5)
    for bad in ("0s", "-3s", "10m", "every", 1.5, -2):
        with pytest.raises(UserError, match=f"val_every={bad}: use auto") as err:
            parse_val_every(bad)
        assert "\n" not in str(err.value)


def test_cadence_plans_first_at_epoch_end_or_step_50_then_from_the_timings():
    from lib.val_cadence import Cadence

    assert Cadence.from_config("auto", 200, 1000).next_step == 50
    c = Cadence.from_config("auto", 6, 400)
    assert [k for k in range(1, 7) if c.due(k)] == [6]
    assert c.plan(6, step_s=2.0, val_s=4.1) and (c.every, c.next_step) == (39, 45)
    assert not c.due(44) and c.due(45) and c.due(400)
    assert not c.plan(45, 2.0, 3.5) and c.every == 39  # 34 steps would do: not much shorter, the plan stays
    assert c.plan(84, 2.0, 1.0) and (c.every, c.next_step) == (10, 94)  # much cheaper validation: re-planned
    assert c.plan(94, 2.0, 5.0) and c.every == 48  # over budget: always re-planned
    s = Cadence.from_config("10s", 6, 400)
    assert not s.due(4) and not s.probe_due(4) and s.probe_due(5)
    s.plan(5, step_s=2.0, val_s=None)
    assert (s.every, s.next_step) == (5, 6)
    s.plan(6, step_s=2.0, val_s=3.0)
    assert (s.every, s.next_step) == (5, 11)
    fixed = Cadence.from_config(None, 6, 20)
    assert [k for k in range(1, 21) if fixed.due(k)] == [6, 12, 18, 20]  # null: every epoch, and the last step


def test_final_step_always_validates(tmp_path):
    s = trainer.prepare(line_config(tmp_path / "run", max_steps=10, val_every=4), RegressionTask(), Dist(),
                        torch.device("cpu"))
    trainer.fit(s, write=False)
    assert [h["step"] for h in s.history] == [4, 8, 10]


class TickingClock:
    """lib.trainer's clock, made predictable: every perf_counter() call advances one second."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        self.now += 1.0
        return self.now

    def time(self):
        return 0.0


def test_auto_cadence_validates_at_epoch_end_then_on_its_plan_and_resumes_it(tmp_path, capsys, monkeypatch):
    """per_epoch = 40 / 4 = 10: the first validation at step 10; with 1 s steps and a 1 s validation, 19 steps
    later; then the validation's checkpoint write (1 s) counts too: 2 s -> 38 steps, past the end (30), which
    validates anyway. Each plan is printed; last.pth stores it and a resumed run continues it."""
    monkeypatch.setattr(trainer, "time", TickingClock())
    out = tmp_path / "run"
    s = trainer.prepare(line_config(out, max_steps=30, val_every="auto", save_every=100, precision="fp32"),
                        RegressionTask(), Dist(), torch.device("cpu"))
    trainer.fit(s)
    assert [h["step"] for h in s.history] == [10, 29, 30]
    printed = capsys.readouterr().out
    assert "validation every 19 steps (val 1.0 s, step 1.00 s: 5 % of training)" in printed
    assert "validation every 38 steps (val 2.0 s, step 1.00 s: 5 % of training)" in printed
    saved = load_checkpoint(out / "last.pth")["val_cadence"]
    assert saved == {"every": 38, "next_step": 67}
    resumed = trainer.prepare(line_config(out, max_steps=30, val_every="auto", resume=out / "last.pth"),
                              RegressionTask(), Dist(), torch.device("cpu"))
    assert resumed.cadence.state() == saved


# --------------------------------------------------------------------------------------------------
# precision=auto for training (lib.amp_trial)
# --------------------------------------------------------------------------------------------------


def test_depthwise_convolutions_leave_cpu_autocast_and_nothing_else_changes():
    """depthwise_in_fp32: under bf16 autocast the depthwise convs compute in fp32 (dense ones stay bf16);
    outside it every output is bit-identical, the state-dict keys are unchanged, and a second call or a
    deep copy keeps it so."""
    import copy

    torch.manual_seed(0)
    net = load_model_free_b0()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = net(x)
    keys = list(net.state_dict())
    depthwise = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d) and 1 < m.groups == m.in_channels]
    assert trainer.depthwise_in_fp32(net) == len(depthwise) == 16  # b0's 16 MBConv blocks
    assert trainer.depthwise_in_fp32(net) == 16 and list(net.state_dict()) == keys
    with torch.no_grad():
        after = net(x)
    assert all(torch.equal(before[k], after[k]) for k in before)
    twin = copy.deepcopy(net)
    seen = {}

    def record(module, inputs, output):
        seen.setdefault(module, output.dtype)

    for m in [*net.modules(), *twin.modules()]:
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(record)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        net(x)
        twin(x)
    depthwise += [m for m in twin.modules() if isinstance(m, torch.nn.Conv2d) and 1 < m.groups == m.in_channels]
    assert len(seen) > len(depthwise) == 32
    assert {seen[m] for m in depthwise} == {torch.float32}
    assert {d for m, d in seen.items() if m not in depthwise} == {torch.bfloat16}


def test_channels_last_auto_is_on_for_cpu_and_cuda_and_false_keeps_nchw():
    cfg = compose_config("train", TINY)
    assert trainer.uses_channels_last(cfg, torch.device("cpu")) and trainer.uses_channels_last(cfg, torch.device("cuda"))
    assert not trainer.uses_channels_last(compose_config("train", [*TINY, "channels_last=false"]), torch.device("cpu"))


def test_precision_rule_picks_bf16_only_when_it_agrees_and_is_faster():
    from lib.amp_trial import decide

    fast = {"fp32": 2.0, "bf16": 1.0}
    assert decide(fast, {"fp32": 1.0, "bf16": 1.01})["chosen"] == "bf16"
    assert decide(fast, {"fp32": 1.0, "bf16": 1.05})["chosen"] == "fp32"  # 5 % apart: disagrees
    assert decide(fast, {"fp32": 1.0, "bf16": float("nan")})["chosen"] == "fp32"
    slow = decide({"fp32": 1.05, "bf16": 1.0}, {"fp32": 1.0, "bf16": 1.0})
    assert slow["chosen"] == "fp32" and slow["speedup"] == 1.05 and slow["agrees"]


def _trial_session(tmp_path, chips, name, precision="auto"):
    return train.prepare(compose_config("train", [*TINY, f"data_dir={chips}", "max_steps=4", f"precision={precision}",
                                                  "augment=seed", f"output_dir={tmp_path / name}"]))


def test_auto_precision_trial_choosing_fp32_equals_precision_fp32_bit_for_bit(chips, tmp_path, monkeypatch):
    from lib import amp_trial

    monkeypatch.setattr(amp_trial, "cpu_has_native_bf16", lambda: True)  # a trial on any CPU
    monkeypatch.setattr(amp_trial, "MIN_SPEEDUP", 1e9)  # ... that bf16 cannot win
    runs = {}
    for precision in ("fp32", "auto"):
        s = _trial_session(tmp_path, chips, precision, precision)
        assert s.trial_due == (precision == "auto")
        inputs = s.task.train_batches(s)
        if s.trial_due:
            inputs = trainer._first_batch_trial(s, inputs)
            assert s.precision_trial["chosen"] == "fp32" and s.precision_trial["loss_rel_diff"] < 0.02
        losses = [trainer.train_step(s, next(inputs))["loss"] for _ in range(3)]
        runs[precision] = (losses, {k: v.clone() for k, v in s.net.state_dict().items()}, torch.rand(3))
    assert runs["auto"][0] == runs["fp32"][0]  # losses
    assert all(torch.equal(runs["auto"][1][k], v) for k, v in runs["fp32"][1].items())  # weights, BN buffers
    assert torch.equal(runs["auto"][2], runs["fp32"][2])  # the RNG stream


def test_auto_precision_records_bf16_and_a_resumed_run_keeps_it_without_a_trial(chips, tmp_path, monkeypatch):
    from lib import amp_trial

    monkeypatch.setattr(amp_trial, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(amp_trial, "MIN_SPEEDUP", 0.0)  # bf16 wins whenever it agrees
    s = _trial_session(tmp_path, chips, "run")
    inputs = trainer._first_batch_trial(s, s.task.train_batches(s))
    assert s.autocast_dtype == torch.bfloat16 and s.precision_trial["chosen"] == "bf16"
    trainer.train_step(s, next(inputs))
    trainer.checkpoint(s, ["last.pth", "best.pth"])
    for name in ("last.pth", "best.pth"):
        assert load_checkpoint(tmp_path / "run" / name)["meta"]["precision_trial"] == s.precision_trial
    resumed = train.prepare(compose_config("train", ["threads=1", "progress=false",
                                                     f"resume={tmp_path / 'run' / 'last.pth'}"]))
    assert resumed.autocast_dtype == torch.bfloat16 and not resumed.trial_due
    assert _trial_session(tmp_path, chips, "explicit", "fp32").trial_due is False  # explicit: no trial

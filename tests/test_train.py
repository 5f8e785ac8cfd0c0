"""train.py: the original command lines, learning on real chips, exact resume after SIGKILL, DDP, bad inputs.

Runs are tiny (b0, pretrained=false, 64-128 px crops, a few steps, one thread) so the file stays within a few
minutes on two cores. Real chips come from ../shared/data/kampala through dataset.py; synthetic chips
(rectangles on texture, two scenes) are made in the test where only the mechanics matter.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import train
from lib.cli import REPO_DIR, compose_config
from lib.errors import UserError
from model import load_checkpoint, load_model

torch.set_num_threads(1)
TINY = ["arch=b0", "pretrained=false", "width=64", "batch_size=2", "num_workers=0", "threads=1", "progress=false",
        "augment=light"]


def make_chips(root: Path, scenes=("a/s1", "a/s2"), per_scene=6, size=128, seed=0) -> Path:
    """Chips like dataset.py writes them: textured ground with bright rectangular roofs, 0/255 masks."""
    rng = np.random.default_rng(seed)
    for scene in scenes:
        folder = root / scene
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_scene):
            img = rng.integers(60, 110, (size, size, 3), dtype=np.uint8)
            mask = np.zeros((size, size), np.uint8)
            for _ in range(rng.integers(1, 4)):
                y, x = rng.integers(0, size - 40, 2)
                h, w = rng.integers(16, 40, 2)
                img[y:y + h, x:x + w] = rng.integers(170, 250, 3)
                mask[y:y + h, x:x + w] = 255
            cv2.imwrite(str(folder / f"1_{i}.png"), img)
            cv2.imwrite(str(folder / f"1_{i}_mask.png"), mask)
    (root / "resolutions.json").write_text(json.dumps({s: 0.1 for s in scenes}))
    return root


@pytest.fixture(scope="module")
def kampala_chips(shared, tmp_path_factory):
    """Building chips of the real Kampala scene, prepared by dataset.py (once per test module)."""
    import dataset

    out = tmp_path_factory.mktemp("kampala_chips")
    dataset.run(compose_config("dataset", [f"base_dir={shared / 'data' / 'kampala'}", f"out_dir={out}",
                                           "progress=false", "num_workers=1"]))
    assert len(dataset.list_chips(out)) >= 100
    return out


@pytest.fixture()
def chips(tmp_path):
    return make_chips(tmp_path / "chips")


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
# Configuration
# --------------------------------------------------------------------------------------------------


def test_flat_seed_overrides_win_over_the_arch_preset():
    cfg = compose_config("train", ["model_name=efficientnet-b2", "use_mish=True", "use_context_block=True"])
    assert (cfg.model_name, cfg.use_mish, cfg.use_context_block) == ("efficientnet-b2", True, True)
    cfg = compose_config("train", ["arch=b2_context_mish", "use_mish=false"])
    assert (cfg.model_name, cfg.use_mish, cfg.use_context_block) == ("efficientnet-b2", False, True)
    cfg = compose_config("train", ["model=models/m40000.pth"])
    assert cfg.model == "models/m40000.pth" and cfg.model_name == "efficientnet-b1"  # `model` stays the weights path


def test_every_original_config_key_is_present():
    cfg = compose_config("train")
    for key in ("data_dir", "batch_size", "max_lr", "weight_decay", "fold", "num_folds", "model_name", "use_mish",
                "use_context_block", "use_attention", "use_ASPP", "drop_connect_rate", "model", "load_state",
                "num_epochs", "width", "num_workers", "do_ohem", "ref_scale", "use_over9000_optimizer",
                "soft_labels_dir", "debug"):
        assert key in cfg, key


# --------------------------------------------------------------------------------------------------
# Data order and augmentation
# --------------------------------------------------------------------------------------------------


def test_epoch_order_is_a_function_of_seed_and_epoch_and_resumes_in_place():
    d = train.Dist()
    sampler = train.EpochBatches(10, 3, seed=5, d=d)
    it = iter(sampler)
    batches = [next(it) for _ in range(7)]  # 3 batches per epoch: epochs 0, 1 and the first of 2
    assert [b[0][0] for b in batches] == [0, 0, 0, 1, 1, 1, 2]
    assert sorted(i for b in batches[:3] for _, i in b) == sorted(sampler.indices(0)[:9])
    assert sampler.indices(0) != sampler.indices(1)
    resumed = iter(train.EpochBatches(10, 3, seed=5, d=d, start=4))
    assert [next(resumed) for _ in range(3)] == batches[4:7]


def test_two_processes_see_the_same_global_batches_as_one():
    one = iter(train.EpochBatches(12, 4, seed=1, d=train.Dist()))
    ranks = [iter(train.EpochBatches(12, 2, seed=1, d=train.Dist(r, 2))) for r in (0, 1)]
    for _ in range(6):
        single = sorted(next(one))
        split = sorted(next(ranks[0]) + next(ranks[1]))
        assert single == split


def test_balanced_sampling_draws_empty_sparse_and_dense_chips_equally():
    fractions = np.array([0.0] * 2 + [0.01, 0.02, 0.03, 0.04] + [0.5] * 14)
    weights = train.balanced_weights(fractions)
    bins = np.where(fractions == 0, 0, np.where(fractions < np.median(fractions[fractions > 0]), 1, 2))
    assert [weights[bins == b].sum() for b in range(3)] == pytest.approx([1 / 3] * 3)
    sampler = train.EpochBatches(len(fractions), 10, seed=0, d=train.Dist(), weights=weights)
    drawn = [i for e in range(150) for i in sampler.indices(e)]
    share = np.bincount(bins[drawn], minlength=3) / len(drawn)
    assert share == pytest.approx([1 / 3] * 3, abs=0.03)


def test_reseeded_augmentations_are_reproducible_and_independent():
    import dataset

    tf = dataset.train_transform(64, level="light")
    img = np.arange(96 * 96 * 3, dtype=np.uint8).reshape(96, 96, 3)
    mask = np.zeros((96, 96), np.uint8)

    def apply(words):
        train.seed_transform(tf, words)
        return tf(image=img, mask=mask, valid=mask)["image"]

    assert np.array_equal(apply([0, 0, 3, 7]), apply([0, 0, 3, 7]))
    outcomes = set()
    for k in range(40):  # horizontal and vertical flips must not always fire together
        train.seed_transform(tf, [k])
        flips = [t for t in tf.transforms if type(t).__name__ in ("HorizontalFlip", "VerticalFlip")]
        outcomes.add(tuple(t.py_random.random() < 0.5 for t in flips))
    assert len(outcomes) == 4


# --------------------------------------------------------------------------------------------------
# The original command lines and learning on real data
# --------------------------------------------------------------------------------------------------


def soft_labels(kampala_chips: Path, out: Path, n: int = 5) -> Path:
    """Soft labels in combine_images' format: images with <stem>_mask.png holding 0-255 probabilities."""
    out.mkdir()
    for img in sorted(kampala_chips.rglob("1_*.jpg"))[:n]:
        mask = cv2.imread(str(img.with_name(img.stem + "_mask.png")), cv2.IMREAD_GRAYSCALE)
        cv2.imwrite(str(out / img.name), cv2.imread(str(img)))
        cv2.imwrite(str(out / f"{img.stem}_mask.png"), cv2.GaussianBlur(mask, (31, 31), 0))
    return out


SEED_COMMANDS = {
    "b1": ["model_name=efficientnet-b1"],
    "b2": ["model_name=efficientnet-b2", "use_mish=True", "use_context_block=True"],
    "b2_soft": ["model_name=efficientnet-b2", "use_mish=True", "use_context_block=True", "drop_connect_rate=0.5",
                "soft_labels_dir={soft}", "soft_every=1"],
}


@pytest.mark.parametrize("name", SEED_COMMANDS)
def test_original_command_lines_train_and_last_checkpoint_rebuilds_alone(name, kampala_chips, tmp_path):
    soft = soft_labels(kampala_chips, tmp_path / "soft") if name == "b2_soft" else ""
    args = ["batch_size=5", f"data_dir={kampala_chips}", "max_lr=0.0002", "weight_decay=6.3e-7", "fold=0",
            *[a.format(soft=soft) for a in SEED_COMMANDS[name]],
            "max_steps=1", "width=256", "pretrained=false", "num_workers=0", "threads=1", "progress=false",
            "val_batch_size=8", f"output_dir={tmp_path / 'run'}"]
    result = train.run(compose_config("train", args))
    run_dir = tmp_path / "run"
    for f in ("last.pth", "best.pth", "config.yaml", "metrics.csv", "curves.png"):
        assert (run_dir / f).stat().st_size > 0, f
    assert list(run_dir.glob("events.out.tfevents.*"))
    model = load_model(run_dir / "last.pth")
    assert model.config["model_name"] == SEED_COMMANDS[name][0].split("=")[1]
    assert model.config["use_mish"] == (name != "b1") and model.config["use_context_block"] == (name != "b1")
    assert model.config["drop_connect_rate"] == (0.5 if name == "b2_soft" else 0.2)
    assert model.meta["step"] == 1 and 0.0 <= result["last"]["val_jaccard"] <= 1.0
    assert model.meta["train_gsd"] == pytest.approx(0.074644, rel=1e-3)
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 64, 64))
    assert out["seg"].shape == (1, 2, 16, 16)


def test_short_cpu_training_on_kampala_lowers_val_loss_and_raises_jaccard(kampala_chips, tmp_path):
    """The default from-scratch recipe (auto max_lr, one-cycle, BatchNorm momentum 0.1) on 60 small steps."""
    cfg = compose_config("train", [f"data_dir={kampala_chips}", "arch=b0", "pretrained=false", "ref_scale=0.3",
                                   "width=128", "batch_size=4", "max_steps=60", "augment=light", "num_workers=0",
                                   "threads=1", "progress=false", "val_batch_size=16", f"output_dir={tmp_path / 'run'}"])
    s = train.prepare(cfg)
    before = train.validate(s)
    result = train.fit(s)
    after = result["last"]
    assert after["val_loss"] < before["val_loss"] - 0.05
    assert after["val_jaccard"] > before["val_jaccard"] + 0.05
    assert load_model(tmp_path / "run" / "best.pth").meta["ref_scale"] == 0.3


# --------------------------------------------------------------------------------------------------
# Exactness: determinism, resume after SIGKILL, DDP
# --------------------------------------------------------------------------------------------------


def test_same_seed_gives_identical_steps(chips, tmp_path):
    losses = []
    for k in range(2):
        s = train.prepare(compose_config("train", [*TINY, f"data_dir={chips}", "max_steps=2", "augment=seed",
                                                   f"output_dir={tmp_path / str(k)}"]))
        it = train.batches(s, "train")
        losses.append([train.train_step(s, next(it))["loss"] for _ in range(2)])
    assert losses[0] == losses[1]


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


# --------------------------------------------------------------------------------------------------
# Options: every recipe switch runs; weights initialisation
# --------------------------------------------------------------------------------------------------


def test_noisy_label_options_and_hard_soft_labels_train(chips, tmp_path):
    soft = make_chips(tmp_path / "soft", scenes=("u",), per_scene=4, seed=3)
    result = train.run(compose_config("train", [
        *TINY, f"data_dir={chips}", "max_steps=2", "label_smoothing=0.05", "entropy_weight=0.1",
        "balanced_sampling=true", "do_ohem=true", "use_over9000_optimizer=true", f"soft_labels_dir={soft}",
        "soft_every=1", "soft_to_hard=true", "soft_band=[0.3,0.7]", "log_every=1", f"output_dir={tmp_path / 'run'}"]))
    assert result["step"] == 2 and np.isfinite(result["last"]["val_loss"])
    ckpt = load_checkpoint(tmp_path / "run" / "last.pth")
    assert ckpt["train_config"]["soft_to_hard"] is True


def test_model_init_and_load_state_take_weights_and_moments(chips, tmp_path):
    first = tmp_path / "first"
    train.run(compose_config("train", [*TINY, f"data_dir={chips}", "max_steps=2", f"output_dir={first}"]))
    s = train.prepare(compose_config("train", [*TINY, f"data_dir={chips}", "max_steps=2", f"model={first / 'last.pth'}",
                                               "load_state=1", f"output_dir={tmp_path / 'second'}"]))
    saved = load_checkpoint(first / "last.pth")
    for k, v in s.net.state_dict().items():
        assert torch.equal(v, saved["state_dict"][k]), k
    ours, theirs = s.optimizer.state_dict()["state"], saved["optimizer"]["state"]
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k]["exp_avg"], theirs[k]["exp_avg"]) for k in ours)
    assert s.step == 0 and s.cfg.max_lr == train.DEFAULT_LR_PRETRAINED  # a new schedule from the weights
    with pytest.raises(UserError, match="model_name=efficientnet-b0"):
        train.prepare(compose_config("train", [*TINY, "arch=b1", f"data_dir={chips}", "max_steps=1",
                                               f"model={first / 'last.pth'}", f"output_dir={tmp_path / 'x'}"]))


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, match", [
    ("width=100", "multiple of 32"),
    ("data_dir={missing}", "does not exist"),
    ("data_dir={empty}", "no training chips"),
    ("fold=5", "no validation chips"),
    ("batch_size=50", "lower batch_size"),
    ("precision=fp8", "precision"),
])
def test_bad_inputs_are_one_line_user_errors(override, match, chips, tmp_path):
    (tmp_path / "empty").mkdir()
    override = override.format(missing=tmp_path / "missing", empty=tmp_path / "empty")
    with pytest.raises(UserError, match=match):
        train.prepare(compose_config("train", [*TINY, f"data_dir={chips}", "max_steps=1", "num_folds=7", override,
                                               f"output_dir={tmp_path / 'run'}"]))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(chips, tmp_path):
    out = tmp_path / "run"
    s = train.prepare(compose_config("train", [*TINY, f"data_dir={chips}", "max_steps=4", "save_every=1",
                                               f"output_dir={out}"]))
    it = train.batches(s, "train")
    train.train_step(s, next(it))
    train.checkpoint(s, ["last.pth"])
    with torch.no_grad():
        next(s.net.parameters()).fill_(float("nan"))
    with pytest.raises(UserError, match="last good checkpoint"):
        train.train_step(s, next(it))
    good = load_model(out / "last.pth")
    assert all(torch.isfinite(p).all() for p in good.parameters())


def test_cli_prints_one_line_error_and_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, "train.py", f"data_dir={tmp_path / 'nope'}", "pretrained=false"],
                          cwd=REPO_DIR, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "nope" in proc.stderr


def test_model_init_from_an_original_pipeline_checkpoint(shared, chips, tmp_path):
    """The seed's checkpoint layout ({"state_dict": ...} with its parameter names) initialises training."""
    ref = torch.load(shared / "reference" / "seed_b1.pt", weights_only=True)
    path = tmp_path / "m40000.pth"
    torch.save({"state_dict": {k: v.float() for k, v in ref["state_dict"].items()}}, path)
    net = train.create_model(compose_config("train", ["pretrained=false", f"model={path}"]))
    expected = load_model(path)
    assert net.config == expected.config
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), expected.state_dict().values()))
    with pytest.raises(UserError, match="no optimizer state"):
        train.prepare(compose_config("train", [*TINY, "arch=b1", f"data_dir={chips}", "max_steps=1", f"model={path}",
                                               "load_state=1", f"output_dir={tmp_path / 'run'}"]))

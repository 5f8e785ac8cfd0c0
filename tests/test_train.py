"""train.py: config resolution and run folders, the original command lines, learning on real chips, bad inputs.

Runs are tiny (b0, pretrained=false, 64-128 px crops, a few steps, one thread) so the file stays within a few
minutes on two cores. Real chips come from ../shared/data/kampala through dataset.py; synthetic chips
(conftest's `chips`) where only the mechanics matter. Exact resume and DDP parity: test_trainer.py.
"""

import csv
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch

import train
from lib import trainer
from lib.checkpoints import load_checkpoint
from lib.cli import REPO_DIR, compose_config
from lib.distributed import Dist
from lib.errors import UserError
from model import load_model

torch.set_num_threads(1)
TINY = ["arch=b0", "pretrained=false", "width=64", "batch_size=2", "num_workers=0", "threads=1", "progress=false",
        "augment=light"]


@pytest.fixture(scope="module")
def kampala_chips(shared, tmp_path_factory):
    """Building chips of the real Kampala scene, prepared by dataset.py (once per test module)."""
    import dataset

    out = tmp_path_factory.mktemp("kampala_chips")
    dataset.run(compose_config("dataset", [f"base_dir={shared / 'data' / 'kampala'}", f"out_dir={out}",
                                           "progress=false", "num_workers=1"]))
    assert len(dataset.list_chips(out)) >= 100
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


def test_run_folders_are_named_by_the_arch_preset_unless_arch_keys_were_overridden():
    assert train.run_name(compose_config("train")) == "b1"
    assert train.run_name(compose_config("train", ["arch=b2_context_mish"])) == "b2_context_mish"
    seed_b2 = compose_config("train", ["model_name=efficientnet-b2", "use_mish=True", "use_context_block=True"])
    assert train.run_name(seed_b2) == "b2_context_mish"  # the slug of the keys, not the untouched preset "b1"
    assert train.run_name(compose_config("train", ["arch=b0", "use_mish=true"])) == "b0_mish"
    cfg = train.resolve_config(compose_config("train", ["arch=b2", "data_dir=x", "pretrained=false"]), Dist())
    assert Path(cfg.output_dir).parent == Path("outputs/train") and cfg.output_dir.endswith("_b2")
    assert cfg.max_lr == train.DEFAULT_LR_SCRATCH


def test_pretrained_unset_means_imagenet_for_real_data_and_scratch_on_the_demo(monkeypatch, tmp_path):
    """The README's bare `python train.py` must run offline: the demo chips train from scratch."""
    assert compose_config("train").pretrained is None
    real = train.resolve_config(compose_config("train", ["data_dir=x"]), Dist())
    assert real.pretrained is True and real.max_lr == train.DEFAULT_LR_PRETRAINED
    monkeypatch.setattr(train.dataset, "demo_chips_dir", lambda: tmp_path)
    demo = train.resolve_config(compose_config("train"), Dist())
    assert demo.pretrained is False and demo.data_dir == str(tmp_path) and demo.max_lr == train.DEFAULT_LR_SCRATCH
    explicit = train.resolve_config(compose_config("train", ["pretrained=true"]), Dist())
    assert explicit.pretrained is True  # an explicit choice is kept (and fails offline with its one-line error)


def test_default_config_is_the_composed_train_config():
    defaults = train.default_config()
    assert defaults["model_name"] == "efficientnet-b1" and defaults["arch_name"] == "b1"
    assert "defaults" not in defaults and "hydra" not in defaults
    assert defaults["precision"] == "auto"  # from a shared group, not train.yaml itself


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


@pytest.mark.slow
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


@pytest.mark.slow
def test_short_cpu_training_on_kampala_lowers_val_loss_and_raises_jaccard(kampala_chips, tmp_path):
    """The default from-scratch recipe (auto max_lr, one-cycle, BatchNorm momentum 0.1) on 60 small steps,
    without the instance head: its border/contact terms are part of val_loss and need longer runs to fall."""
    cfg = compose_config("train", [f"data_dir={kampala_chips}", "arch=b0", "pretrained=false", "ref_scale=0.3",
                                   "instance_head=false",
                                   "width=128", "batch_size=4", "max_steps=60", "augment=light", "num_workers=0",
                                   "threads=1", "progress=false", "val_batch_size=16", f"output_dir={tmp_path / 'run'}"])
    s = train.prepare(cfg)
    before = trainer.validate(s)
    result = trainer.fit(s)
    after = result["last"]
    assert after["val_loss"] < before["val_loss"] - 0.05
    assert after["val_jaccard"] > before["val_jaccard"] + 0.05
    assert load_model(tmp_path / "run" / "best.pth").meta["ref_scale"] == 0.3


# --------------------------------------------------------------------------------------------------
# Options: every recipe switch runs; weights initialisation
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_noisy_label_options_and_hard_soft_labels_train(chips, make_chips, tmp_path):
    soft = make_chips(tmp_path / "soft", scenes=("u",), per_scene=4, seed=3)
    result = train.run(compose_config("train", [
        *TINY, f"data_dir={chips}", "max_steps=2", "label_smoothing=0.05", "entropy_weight=0.1",
        "balanced_sampling=true", "do_ohem=true", "use_over9000_optimizer=true", f"soft_labels_dir={soft}",
        "soft_every=1", "soft_to_hard=true", "soft_band=[0.3,0.7]", "log_every=1", f"output_dir={tmp_path / 'run'}"]))
    assert result["step"] == 2 and np.isfinite(result["last"]["val_loss"])
    ckpt = load_checkpoint(tmp_path / "run" / "last.pth")
    assert ckpt["train_config"]["soft_to_hard"] is True


@pytest.mark.slow
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
    ("select_by=aggregate", "segmentation chooses best.pth by polygon_f1 or jaccard"),
    ("instance_loss=l2", "instance_loss=l2: use bce_dice or focal_dice"),
    ("val_every=10m", "val_every=10m: use auto, a number of steps"),
    ("num_workers=many", "num_workers must be auto or a number of processes >= 0, not many"),
])
def test_bad_inputs_are_one_line_user_errors(override, match, chips, tmp_path):
    (tmp_path / "empty").mkdir()
    override = override.format(missing=tmp_path / "missing", empty=tmp_path / "empty")
    with pytest.raises(UserError, match=match):
        train.prepare(compose_config("train", [*TINY, f"data_dir={chips}", "max_steps=1", "num_folds=7", override,
                                               f"output_dir={tmp_path / 'run'}"]))


@pytest.mark.slow
def test_cli_prints_one_line_error_and_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, "train.py", f"data_dir={tmp_path / 'nope'}", "pretrained=false"],
                          cwd=REPO_DIR, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "nope" in proc.stderr


@pytest.mark.slow
def test_model_init_from_an_original_pipeline_checkpoint(shared, chips, tmp_path, capsys):
    """The seed's checkpoint layout ({"state_dict": ...} with its parameter names) initialises training."""
    ref = torch.load(shared / "reference" / "seed_b1.pt", weights_only=True)
    path = tmp_path / "m40000.pth"
    torch.save({"state_dict": {k: v.float() for k, v in ref["state_dict"].items()}}, path)
    net = train.create_model(compose_config("train", ["pretrained=false", f"model={path}", "instance_head=false"]))
    expected = load_model(path)
    assert net.config == expected.config
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), expected.state_dict().values()))
    net = train.create_model(compose_config("train", ["pretrained=false", f"model={path}"]))  # instance_head=true
    assert net.config == {**expected.config, "instance_head": True}  # only the head is new
    assert capsys.readouterr().out.count("freshly initialised instance head") == 1
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), expected.state_dict().values()))
    with pytest.raises(UserError, match="no optimizer state"):
        train.prepare(compose_config("train", [*TINY, "arch=b1", f"data_dir={chips}", "max_steps=1", f"model={path}",
                                               "load_state=1", f"output_dir={tmp_path / 'run'}"]))


# --------------------------------------------------------------------------------------------------
# Polygon scores and select_by
# --------------------------------------------------------------------------------------------------


def two_touching_buildings():
    """A 32x32 chip: two 8x8 buildings sharing an edge (ids 1, 2), the model's probability, border map."""
    ids = np.zeros((32, 32), np.int32)
    ids[8:16, 4:12], ids[8:16, 12:20] = 1, 2
    prob = (ids > 0).astype(np.float32) * 0.9
    border = np.zeros((32, 32), np.float32)
    border[8:16, 11:13] = 1.0  # the shared edge
    return torch.from_numpy(ids), torch.from_numpy(prob), torch.from_numpy(np.stack([border, np.zeros_like(border)]))


def test_chip_polygon_counts_split_touching_buildings_with_the_instance_head():
    ids, prob, maps = two_touching_buildings()
    assert train.chip_polygon_counts(prob, maps, ids, float("nan")) == (2, 0, 0)
    # without the head: one blob (IoU 0.5 with each building, not above it): 1 false positive, 2 misses
    assert train.chip_polygon_counts(prob, None, ids, float("nan")) == (0, 1, 2)
    # min_area (4 m^2) is 44 px at 0.3 m/px: the 64-px buildings stay; 100 px at 0.2 m/px: they are left out
    assert train.chip_polygon_counts(prob, maps, ids, 0.3) == (2, 0, 0)
    assert train.chip_polygon_counts(prob, maps, ids, 0.2) == (0, 0, 0)
    assert train.polygon_scores(2, 1, 2) == pytest.approx(
        {"val_polygon_f1": 4 / 7, "val_polygon_precision": 2 / 3, "val_polygon_recall": 0.5})
    assert train.polygon_scores(0, 0, 0)["val_polygon_f1"] == 1.0 and train.polygon_scores(0, 0, 3)["val_polygon_precision"] == 0.0


def test_select_by_picks_the_metric_and_breaks_polygon_f1_ties_by_jaccard():
    task = train.SegmentationTask(compose_config("train"))
    assert (task.select_metric, task.tie_metric) == ("val_polygon_f1", "val_jaccard")
    assert trainer.best_key(task) == "best_polygon_f1"
    jac = train.SegmentationTask(compose_config("train", ["select_by=jaccard"]))
    assert (jac.select_metric, jac.tie_metric) == ("val_jaccard", None)
    s = SimpleNamespace(task=task, best=0.5, best_step=10,
                        history=[{"step": 10, "val_polygon_f1": 0.5, "val_jaccard": 0.6}])
    assert trainer.is_better(s, {"val_polygon_f1": 0.6, "val_jaccard": 0.1})
    assert trainer.is_better(s, {"val_polygon_f1": 0.5, "val_jaccard": 0.7})
    assert not trainer.is_better(s, {"val_polygon_f1": 0.5, "val_jaccard": 0.6})
    assert not trainer.is_better(s, {"val_polygon_f1": 0.4, "val_jaccard": 0.9})


@pytest.mark.slow
def test_short_training_logs_polygon_scores_and_selects_best_by_polygon_f1(chips, tmp_path):
    out = tmp_path / "run"
    result = train.run(compose_config("train", [*TINY, f"data_dir={chips}", "max_steps=3", "val_every=1",
                                                "select_by=polygon_f1", f"output_dir={out}"]))
    with (out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and all(0.0 <= float(r["val_polygon_f1"]) <= 1.0 for r in rows)
    assert {"val_polygon_precision", "val_polygon_recall"} <= set(rows[0])
    best = max(result["history"], key=lambda h: (h["val_polygon_f1"], h["val_jaccard"], -h["step"]))
    ckpt = load_checkpoint(out / "best.pth")
    assert ckpt["step"] == best["step"] == result["best_step"]
    assert ckpt["metrics"]["best_polygon_f1"] == best["val_polygon_f1"]
    assert ckpt["model_config"]["instance_head"] is True


@pytest.mark.slow
def test_light_preset_trains_and_its_checkpoint_rebuilds_alone(chips, tmp_path):
    """arch=light: a step, a self-describing checkpoint (weights alone infer the same network), a run folder
    named after the preset, and model=<its checkpoint> only with its own architecture."""
    from model import DECODER_NORM, infer_config

    out = tmp_path / "light"
    cfg = compose_config("train", [*TINY, "arch=light", f"data_dir={chips}", "max_steps=1", f"output_dir={out}"])
    assert train.run_name(cfg) == "light" and train.arch_slug(cfg) == "b0_noaspp_nogn"
    train.run(cfg)
    net = load_model(out / "best.pth")
    assert net.config[DECODER_NORM] == "none" and not net.config["use_ASPP"] and net.config["instance_head"]
    state = load_checkpoint(out / "best.pth")["state_dict"]
    assert infer_config(state, "best.pth", {}) == {**net.config, "drop_connect_rate": 0.2}
    again = train.create_model(compose_config("train", [*TINY, "arch=light", f"model={out / 'best.pth'}"]))
    assert again.config == net.config
    with pytest.raises(UserError, match="use_ASPP=False decoder_norm=none") as err:
        train.create_model(compose_config("train", [*TINY, f"model={out / 'best.pth'}"]))
    assert "\n" not in str(err.value)

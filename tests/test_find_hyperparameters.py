"""find_hyperparameters.py: a two-trial resumable optuna study and the learning-rate range test (conftest's
synthetic `chips`)."""

import itertools
import json

import pytest
import torch

import find_hyperparameters as fh
from lib.cli import compose_config
from lib.errors import UserError

torch.set_num_threads(1)
TINY = ["arch=b0", "pretrained=false", "width=64", "batch_size=2", "num_workers=0", "threads=1", "progress=false",
        "augment=light"]


@pytest.mark.slow
def test_two_trial_search_prints_overrides_and_resumes_from_sqlite(chips, tmp_path, capsys):
    db = tmp_path / "study.db"
    args = [*TINY, f"data_dir={chips}", "n_trials=2", "steps_per_trial=2", "reports_per_trial=2",
            f"storage=sqlite:///{db}", "study_name=t", f"output_dir={tmp_path / 'out'}"]
    result = fh.run(compose_config("find_hyperparameters", args))
    assert db.exists() and result["trials"] == 2
    assert 1e-5 <= result["max_lr"] <= 1e-2 and 1e-8 <= result["weight_decay"] <= 1e-3
    printed = capsys.readouterr().out
    assert f"max_lr={result['max_lr']:.3g} weight_decay={result['weight_decay']:.3g}" in printed
    assert json.loads((tmp_path / "out" / "best.json").read_text())["max_lr"] == result["max_lr"]
    # same study, one more trial wanted: only the missing trial runs
    again = fh.run(compose_config("find_hyperparameters", [*args[:-1], "n_trials=3", f"output_dir={tmp_path / 'o2'}"]))
    assert again["trials"] == 3
    assert "2 finished trial(s), running 1 more" in capsys.readouterr().out


@pytest.mark.slow
def test_lr_range_writes_a_loss_vs_lr_plot_and_suggests_max_lr(chips, tmp_path):
    out = tmp_path / "lr"
    result = fh.run(compose_config("find_hyperparameters", [*TINY, f"data_dir={chips}", "mode=lr_range",
                                                            "lr_range_steps=12", "lr_range_start=1e-5",
                                                            "lr_range_end=1", f"output_dir={out}"]))
    png = out / "lr_range.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = (out / "lr_range.csv").read_text().splitlines()
    lrs = [float(r.split(",")[0]) for r in rows[1:]]
    assert lrs[0] == pytest.approx(1e-5) and all(b > a for a, b in itertools.pairwise(lrs))
    assert result["suggested_max_lr"] == pytest.approx(result["lr_at_min_loss"] / 10)
    assert 1e-6 <= result["suggested_max_lr"] <= 0.1


def test_bad_search_settings_are_user_errors(chips, tmp_path):
    with pytest.raises(UserError, match="lr_bounds"):
        fh.run(compose_config("find_hyperparameters", [*TINY, f"data_dir={chips}", "lr_bounds=[1e-2,1e-4]"]))
    with pytest.raises(UserError, match="mode"):
        fh.run(compose_config("find_hyperparameters", [*TINY, f"data_dir={chips}", "mode=grid"]))

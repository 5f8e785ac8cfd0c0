"""The command line every script shares: configs composed from config/shared/, unknown keys refused by name."""

import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from lib.cli import CONFIG_DIR, REPO_DIR, check_command_line, check_overrides, cli, compose_config
from lib.errors import UserError

SCRIPTS = ["dataset", "train", "inference", "combine_images", "find_hyperparameters", "evaluate", "export", "overlay"]

# (script, misspelt key, the key meant)
TYPOS = [
    ("dataset", "base_dri", "base_dir"),
    ("train", "max_lrr", "max_lr"),
    ("inference", "treshold", "threshold"),
    ("combine_images", "add_mask_sufix", "add_mask_suffix"),
    ("find_hyperparameters", "n_trails", "n_trials"),
    ("evaluate", "iou_treshold", "iou_threshold"),
    ("export", "opsett", "opset"),
    ("overlay", "max_sise", "max_size"),
]


@pytest.mark.parametrize("name", SCRIPTS)
def test_unknown_key_is_refused_naming_it_for_every_script(name):
    with pytest.raises(UserError) as err:
        check_overrides(name, ["no_such_key=1"])
    assert str(err.value) == f"unknown key 'no_such_key' for {name}.py"


@pytest.mark.parametrize("name", SCRIPTS)
def test_appended_key_is_refused_for_every_script(name):
    with pytest.raises(UserError, match=rf"^unknown key 'newkey' for {name}\.py$"):
        compose_config(name, ["+newkey=1"])
    with pytest.raises(UserError, match=r"^unknown key 'newkey'"):
        compose_config(name, ["++newkey=1"])


@pytest.mark.parametrize(("name", "typo", "meant"), TYPOS)
def test_misspelt_key_gets_a_suggestion(name, typo, meant):
    with pytest.raises(UserError) as err:
        compose_config(name, [f"{typo}=1"])
    assert str(err.value) == f"unknown key '{typo}' for {name}.py (did you mean '{meant}'?)"


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_gets_the_shared_hydra_settings(name):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name=name, return_hydra_config=True)
    assert cfg.hydra.run.dir == "."
    assert cfg.hydra.output_subdir is None
    assert cfg.hydra.runtime.choices["hydra/job_logging"] == "stdout"
    assert cfg.hydra.runtime.choices["hydra/hydra_logging"] == "disabled"


def test_shared_groups_give_flat_keys_with_their_defaults():
    inference = compose_config("inference")
    assert (inference.stretch, inference.zero_is_nodata, inference.threshold, inference.device) == \
        ("percentile", "auto", None, "auto")  # threshold null: tuned, else 0.5
    assert inference.model_name is None and inference.use_attention is None
    assert compose_config("dataset").stretch_percentiles == [2, 98]
    assert compose_config("combine_images").vector_format == "gpkg"
    assert compose_config("export").use_mish is None
    assert compose_config("train").precision == "auto"


def test_seed_command_lines_compose():
    train = compose_config("train", ["batch_size=5", "data_dir=X", "max_lr=0.0002", "weight_decay=6.3e-7", "fold=0",
                                     "model_name=efficientnet-b2", "use_mish=True", "use_context_block=True"])
    assert (train.model_name, train.use_mish, train.use_context_block, train.max_lr) == \
        ("efficientnet-b2", True, True, 0.0002)
    inference = compose_config("inference", ["data_dir=X", "model=m.pth", "width=672", "threshold=0.56", "flip=3",
                                             "output_dir=o"])
    assert (inference.width, inference.threshold, inference.flip, inference.output_dir) == (672, 0.56, 3, "o")


@pytest.mark.parametrize("name", ["train", "find_hyperparameters"])
def test_arch_group_selection_still_works(name):
    cfg = compose_config(name, ["arch=b2_context_mish"])
    assert (cfg.arch_name, cfg.model_name, cfg.use_mish, cfg.use_context_block) == \
        ("b2_context_mish", "efficientnet-b2", True, True)
    assert compose_config(None, ["+arch=b0"]).model_name == "efficientnet-b0"


def test_unknown_group_option_lists_the_choices():
    with pytest.raises(UserError, match=r"^unknown arch 'b9' for train\.py \(choose from b0, b1, b2, b2_context_mish, light\)$"):
        compose_config("train", ["arch=b9"])


def test_existing_key_cannot_be_appended_or_removed_but_can_be_forced():
    with pytest.raises(UserError, match=r"^key 'max_lr' of train\.py exists: set it without '\+' \(max_lr=1\)$"):
        check_overrides("train", ["+max_lr=1"])
    with pytest.raises(UserError, match=r"^key 'max_lr' of train\.py cannot be removed"):
        check_overrides("train", ["~max_lr"])
    assert compose_config("train", ["++max_lr=0.1"]).max_lr == 0.1


def test_unreadable_override_is_one_line_naming_it():
    with pytest.raises(UserError, match=r"^cannot read the override 'min_area=\[1': ") as err:
        check_overrides("evaluate", ["min_area=[1"])
    assert "\n" not in str(err.value)


def test_command_line_check_reads_hydra_flags_and_sweeps():
    check_command_line("train", ["--cfg", "job", "hydra.run.dir=.", "hydra/job_logging=stdout", "arch=b0,b2"])
    check_command_line("train", ["--help", "max_lrr=1"])  # help does not compose
    with pytest.raises(UserError, match=r"^unknown key 'max_lrr' for train\.py"):
        check_command_line("train", ["-m", "max_lrr=1e-4,2e-4"])
    with pytest.raises(UserError, match=r"^unknown key 'n_trials' for train\.py"):
        check_command_line("train", ["n_trials=3"])
    check_command_line("train", ["--config-name", "find_hyperparameters", "n_trials=3"])


def test_cli_entry_exits_2_with_one_line_before_running(monkeypatch, capsys):
    ran = []
    main = cli("evaluate")(ran.append)
    monkeypatch.setattr(sys, "argv", ["evaluate.py", "gtt=a.geojson"])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2 and ran == []
    assert capsys.readouterr().err == "error: unknown key 'gtt' for evaluate.py (did you mean 'gt'?)\n"


@pytest.mark.slow
@pytest.mark.parametrize(("script", "arg", "line"), [
    ("train.py", "max_lrr=1", "error: unknown key 'max_lrr' for train.py (did you mean 'max_lr'?)"),
    ("evaluate.py", "+newkey=1", "error: unknown key 'newkey' for evaluate.py"),
])
def test_script_with_unknown_key_exits_2_with_one_line(script, arg, line):
    done = subprocess.run([sys.executable, script, arg], cwd=REPO_DIR, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [line]


def test_scripts_print_warnings_as_one_line():
    """`warning: <message>`, without Python's file:line and source line, once a script's cli entry runs."""
    code = ("import sys, warnings; sys.argv = ['evaluate.py']; from lib.cli import cli\n"
            "cli('evaluate')(lambda cfg: warnings.warn('resume: keeping the\\n  checkpoint max_lr'))()\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_DIR, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == ["warning: resume: keeping the checkpoint max_lr"]

"""benchmarks/gpu_figures.sh: the GPU figures' one-go script runs every step (here on the CPU, at toy sizes).

A GPU machine is often lent for minutes only; a flag renamed in a benchmark would otherwise be found there,
after the time is spent. So the script itself runs here, with DEVICE=cpu, and every step must succeed.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_every_step_runs_and_leaves_its_figures(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "DEVICE": "cpu", "TRAIN_PRESETS": "light", "TRAIN_SIZE": "64",
           "TRAIN_BATCH": "2", "TRAIN_STEPS": "1", "CKPT_STEPS": "2", "CKPT_WIDTH": "64", "CKPT_BATCH": "2",
           "TILES": "1", "TILE": "256", "WIDTH": "128", "PROCS": "2", "PROC_IMAGES": "4",
           "EXTRA_INFERENCE_ARGS": "--skip tta backends pipeline memory", "EXTRA_TRAIN_ARGS": "--presets light"}
    out = tmp_path / "figures"
    res = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_figures.sh"), str(out)], check=False,
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    log = (out / "log.txt").read_text()
    ends = dict(re.findall(r"^--- (.+): exit (\d+) after \d+ ms$", log, re.MULTILINE))
    assert ends == {"machine": "0", "training steps/s": "0", "checkpoint": "0", "pipeline against model-only": "0",
                    "trial cached": "0", "processes per GPU: 2": "0", "processes per GPU: steady images/s": "0",
                    "inference, other sections": "0",
                    "training, memory format and compile": "0"}, res.stdout[-3000:] + res.stderr[-2000:]
    rows = json.loads((out / "train.json").read_text())
    assert any(r.get("preset") == "light" and r.get("model_steps_s", 0) > 0 for r in rows["presets"]), rows
    assert json.loads((out / "train_extra.json").read_text())["memory_format"]
    pair = json.loads((out / "inference" / "results.json").read_text())["pipeline_vs_model"][0]
    assert pair["model_only_inputs_s"] > 0 and pair["pipeline_inputs_s"] > 0
    assert json.loads((out / "inference_rest" / "results.json").read_text())["precision"][0]["mode"] == "fp32 NCHW"
    # four copies of the tile, two per process; after each process's first image, two are timed
    run = json.loads((out / "procs_2" / "run.json").read_text())["images"]
    assert len(run) == 4 and {rank for r in run.values() for rank in r["ranks"]} == {"0", "1"}
    assert len(list((out / "procs_2" / "masks").glob("*.tif"))) == 4
    rate = re.search(r"procs_2: 2 processes, 4 images, steady ([\d.]+) images/s, +([\d.]+) % of the model alone",
                     log)
    assert rate and float(rate[1]) > 0 and float(rate[2]) > 0, log[-2000:]

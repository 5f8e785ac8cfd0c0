"""scripts/demo.sh and scripts/pipeline.sh: the three-stage workflow runs end to end and resumes.

One tiny run of all three stages (b0 from scratch, 2 steps at 64 px, 256 px tiles) in a temporary OUT
and demo folder, so it never touches the repo's data/ or outputs/; the assertions are about what each
stage leaves behind, not about model quality.
"""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import rasterio

REPO = Path(__file__).resolve().parents[1]
TRAIN_ARGS = ("model_name=efficientnet-b0 pretrained=false max_steps=2 width=64 batch_size=2 val_every=2 "
              "num_workers=0 threads=1 val_batch_size=16")


def run_demo(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "scripts/demo.sh"], cwd=REPO, env=env, capture_output=True, text=True, check=False,
                          timeout=900)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The demo's three stages with tiny settings: (OUT, demo folder, first run, second run)."""
    root = tmp_path_factory.mktemp("pipeline")
    out, demo = root / "out", root / "demo"
    env = {**os.environ, "BUILDINGS_DEMO_DIR": str(demo), "OUT": str(out), "DEMO_STAGES": "1 2 3",
           "PREP_SCALES": "1", "B1_ARGS": TRAIN_ARGS, "B2_ARGS": TRAIN_ARGS, "B1_WIDTH": "64", "B2_WIDTH": "64",
           "PSEUDO_WIDTH": "64", "SOFT_CHIP_SIZE": "256", "INFER_ARGS": "tile_size=256 overlap=32 num_threads=1",
           "OMP_NUM_THREADS": "1"}
    first = run_demo(env)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    second = run_demo(env)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]
    return out, demo, first, second


@pytest.mark.slow
def test_stage1_trains_the_teacher_with_a_lean_best_checkpoint(demo_run):
    from lib.checkpoints import load_checkpoint

    out, _, first, _ = demo_run
    assert "== stage 1" in first.stdout and (out / ".stage1.done").exists()
    best, last = load_checkpoint(out / "b1" / "best.pth"), load_checkpoint(out / "b1" / "last.pth")
    assert "optimizer" in last and "rng" in last and "scheduler" in last
    assert not {"optimizer", "rng", "scheduler", "scaler"} & set(best)
    assert best["train_config"]["model_name"] == "efficientnet-b0" and best["meta"]["width"] == 64
    assert (out / "b1" / "best.pth").stat().st_size < 0.6 * (out / "b1" / "last.pth").stat().st_size


@pytest.mark.slow
def test_stage2_trains_a_new_student_on_soft_label_chips(demo_run):
    import cv2

    from lib.checkpoints import load_checkpoint

    out, _, _, _ = demo_run
    soft = out / "soft_labels"
    record = json.loads((soft / "soft_labels.json").read_text())["images"]["demo_test"]
    assert record["soft_chip_size"] == 256 and 8 <= len(record["chips"]) <= 16  # a 1024 px scene in 256 px chips
    for name in record["chips"]:
        with rasterio.open(soft / f"{name}.tif") as ds:
            assert (ds.width, ds.height, ds.count) == (256, 256, 3) and ds.crs is not None
        assert cv2.imread(str(soft / f"{name}_mask.png"), cv2.IMREAD_UNCHANGED).shape == (256, 256)
    student = load_checkpoint(out / "b2" / "best.pth")
    cfg = student["train_config"]
    assert student["model_config"]["use_mish"] and student["model_config"]["use_context_block"]
    assert cfg["soft_labels_dir"] == str(soft) and cfg["model"] is None  # not initialised from the teacher
    assert cfg["pretrained"] is False and cfg["drop_connect_rate"] == 0.5


@pytest.mark.slow
def test_stage3_ensembles_both_models_with_the_inputs_georeferencing(demo_run):
    out, demo, _, _ = demo_run
    final = out / "final"
    assert len(json.loads((final / "run.json").read_text())["models"]) == 2
    image = demo / "test" / "images" / "demo_test.tif"
    with rasterio.open(image) as src:
        crs, transform, size = src.crs, src.transform, (src.width, src.height)
    for folder in ("probabilities", "masks"):
        with rasterio.open(final / folder / "demo_test.tif") as ds:
            assert (ds.crs, ds.transform, (ds.width, ds.height)) == (crs, transform, size)
    assert json.loads((final / "footprints" / "demo_test.geojson").read_text())["type"] == "FeatureCollection"
    scores = json.loads((final / "scores.json").read_text())
    assert {"pixel", "polygon", "per_image"} <= set(scores) and 0.0 <= scores["pixel"]["jaccard"] <= 1.0
    assert (final / "overlay_demo_test.png").stat().st_size > 0


@pytest.mark.slow
def test_rerun_skips_finished_stages_and_output_has_no_raw_warnings(demo_run):
    _, _, first, second = demo_run
    for stage in (1, 2, 3):
        assert f"= stage {stage} already done" in second.stdout
    assert not re.search(r"^\+ ", second.stdout, re.MULTILINE)  # the pipeline echoes every command it runs: none ran
    raw = re.compile(r"\.py:\d+: \w*Warning")  # Python's default format: file:line: Category: message
    assert not raw.search(first.stderr), raw.search(first.stderr)

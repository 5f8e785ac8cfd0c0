"""The point task end to end: train.py task=points, inference.py task=points, evaluate.py task=points, overlay.

The slow test trains a small CircleNet on synthetic SAR scenes and detects the vessels of a scene drawn with
another seed (never seen in training or model selection), scored with the xView3 metric.
"""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import rasterio
import torch

import inference
import point_dataset
import point_task
import train
from lib.cli import REPO_DIR, compose_config
from lib.errors import UserError
from lib.point_outputs import CSV_COLUMNS
from lib.sar_demo import make_sar_demo
from model import load_model

TRAIN = ["task=points", "model_name=efficientnet-b0", "pretrained=false", "width=128", "batch_size=8",
         "num_workers=0", "threads=2", "progress=false", "num_folds=3"]


@pytest.fixture(scope="module")
def sar(tmp_path_factory):
    """Three prepared training scenes and one held-out scene of another seed."""
    root = tmp_path_factory.mktemp("sar")
    demo = make_sar_demo(root / "train", n_scenes=3, size=384, seed=5)
    test = make_sar_demo(root / "test", n_scenes=1, size=384, seed=6)
    cfg = compose_config("dataset", ["task=points", f"base_dir={demo.root}", f"labels={demo.labels}",
                                     f"out_dir={root / 'prepared'}", "progress=false"])
    point_dataset.prepare(cfg)
    return {"prepared": root / "prepared", "demo": demo, "test": test}


def test_labels_become_xview3_columns_and_perfect_tables_score_one():
    points = pd.DataFrame({"scene_id": ["a", "a"], "row": [10.0, 50.0], "col": [20.0, 60.0],
                           "is_vessel": [1.0, np.nan], "is_fishing": [0.0, np.nan], "length_m": [40.0, np.nan],
                           "confidence": ["", "LOW"], "distance_from_shore_km": [10.0, np.nan]})
    labels = point_task.xview3_labels(points)
    assert list(labels["confidence"]) == ["HIGH", "LOW"]
    pred = pd.DataFrame({"detect_scene_row": [10], "detect_scene_column": [20], "scene_id": ["a"],
                         "is_vessel": [True], "is_fishing": [False], "vessel_length_m": [40.0]})
    scores = point_task.score_detections(labels, [pred], None)
    assert scores["val_loc_fscore"] == 1.0 and scores["val_length_acc"] == 1.0 and scores["val_vessel_fscore"] == 1.0
    assert point_task.score_detections(labels, [pred.iloc[:0]], None)["val_aggregate"] == 0.0


@pytest.mark.parametrize(("override", "match"), [("select_by=polygon_f1", "select_by=polygon_f1"),
                                                 ("task=boxes", "task=boxes")])
def test_bad_task_options_are_one_line_errors(override, match, sar, tmp_path):
    cfg = compose_config("train", [*TRAIN, f"data_dir={sar['prepared']}", "max_steps=1", override,
                                   f"output_dir={tmp_path}"])
    with pytest.raises(UserError, match=match):
        train.run(cfg)


def test_segmentation_checkpoint_is_refused_by_the_point_inference(checkpoints, sar, tmp_path):
    cfg = compose_config("inference", ["task=points", f"data_dir={sar['test'].scenes[0]}",
                                       f"model={checkpoints['b0']}", f"output_dir={tmp_path}"])
    with pytest.raises(UserError, match="not a point-detection"):
        inference.run(cfg)


@pytest.mark.slow
def test_short_training_finds_the_vessels_of_an_unseen_scene(sar, tmp_path):
    torch.manual_seed(0)
    run_dir = tmp_path / "train"
    result = train.run(compose_config("train", [*TRAIN, f"data_dir={sar['prepared']}", "max_steps=80",
                                                "val_every=40", f"output_dir={run_dir}",
                                                f"shore_root={sar['demo'].shoreline_dir}"]))
    assert result["best"] > 0.3 and result["last"]["val_loc_fscore"] > 0.6
    net = load_model(run_dir / "best.pth")
    assert net.config["task"] == "points" and net.meta["sar"]["channels"] == ["VV", "VH"]

    scene = sar["test"].scenes[0]
    out = tmp_path / "infer"
    record = inference.run(compose_config("inference", ["task=points", f"data_dir={scene}",
                                                        f"model={run_dir / 'best.pth'}", f"output_dir={out}",
                                                        "tile_size=256", "progress=false", "num_workers=0"]))
    assert record["scenes"][scene.name]["status"] == "done"
    det = pd.read_csv(out / "detections.csv")
    assert list(det.columns) == list(CSV_COLUMNS) and len(det) > 10
    with rasterio.open(scene / "VV_dB.tif") as ds:  # lat/lon agree with the scene's georeferencing
        x, y = ds.xy(int(det["detect_scene_row"][0]), int(det["detect_scene_column"][0]))
    from pyproj import Transformer

    lon, lat = Transformer.from_crs(ds.crs, "EPSG:4326", always_xy=True).transform(x, y)
    assert det["lon"][0] == pytest.approx(lon, abs=2e-4) and det["lat"][0] == pytest.approx(lat, abs=2e-4)
    geo = json.loads((out / "detections" / f"{scene.name}.geojson").read_text())
    assert len(geo["features"]) == len(det)

    scores = out / "scores.json"
    subprocess.run([sys.executable, "evaluate.py", "task=points", f"gt={sar['test'].labels}",
                    f"pred={out / 'detections.csv'}", f"shore_root={sar['test'].shoreline_dir}",
                    f"output={scores}"], cwd=REPO_DIR, check=True, capture_output=True, text=True)
    metric = json.loads(scores.read_text())
    assert metric["loc_fscore"] > 0.7, metric

    again = inference.run(compose_config("inference", ["task=points", f"data_dir={scene}",
                                                       f"model={run_dir / 'best.pth'}", f"output_dir={out}",
                                                       "tile_size=256", "progress=false", "num_workers=0"]))
    assert again["scenes"][scene.name]["fingerprint"] == record["scenes"][scene.name]["fingerprint"]

    png = tmp_path / "overlay.png"
    subprocess.run([sys.executable, "overlay.py", "task=points", f"image={scene}", f"pred={out / 'detections.csv'}",
                    f"gt={sar['test'].labels}", f"output={png}"], cwd=REPO_DIR, check=True, capture_output=True)
    assert png.stat().st_size > 1000


def test_missing_scene_fails_in_one_line_and_others_finish(sar, tmp_path):
    """A scene folder missing its VH channel is reported and recorded as failed; nothing of it is left."""
    import shutil

    root = tmp_path / "scenes"
    good, bad = sar["test"].scenes[0], root / "broken"
    shutil.copytree(good, root / good.name)
    bad.mkdir(parents=True)
    shutil.copy(good / "VV_dB.tif", bad / "VV_dB.tif")
    import circlenet

    net = circlenet.build_circlenet(model_name="efficientnet-b0", in_channels=2)
    from lib.checkpoints import save_checkpoint

    save_checkpoint(tmp_path / "c.pth", net)
    cfg = compose_config("inference", ["task=points", f"data_dir={root}", f"model={tmp_path / 'c.pth'}",
                                       f"output_dir={tmp_path / 'out'}", "tile_size=256", "progress=false",
                                       "objectness_threshold=0.99"])
    with pytest.raises(UserError, match="1 of 2 scenes failed: broken"):
        inference.run(cfg)
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert record["scenes"]["broken"]["status"] == "failed" and "VH" in record["scenes"]["broken"]["error"]
    assert record["scenes"][good.name]["status"] == "done"
    assert not (tmp_path / "out" / "detections" / "broken.csv").exists()


def test_a_stopped_point_run_keeps_its_finished_scenes_and_a_rerun_skips_them(sar, tmp_path, monkeypatch):
    """Ctrl-C during the second of two scenes: run.json already vouches for the first, so the rerun
    detects only the second, and ends with both recorded and merged."""
    import shutil

    from lib import point_inference

    root = tmp_path / "scenes"
    for name in ("a_first", "b_second"):
        shutil.copytree(sar["test"].scenes[0], root / name)
    import circlenet
    from lib.checkpoints import save_checkpoint

    save_checkpoint(tmp_path / "c.pth", circlenet.build_circlenet(model_name="efficientnet-b0", in_channels=2))
    cfg = compose_config("inference", ["task=points", f"data_dir={root}", f"model={tmp_path / 'c.pth'}",
                                       f"output_dir={tmp_path / 'out'}", "tile_size=256", "progress=false",
                                       "objectness_threshold=0.99"])
    real, seen, stop = point_inference.predict_scene, [], ["b_second"]

    def watched(eng, scene_id, *args):
        seen.append(scene_id)
        if scene_id in stop:
            raise KeyboardInterrupt
        return real(eng, scene_id, *args)

    monkeypatch.setattr(point_inference, "predict_scene", watched)
    with pytest.raises(KeyboardInterrupt):
        inference.run(cfg)
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert list(record["scenes"]) == ["a_first"] and record["scenes"]["a_first"]["status"] == "done"
    seen.clear()
    stop.clear()
    again = inference.run(cfg)
    assert seen == ["b_second"]
    assert [again["scenes"][s]["status"] for s in ("a_first", "b_second")] == ["done", "done"]
    assert again["detections"] == len(pd.read_csv(tmp_path / "out" / "detections.csv"))


@pytest.mark.slow
def test_resumed_point_training_continues_bit_for_bit(sar, tmp_path):
    """Chips are a function of (seed, epoch, index): a run resumed from m2.pth ends with the same weights."""
    import shutil

    args = [*TRAIN, f"data_dir={sar['prepared']}", "max_steps=4", "val_every=4", "keep_every=2", "dropout=false",
            "width=64", "batch_size=2"]
    train.run(compose_config("train", [*args, f"output_dir={tmp_path / 'a'}"]))
    (tmp_path / "b").mkdir()
    shutil.copy(tmp_path / "a" / "m2.pth", tmp_path / "b" / "m2.pth")
    train.run(compose_config("train", [f"resume={tmp_path / 'b' / 'm2.pth'}", f"output_dir={tmp_path / 'b'}",
                                       "progress=false"]))
    a = torch.load(tmp_path / "a" / "last.pth", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "b" / "last.pth", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

"""find_hyperparameters.py: a two-trial resumable optuna study and the learning-rate range test (conftest's
synthetic `chips`); task=points threshold tuning on a tiny synthetic SAR scene with a stand-in detector whose
probabilities are deliberately off (so the defaults find nothing), stored in a real CircleNet checkpoint."""

import itertools
import json
import warnings

import numpy as np
import pandas as pd
import pytest
import rasterio
import torch
from rasterio.transform import from_origin

import find_hyperparameters as fh
import model as model_lib
from lib import point_contract as pc
from lib import point_tuning
from lib.cli import compose_config
from lib.errors import UserError
from lib.point_inference import thresholds
from lib.point_outputs import submission_table
from lib.point_targets import encode_targets
from lib.xview3_metric import PRED_COLUMNS, score

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


# ----- task=points: thresholds -------------------------------------------------------------------

SAR = ["task=points", "num_workers=0", "progress=false", "threads=1", "device=cpu", "precision=fp32",
       "tile_size=64", "overlap=16", "batch_size=4"]
# one object kind per VH level (dB): fishing vessel, other vessel, non-vessel; VV marks every object
KINDS = {"fishing": (-8.0, 1.0, 1.0), "vessel": (-15.0, 1.0, 0.0), "other": (-25.0, 0.0, np.nan)}


def write_scene(folder, objects, shape=(128, 160)):
    """An xView3 scene folder (VV_dB.tif, VH_dB.tif, 10 m UTM pixels): dark sea, one bright pixel per object."""
    folder.mkdir(parents=True)
    vv, vh = np.full(shape, -25.0, np.float32), np.full(shape, -30.0, np.float32)
    for r, c, kind in objects:
        vv[r, c], vh[r, c] = 5.0, KINDS[kind][0]
    profile = {"driver": "GTiff", "height": shape[0], "width": shape[1], "count": 1, "dtype": "float32",
               "crs": "EPSG:32631", "transform": from_origin(480_000, 5_800_000, 10, 10), "nodata": -32768.0}
    for name, band in (("VV_dB.tif", vv), ("VH_dB.tif", vh)):
        with rasterio.open(folder / name, "w", **profile) as ds:
            ds.write(band, 1)


def xview3_rows(scene_id, objects, confidence="HIGH"):
    return [{"scene_id": scene_id, "detect_scene_row": r, "detect_scene_column": c, "is_vessel": KINDS[k][1],
             "is_fishing": KINDS[k][2], "vessel_length_m": 100.0, "distance_from_shore_km": 10.0,
             "confidence": confidence} for r, c, k in objects]


@pytest.fixture
def sar_holdout(tmp_path):
    """Two scenes of 12 objects each (every kind) and their xView3 label CSV."""
    kinds = list(KINDS)
    rows = []
    for s in range(2):
        objects = [(12 + 28 * i, 14 + 36 * j, kinds[(i + j + s) % 3]) for i in range(4) for j in range(4)][:12]
        write_scene(tmp_path / "scenes" / f"s{s}", objects)
        rows += xview3_rows(f"s{s}", objects)
    pd.DataFrame(rows).to_csv(tmp_path / "labels.csv", index=False)
    return tmp_path / "scenes", tmp_path / "labels.csv"


class OffSpots(torch.nn.Module):
    """A stand-in CircleNet that finds every bright VV pixel and reads its kind from VH, exactly -- with
    probabilities squeezed low: objectness peaks of 0.33 x 0.85 = 0.28, vessel and fishing 0.42 where
    true and 0.12 where false. At the default 0.5 thresholds it finds nothing."""

    def forward(self, x):
        outs = []
        for k in range(x.shape[0]):
            rows, cols = np.nonzero(x[k, 0].numpy() > 0.9)
            aux = x[k, 1].numpy()[rows, cols]
            outs.append(encode_targets(rows, cols, (aux > 0.4).astype(float), (aux > 0.8).astype(float),
                                       np.full(len(rows), 10.0), tuple(x.shape[2:])))
        t = {name: torch.from_numpy(np.stack([o[name] for o in outs])) for name in pc.TARGETS}

        def logit(p):
            return torch.log(p / (1 - p))

        return {pc.OBJECTNESS: logit((t[pc.T_HEATMAP] * 0.33).clamp(1e-4, 1 - 1e-4)), pc.LENGTH: t[pc.T_LENGTH],
                pc.OFFSET: t[pc.T_OFFSET], pc.VESSEL: logit(0.12 + 0.3 * t[pc.T_VESSEL]),
                pc.FISHING: logit(0.12 + 0.3 * t[pc.T_FISHING])}


@pytest.fixture(scope="module")
def circlenet_ckpt(tmp_path_factory):
    """A small real CircleNet checkpoint (random weights) with training state beside the weights."""
    import circlenet
    from lib.checkpoints import save_checkpoint

    path = tmp_path_factory.mktemp("points") / "points.pth"
    net = circlenet.build_circlenet(model_name="efficientnet-b0", decoder_channels=(32, 16, 16, 16),
                                    head_channels=16)
    save_checkpoint(path, net, step=7, metrics={"val_aggregate": 0.1}, meta={"task": "points", "width": 64})
    return path


def _points_cfg(scenes, labels, ckpt, *extra):
    return compose_config("find_hyperparameters", [*SAR, f"data_dir={scenes}", f"labels={labels}",
                                                   f"model={ckpt}", *extra])


def test_tuning_beats_a_bad_default_and_stores_thresholds_inference_reads(sar_holdout, circlenet_ckpt, tmp_path,
                                                                          capsys):
    scenes, labels = sar_holdout
    ckpt = tmp_path / "tuned.pth"
    ckpt.write_bytes(circlenet_ckpt.read_bytes())
    before = torch.load(ckpt, weights_only=True)
    report = fh.run(_points_cfg(scenes, labels, ckpt, "num_folds=1"), models=[OffSpots()])
    best = report["best"]
    # every object found and classified: loc, vessel, fishing, length 1, no shore data: (1 + 3) / 5
    assert best["scores"]["aggregate"] == pytest.approx(0.8) and best["scores"]["loc_fscore"] == 1.0
    assert report["default"]["scores"]["aggregate"] == 0.0 and report["default"]["scores"]["detections"] == 0
    # ties go to the values nearest the defaults: peaks read 0.28, class probabilities 0.42 / 0.12
    assert (best["objectness_threshold"], best["vessel_threshold"], best["fishing_threshold"]) == (0.25, 0.4, 0.4)
    assert report["scenes"] == ["s0", "s1"] and report["candidates"] == 24
    printed = capsys.readouterr().out
    assert "inference.py overrides: objectness_threshold=0.25 vessel_threshold=0.4 fishing_threshold=0.4" in printed
    assert json.loads((tmp_path / "tuned_thresholds.json").read_text())["best"] == best  # the default output
    # the choice round-trips through the checkpoint; everything else in the file is as it was
    meta = model_lib.load_model(ckpt).meta
    assert meta["postprocess"] == {"objectness_threshold": 0.25, "vessel_threshold": 0.4, "fishing_threshold": 0.4,
                                   "metric": "aggregate", "score": pytest.approx(0.8), "scenes": ["s0", "s1"]}
    infer = compose_config("inference", ["task=points"])
    assert thresholds(infer, meta) == {"objectness_threshold": 0.25, "vessel_threshold": 0.4, "fishing_threshold": 0.4}
    given = compose_config("inference", ["task=points", "objectness_threshold=0.6"])
    assert thresholds(given, meta)["objectness_threshold"] == 0.6  # the command line still wins
    after = torch.load(ckpt, weights_only=True)
    assert after.keys() == before.keys() and after["meta"] == {**before["meta"], "postprocess": meta["postprocess"]}
    assert all(torch.equal(after["state_dict"][k], v) and after["state_dict"][k].dtype == v.dtype
               for k, v in before["state_dict"].items())
    assert {k: after[k] for k in ("step", "metrics", "model_config")} == {k: before[k] for k in
                                                                         ("step", "metrics", "model_config")}


def test_store_false_leaves_the_checkpoint_bytes_and_a_fixed_threshold_is_held(sar_holdout, circlenet_ckpt,
                                                                               tmp_path):
    scenes, labels = sar_holdout
    original = circlenet_ckpt.read_bytes()
    out = tmp_path / "report.json"
    report = fh.run(_points_cfg(scenes, labels, circlenet_ckpt, "scenes=[s1]", "store=false", f"output={out}",
                                "vessel_threshold=0.3", "metric=aggregate"), models=[OffSpots()])
    assert circlenet_ckpt.read_bytes() == original and report["stored_in"] is None
    assert report["scenes"] == ["s1"] and report["grid"]["vessel_threshold"] == [0.3]
    assert report["best"]["vessel_threshold"] == 0.3 and report["best"]["scores"]["aggregate"] == pytest.approx(0.8)
    assert json.loads(out.read_text())["scenes"] == ["s1"]


def test_the_real_network_runs_through_inferences_loading(sar_holdout, circlenet_ckpt, tmp_path):
    """model= loaded as inference.py loads it; random weights, so only the mechanics are checked."""
    scenes, labels = sar_holdout
    original = circlenet_ckpt.read_bytes()
    report = fh.run(_points_cfg(scenes, labels, circlenet_ckpt, "scenes=[s0]", "store=false", "metric=loc_fscore",
                                f"output={tmp_path / 'r.json'}", "threshold_grid=[0.1,0.9,0.2]"))
    assert report["grid"]["objectness_threshold"] == [0.1, 0.3, 0.5, 0.7, 0.9]
    assert report["grid"]["vessel_threshold"] == [0.5] and report["grid"]["fishing_threshold"] == [0.5]
    assert report["candidate_threshold"] == 0.1 and 0.0 <= report["best"]["scores"]["loc_fscore"] <= 1.0
    assert circlenet_ckpt.read_bytes() == original


def _random_holdout(seed=0, scenes=3, n=40, false=25):
    """Labels of every kind and confidence, and candidates near them (plus false ones) with random scores."""
    rng = np.random.default_rng(seed)
    labels, cands = [], []
    for s in range(scenes):
        rows, cols = rng.uniform(0, 3000, n), rng.uniform(0, 3000, n)
        labels.append(pd.DataFrame({
            "scene_id": f"r{s}", "detect_scene_row": rows, "detect_scene_column": cols,
            "is_vessel": rng.choice([1.0, 0.0, np.nan], n), "is_fishing": rng.choice([1.0, 0.0, np.nan], n),
            "vessel_length_m": rng.uniform(10, 200, n), "distance_from_shore_km": rng.uniform(0, 5, n),
            "confidence": rng.choice(["HIGH", "MEDIUM", "LOW"], n)}))
        m = n + false
        dets = pd.DataFrame({"row": np.r_[rows + rng.normal(0, 10, n), rng.uniform(0, 3000, false)],
                             "col": np.r_[cols + rng.normal(0, 10, n), rng.uniform(0, 3000, false)],
                             **{k: rng.uniform(0, 1, m).astype(np.float32) for k in ("objectness", "vessel", "fishing")},
                             "length_px": rng.uniform(1, 20, m).astype(np.float32)})
        cands.append((dets, point_tuning.candidate_table(dets, f"r{s}", None, None, 10.0)))
    return pd.concat(labels, ignore_index=True), cands


def test_the_grid_scores_are_the_metrics_own_at_every_point():
    labels, cands = _random_holdout()
    cand = pd.concat([c for _, c in cands], ignore_index=True)
    grid = point_tuning.threshold_grid(0.05, 0.95, 0.1)
    rng = np.random.default_rng(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no shoreline data
        found = point_tuning.search(labels, cand, {k: grid for k in point_tuning.AXES})
        assert found["value"] == point_tuning.evaluate(labels, cand, found["thresholds"])["aggregate"] > 0.2
        for _ in range(12):
            thr = {k: float(rng.choice(grid)) for k in point_tuning.AXES}
            # what inference writes at these thresholds: the peaks at or above it, classes at the others
            written = pd.concat([submission_table(d[d["objectness"] >= thr["objectness_threshold"]], f"r{s}", None,
                                                  None, thr["vessel_threshold"], thr["fishing_threshold"], 10.0)
                                 for s, (d, _) in enumerate(cands)], ignore_index=True)
            selected = point_tuning.select(cand, thr)
            pd.testing.assert_frame_equal(selected[list(PRED_COLUMNS)], written[list(PRED_COLUMNS)])
            exact = score(labels, written, score_unpredicted_scenes=True)
            one = point_tuning.search(labels, cand, {k: [v] for k, v in thr.items()})
            assert one["value"] == exact["aggregate"]
            vessel, fishing = point_tuning.class_fscores(labels, selected, [thr["vessel_threshold"]],
                                                         [thr["fishing_threshold"]])
            assert (vessel[0], fishing[0, 0]) == (exact["vessel_fscore"], exact["fishing_fscore"])


def test_threshold_grid_and_bad_point_settings(sar_holdout, circlenet_ckpt, tmp_path):
    np.testing.assert_array_equal(point_tuning.threshold_grid(0.05, 0.95, 0.05)[[0, 2, -1]], [0.05, 0.15, 0.95])
    assert len(point_tuning.threshold_grid(0.05, 0.95, 0.05)) == 19
    scenes, labels = sar_holdout
    bad = {"metric=f1": "metric=f1", "threshold_grid=[0.5,0.1,0.1]": "threshold_grid", "scenes=[nope]": "nope",
           "objectness_threshold=1.5": "objectness_threshold"}
    for arg, message in bad.items():
        with pytest.raises(UserError, match=message):
            fh.run(_points_cfg(scenes, labels, circlenet_ckpt, arg, "store=false"), models=[OffSpots()])
    with pytest.raises(UserError, match="labels=<xView3 CSV>"):
        fh.run(_points_cfg(scenes, "null", circlenet_ckpt, "num_folds=1"), models=[OffSpots()])
    with pytest.raises(UserError, match="mode=thresholds"):
        fh.run(compose_config("find_hyperparameters", ["mode=thresholds"]))


def test_holdout_is_trains_validation_split_of_a_prepared_folder(tmp_path):
    import point_dataset

    root = tmp_path / "prepared"
    root.mkdir()
    ids = [f"p{i}" for i in range(5)]
    pd.DataFrame({"scene_id": ids, "path": [f"scenes/{i}.tif" for i in ids], "height": 64, "width": 64, "gsd": 10.0,
                  "channels": "VV,VH", "source": "x", "points": 1}).to_csv(root / point_dataset.SCENES_FILE,
                                                                            index=False)
    points = pd.DataFrame({"scene_id": ids, "row": 5.0, "col": 6.0, "is_vessel": [1, 1, 0, 1, 1],
                           "is_fishing": [1, 0, np.nan, 1, 0], "length_m": 50.0, "confidence": "",
                           "distance_from_shore_km": [1.0, 9, 9, 1, 9]})
    points.to_csv(root / point_dataset.POINTS_FILE, index=False)
    cfg = compose_config("find_hyperparameters", ["task=points", f"data_dir={root}", "fold=1", "num_folds=3"])
    chosen, labels, how = fh.holdout(cfg)
    scenes, prepared = point_dataset.load_prepared(root)
    expected = [s.scene_id for s in point_dataset.split_scenes(scenes, 1, 3, 0, prepared)[1]]
    assert [s for s, _ in chosen] == expected and how == "fold 1 of 3"
    assert sorted(labels["scene_id"]) == sorted(expected) and set(labels["confidence"]) == {"HIGH"}


def test_update_meta_rewrites_only_the_meta_and_refuses_files_without_one(tmp_path):
    from safetensors.torch import save_file

    from lib.checkpoints import _load_safetensors, update_meta

    weights = {"w": torch.arange(6, dtype=torch.float16).reshape(2, 3), "b": torch.ones(2)}
    path = tmp_path / "m.safetensors"
    save_file(weights, str(path), metadata={"model_config": json.dumps({"arch": "x"}), "meta": json.dumps({"a": 1})})
    assert update_meta(path, {"postprocess": {"objectness_threshold": 0.3}}) == {
        "a": 1, "postprocess": {"objectness_threshold": 0.3}}
    again = _load_safetensors(path)
    assert again["meta"]["postprocess"] == {"objectness_threshold": 0.3} and again["model_config"] == {"arch": "x"}
    assert all(torch.equal(again["state_dict"][k], v) and again["state_dict"][k].dtype == v.dtype
               for k, v in weights.items())
    bare = tmp_path / "bare.pth"
    torch.save(weights, bare)
    original = bare.read_bytes()
    with pytest.raises(UserError, match="bare state dict"):
        update_meta(bare, {"x": 1})
    assert bare.read_bytes() == original
    (tmp_path / "m.onnx").write_bytes(b"onnx")
    with pytest.raises(UserError, match="exported"):
        update_meta(tmp_path / "m.onnx", {"x": 1})


# ----- mode=postprocess: footprint threshold / seed_threshold / min_area ---------------------------------

LOW = 0.35  # the stand-ins' building probability: under the default threshold 0.5, so the defaults find nothing


class Roofs(torch.nn.Module):
    """A stand-in segmentation model: building where the (pooled) input is bright, at probability LOW; with
    `head`, border/contact probabilities read from the green channel (bright = contact between roofs)."""

    def __init__(self, head=False):
        super().__init__()
        self.head = head
        self.config = {"instance_head": head}

    def forward(self, x):
        pooled = torch.nn.functional.avg_pool2d(x, 4)
        roof, wall = pooled[:, :1] > 0, pooled[:, 1:2] > 0

        def logit(p):
            return torch.log(torch.as_tensor(p) / (1 - torch.as_tensor(p)))

        seg = torch.cat([torch.zeros_like(pooled[:, :1]), torch.where(roof, logit(LOW), logit(0.02))], 1)
        out = {"seg": seg, "cls": torch.zeros(x.shape[0], 2)}
        if self.head:
            contact = torch.where(wall, logit(0.95), logit(0.02))
            out["instance"] = torch.cat([torch.full_like(contact, float(logit(0.02))), contact], 1)
        return out


def _roof_chips(folder):
    """Two scenes of one 64 px chip: three rows of two roofs sharing a wall (red) marked in green where they
    meet, and their instance ids (one per roof)."""
    import cv2

    for s in range(2):
        d = folder / f"city/s{s}"
        d.mkdir(parents=True)
        img = np.zeros((64, 64, 3), np.uint8)
        ids = np.zeros((64, 64), np.uint16)
        k = 0
        for r in (4, 24, 44):
            for c0, c1 in ((8, 28), (28, 48)):  # touching roofs, 16 x 20 px each
                k += 1
                ids[r:r + 16, c0:c1] = k
            img[r:r + 16, 8:48, 2] = 255  # red (BGR on disk) roof
            img[r:r + 16, 24:32, 1] = 255  # green: the shared wall
        cv2.imwrite(str(d / "1_0.png"), img)
        cv2.imwrite(str(d / "1_0_mask.png"), ((ids > 0) * 255).astype(np.uint8))
        cv2.imwrite(str(d / "1_0_instances.png"), ids)
    return folder


@pytest.fixture()
def seg_ckpt(tmp_path):
    from lib.checkpoints import save_checkpoint

    path = tmp_path / "seg.pth"
    net = torch.nn.Conv2d(3, 2, 1)
    net.config = {"arch": "stand-in"}
    save_checkpoint(path, net, step=3, meta={"width": 64})
    return path


def _post_cfg(chips_dir, ckpt, *extra, args="{regularize:false}"):
    return compose_config("find_hyperparameters", [
        "mode=postprocess", f"data_dir={chips_dir}", f"model={ckpt}", "num_folds=1", "device=cpu", "precision=fp32",
        "tile_size=64", "batch_size=2", "num_workers=0", "progress=false", "threshold_grid=[0.2,0.6,0.1]",
        "seed_threshold_grid=[0.2,0.6,0.2]", "min_area_grid=[0,50,400]", f"inference_args={args}",
        *extra])


def test_postprocess_finds_a_better_threshold_and_stores_it_for_inference(tmp_path, seg_ckpt, capsys):
    from lib.postprocess import resolve

    chips_dir = _roof_chips(tmp_path / "chips")
    report = fh.run(_post_cfg(chips_dir, seg_ckpt), models=[Roofs(head=True)])
    assert report["instance_head"] and report["buildings"] == 12 and report["area_units"] == "px"
    assert report["default"]["scores"]["polygon_f1"] == 0.0 and report["default"]["scores"]["tp"] == 0
    best = report["best"]
    # threshold at or under LOW finds the roofs; the contact map splits each pair: all 12 buildings, one each
    assert best["threshold"] <= LOW and best["scores"]["polygon_f1"] == 1.0 and best["scores"]["tp"] == 12
    assert best["seed_threshold"] is not None and best["min_area"] in (0.0, 50.0)  # 400 px drops every roof
    assert len(report["curve"]) == 5 * 3 * 3
    meta = torch.load(seg_ckpt, weights_only=True)["meta"]
    assert meta["postprocess"]["threshold"] == best["threshold"] and meta["postprocess"]["metric"] == "polygon_f1"
    assert meta["postprocess"]["score"] == 1.0 and meta["width"] == 64
    tuned = resolve(compose_config("inference", []), meta)  # what inference.py then uses by default
    assert (tuned.threshold, tuned.seed_threshold, tuned.min_area) == (best["threshold"], best["seed_threshold"],
                                                                       best["min_area"])
    assert "inference.py overrides: threshold=" in capsys.readouterr().out
    assert json.loads((tmp_path / "seg_postprocess.json").read_text())["best"] == best


def test_postprocess_without_the_head_searches_no_seeds_and_merges_touching_roofs(tmp_path, seg_ckpt):
    chips_dir = _roof_chips(tmp_path / "chips")
    original = seg_ckpt.read_bytes()
    report = fh.run(_post_cfg(chips_dir, seg_ckpt, "store=false", "metric=jaccard", f"output={tmp_path / 'r.json'}"),
                    models=[Roofs(head=False)])
    assert not report["instance_head"] and report["grid"]["seed_threshold"] == [None]
    assert report["best"]["seed_threshold"] is None and len(report["curve"]) == 5 * 3
    # connected components: each pair of touching roofs is one blob, matching neither roof (IoU exactly 0.5)
    assert report["best"]["scores"]["tp"] == 0 and report["best"]["scores"]["jaccard"] > 0.9
    assert report["best"]["threshold"] <= LOW and report["default"]["scores"]["jaccard"] == 0.0
    assert seg_ckpt.read_bytes() == original and report["stored_in"] is None


def test_postprocess_bad_settings_are_user_errors(tmp_path, seg_ckpt):
    chips_dir = _roof_chips(tmp_path / "chips")
    with pytest.raises(UserError, match="metric=aggregate"):
        fh.run(_post_cfg(chips_dir, seg_ckpt, "metric=aggregate"), models=[Roofs()])
    with pytest.raises(UserError, match="min_area_grid"):
        fh.run(_post_cfg(chips_dir, seg_ckpt, "min_area_grid=[-1]"), models=[Roofs()])
    with pytest.raises(UserError, match="labels="):
        fh.run(_post_cfg(chips_dir, seg_ckpt, f"images={tmp_path / 'x.tif'}"), models=[Roofs()])
    with pytest.raises(UserError, match="inference_args: nope"):
        fh.run(_post_cfg(chips_dir, seg_ckpt, args="{nope:1}"), models=[Roofs()])
    with pytest.raises(UserError, match="give a mapping in quotes"):  # what an unquoted {a:1,b:2} becomes in bash
        fh.run(_post_cfg(chips_dir, seg_ckpt, args="width:128"), models=[Roofs()])

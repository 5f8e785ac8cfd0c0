"""inference.py: inputs (files, folders, STAC), outputs and georeferencing, resume, mining, backends, torchrun."""

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from standins import ConstantModel, gradient_image, infer_cfg, read, write_rgba

from lib.cli import compose_config
from lib.errors import UserError
from lib.files import file_sha256

torch.set_num_threads(1)


def test_outputs_keep_size_crs_transform_and_footprints_load_in_epsg4326(drone, checkpoints, tmp_path):
    import geopandas as gpd

    import inference

    cfg = infer_cfg(drone, checkpoints["full"], tmp_path, "threshold=0.5", "vector_format=gpkg")
    result = inference.run(cfg)
    with rasterio.open(drone) as src:
        for kind in ("probabilities", "masks"):
            with rasterio.open(tmp_path / kind / "drone.tif") as ds:
                assert (ds.width, ds.height, ds.crs, ds.transform) == (src.width, src.height, src.crs, src.transform)
                assert ds.dtypes == ("uint8",) and ds.profile["compress"] == "deflate"
                assert ds.tags()["BUILDINGS_TTA"] == "none"
                assert ds.read(1).min() == 255  # the always-building model
        bounds = src.bounds
    gj = gpd.read_file(tmp_path / "footprints" / "drone.geojson")
    assert gj.crs.to_epsg() == 4326 and len(gj) == 1
    back = gj.to_crs(src.crs).total_bounds
    assert np.allclose(back, [bounds.left, bounds.bottom, bounds.right, bounds.top], atol=1e-3)
    area = (bounds.right - bounds.left) * (bounds.top - bounds.bottom)
    assert gj["area_m2"].iloc[0] == pytest.approx(area, rel=1e-3)
    assert gj["mean_prob"].iloc[0] == pytest.approx(1.0)
    gp = gpd.read_file(tmp_path / "footprints" / "drone.gpkg")
    assert gp.crs.to_epsg() == 32632
    run_json = json.loads((tmp_path / "run.json").read_text())
    assert run_json["models"][0]["sha256"] == file_sha256(checkpoints["full"])
    assert run_json["tile_size"] == 256 and run_json["tta"] == ["none"] and run_json["toolkit_version"]
    assert result["images"]["drone"]["path"] == str(drone.resolve())


def test_plain_png_gives_plain_tiff_and_pixel_footprints(checkpoints, tmp_path):
    import cv2
    import geopandas as gpd

    import inference

    cv2.imwrite(str(tmp_path / "plain.png"), gradient_image(100, 140))
    inference.run(infer_cfg(tmp_path / "plain.png", checkpoints["full"], tmp_path / "out"))
    with rasterio.open(tmp_path / "out" / "masks" / "plain.tif") as ds:
        assert ds.crs is None and ds.transform.is_identity and (ds.height, ds.width) == (100, 140)
    gj = gpd.read_file(tmp_path / "out" / "footprints" / "plain.geojson")
    assert tuple(gj.total_bounds) == (0, 0, 140, 100)  # pixel (column, row) coordinates


def test_rerun_skips_finished_outputs_unless_overwrite(drone, checkpoints, tmp_path):
    import inference

    first = inference.run(infer_cfg(drone, checkpoints["empty"], tmp_path))
    assert first["summary"]["predicted"] == 1
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file() and p.name != "run.json")
    stamps = [p.stat().st_mtime_ns for p in files]
    again = inference.run(infer_cfg(drone, checkpoints["empty"], tmp_path))
    assert again["summary"] == {"predicted": 0, "skipped": 1, "empty": [], "failed": []}
    assert [p.stat().st_mtime_ns for p in files] == stamps
    assert "drone" in again["images"]  # the earlier record is kept in run.json
    (tmp_path / "masks" / "drone.tif").unlink()  # an unfinished image is predicted again
    assert inference.run(infer_cfg(drone, checkpoints["empty"], tmp_path))["summary"]["predicted"] == 1
    redo = inference.run(infer_cfg(drone, checkpoints["empty"], tmp_path, "overwrite=true"))
    assert redo["summary"]["predicted"] == 1
    assert not list(tmp_path.rglob(".*.tif"))  # no temporary files left behind


def test_negative_mining_copies_only_confidently_empty_images(drone, checkpoints, tmp_path):
    import inference

    empty_dir = tmp_path / "negatives"
    r = inference.run(infer_cfg(drone, checkpoints["empty"], tmp_path / "e", "mine_empty=true",
                                f"output_dir_empty={empty_dir}", "empty_threshold=0.1"))
    assert r["summary"]["empty"] == ["drone"] and r["images"]["drone"]["cls_prob"] < 0.1
    assert (empty_dir / "drone.tif").read_bytes() == drone.read_bytes()
    full_dir = tmp_path / "none"
    r = inference.run(infer_cfg(drone, checkpoints["full"], tmp_path / "f", "mine_empty=true",
                                f"output_dir_empty={full_dir}"))
    assert r["summary"]["empty"] == [] and not full_dir.exists()
    with pytest.raises(UserError, match="output_dir_empty"):
        inference.run(infer_cfg(drone, checkpoints["full"], tmp_path / "g", "mine_empty=true"))


def test_stac_catalog_input_lists_image_items_only(shared):
    import inference

    images = inference.list_images(shared / "data" / "kampala")
    assert [(im.stem, im.path.name) for im in images] == [("81046528", "81046528.tif")]


def test_unreadable_image_and_mismatched_checkpoint_fail_with_one_line(checkpoints, tmp_path):
    import inference

    bad = tmp_path / "broken.tif"
    bad.write_bytes(b"II*\x00 not really a tiff")
    with pytest.raises(UserError) as err:
        inference.run(infer_cfg(bad, checkpoints["b0"], tmp_path / "o"))
    assert str(err.value).startswith("1 of 1 images failed: broken.tif (") and "\n" not in str(err.value)

    good = tmp_path / "img.png"
    import cv2

    cv2.imwrite(str(good), gradient_image(64, 64))
    with pytest.raises(UserError) as err:
        inference.run(infer_cfg(good, checkpoints["b0"], tmp_path / "o", "model_name=efficientnet-b1"))
    assert "b0.pth" in str(err.value) and "\n" not in str(err.value)
    torch.save({"state_dict": {"encoder.bogus": torch.zeros(3)}}, tmp_path / "alien.pth")
    with pytest.raises(UserError) as err:
        inference.run(infer_cfg(good, tmp_path / "alien.pth", tmp_path / "o"))
    assert "alien.pth" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserError, match="multiple of 32"):
        inference.run(infer_cfg(good, checkpoints["b0"], tmp_path / "o", "width=100"))


def test_per_model_widths_and_tta_lists(checkpoints, tmp_path):
    import inference

    cfg = infer_cfg(tmp_path, f"[{checkpoints['b0']},{checkpoints['empty']}]", tmp_path / "o",
                    "widths=[[64],[96]]", "tta=[[none,hflip],[transpose]]")
    eng, records = inference.build_engine(cfg)
    assert [(p.model, p.width, p.tta) for p in eng.passes] == [(0, 64, ("none", "hflip")), (1, 96, ("transpose",))]
    assert len(records) == 2 and records[1]["path"].endswith("empty.pth")


def test_default_data_dir_is_the_demo_test_images():
    import inference

    path = inference.default_data_dir()
    assert path.name == "images" and path.parent.name == "test" and list(Path(path).glob("*.tif"))


def test_outputs_written_inside_data_dir_are_not_taken_as_inputs(checkpoints, tmp_path):
    import cv2

    import inference

    cv2.imwrite(str(tmp_path / "scene.png"), gradient_image(64, 64))
    cfg = infer_cfg(tmp_path, checkpoints["empty"], tmp_path / "out")
    assert inference.run(cfg)["summary"]["predicted"] == 1
    again = inference.run(cfg)
    assert again["summary"] == {"predicted": 0, "skipped": 1, "empty": [], "failed": []}
    assert list(again["images"]) == ["scene"]


def test_a_failure_mid_scene_leaves_no_outputs_behind(drone, checkpoints, tmp_path):
    import inference

    class FailsOnThirdCall(ConstantModel):
        def forward(self, x):
            if len(self.calls) == 2:
                raise RuntimeError("out of memory")
            return super().forward(x)

    with pytest.raises(RuntimeError, match="out of memory"):
        inference.run(infer_cfg(drone, checkpoints["b0"], tmp_path, "batch_size=1"), models=[FailsOnThirdCall()])
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "run.json"]


@pytest.mark.slow
def test_onnxruntime_backend_matches_torch_and_is_cached(drone, checkpoints, tmp_path):
    import inference

    cache = tmp_path / "cache"
    for out, backend in (("o1", "onnxruntime"), ("o2", "auto")):  # auto: the fastest fp32 path by a trial
        run = inference.run(infer_cfg(drone, checkpoints["b0"], tmp_path / out, "tta=[none,transpose]",
                                      f"backend={backend}", f"onnx_cache={cache}", "precision=fp32"))
        assert run["models"][0]["sha256"] == file_sha256(checkpoints["b0"])
    assert run["backend_trial"]["choice"].endswith("fp32") and "torch fp32" in run["backend_trial"]["figures"]
    assert len(list(cache.glob("*.onnx"))) == 1  # exported once, reused by the second run
    bf16 = inference.run(infer_cfg(drone, checkpoints["b0"], tmp_path / "o3", "backend=onnxruntime",
                                   f"onnx_cache={cache}", "precision=bf16"))
    assert bf16["images"]["drone"]["precision"] == "fp32"  # autocast cannot reach ONNX Runtime: told as it is
    with rasterio.open(tmp_path / "o3" / "masks" / "drone.tif") as ds:
        assert (ds.tags()["BUILDINGS_BACKEND"], ds.tags()["BUILDINGS_PRECISION"]) == ("onnxruntime", "fp32")
    ref = inference.run(infer_cfg(drone, checkpoints["b0"], tmp_path / "t2", "tta=[none,transpose]"))
    assert ref["summary"]["predicted"] == 1
    a = read(tmp_path / "t2" / "probabilities" / "drone.tif")[0].astype(int)
    b = read(tmp_path / "o2" / "probabilities" / "drone.tif")[0].astype(int)
    assert np.abs(a - b).max() <= 1


def test_images_are_shared_largest_first_among_ranks():
    import inference

    images = [inference.ImageInput(s, Path(f"{s}.tif")) for s in "abcde"]
    pixels = [100, 900, 400, 400, 50]
    shares = [inference.shard_images(images, pixels, r, 2) for r in (0, 1)]
    assert [[im.stem for im in s] for s in shares] == [["b", "e"], ["a", "c", "d"]]  # loads 950 / 900
    assert inference.shard_images(images, pixels, 0, 1) == images


@pytest.mark.slow
def test_torchrun_inference_shares_images_and_matches_one_process(checkpoints, tmp_path):
    """Three images on two ranks; img2 (two rows of windows, split_windows=1) is split between them."""
    import os
    import subprocess
    import sys

    from lib.cli import REPO_DIR

    data = tmp_path / "images"
    data.mkdir()
    for k, (h, w) in enumerate(((256, 384), (200, 300), (320, 256))):
        write_rgba(data / f"img{k}.tif", gradient_image(h, w, seed=k), np.full((h, w), 255, np.uint8))
    import inference

    args = [f"data_dir={data}", f"model={checkpoints['b0']}", "tile_size=256", "width=64", "overlap=64",
            "progress=false", "cog=false", "backend=torch", "threshold=0.5", "tta=[none,hflip]", "split_windows=1",
            "precision=fp32"]
    inference.run(compose_config("inference", [*args, f"output_dir={tmp_path / 'one'}", "num_threads=1"]))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "inference.py", *args, f"output_dir={tmp_path / 'two'}"],
                          cwd=REPO_DIR, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "3 predicted, 0 already done" in proc.stdout and "(2 processes)" in proc.stdout
    for k in range(3):
        for kind in ("probabilities", "masks"):
            a, pa = read(tmp_path / "one" / kind / f"img{k}.tif")
            b, pb = read(tmp_path / "two" / kind / f"img{k}.tif")
            assert np.array_equal(a, b) and pa["crs"] == pb["crs"] and pa["transform"] == pb["transform"]
        one = json.loads((tmp_path / "one" / "footprints" / f"img{k}.geojson").read_text())["features"]
        two = json.loads((tmp_path / "two" / "footprints" / f"img{k}.geojson").read_text())["features"]
        assert [f["geometry"] for f in one] == [f["geometry"] for f in two]
    run = json.loads((tmp_path / "two" / "run.json").read_text())
    assert sorted(run["images"]) == ["img0", "img1", "img2"]
    assert run["images"]["img2"]["ranks"] == {"0": 2, "1": 1} and len(run["images"]["img0"]["ranks"]) == 1
    assert not list((tmp_path / "two").glob(".run.rank*.json"))  # merged by rank 0, then removed


# --------------------------------------------------------------------------------------------------
# City scale: one scene split among ranks (lib.scene_bands), nodata scenes
# --------------------------------------------------------------------------------------------------

def _city(data: Path) -> None:
    """A 600 x 500 scene with bright roofs on dark ground -- some across the bands' seam (row 344) and
    the windows' seams -- and a nodata corner, beside a small image that is shared whole."""
    rng = np.random.default_rng(4)
    img = rng.integers(40, 90, (600, 500, 3)).astype(np.uint8)
    for y, x, h, w in ((20, 30, 60, 80), (300, 100, 120, 60), (330, 260, 40, 200), (150, 180, 300, 24),
                       (500, 20, 70, 90), (180, 400, 30, 40), (420, 330, 90, 90)):
        img[y:y + h, x:x + w] = 220
    alpha = np.full((600, 500), 255, np.uint8)
    alpha[540:, 400:] = 0
    write_rgba(data / "city.tif", img, alpha)
    write_rgba(data / "small.tif", gradient_image(200, 300, seed=2), np.full((200, 300), 255, np.uint8))


class _DiesMidBand:
    """Rank 1's model in the kill test: once rank 0 has finished its band, the process is killed (-9)
    on its second model call, half-way through its own band."""

    def __init__(self, bands: Path):
        from standins import PooledBrightnessModel

        self.net, self.bands, self.calls = PooledBrightnessModel(), bands, 0

    def __call__(self, x):
        import os
        import signal
        import time

        self.calls += 1
        if self.calls == 2:
            for _ in range(600):
                if list(self.bands.glob("*.json")):
                    os.kill(os.getpid(), signal.SIGKILL)
                time.sleep(0.1)
        return self.net(x)


def _split_worker(rank: int, port: int, data: str, ckpt: str, out: str, kill: bool) -> None:
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from standins import PooledBrightnessModel

    import inference

    torch.set_num_threads(1)
    net = PooledBrightnessModel()
    calls = [0]
    original = net.forward

    def counted(x):
        calls[0] += 1
        return original(x)

    net.forward = counted
    if kill and rank == 1:
        net.forward = _DiesMidBand(Path(out) / ".bands" / "city")
    inference.run(_split_cfg(data, ckpt, out), models=[net])
    Path(f"{out}.calls{rank}").write_text(str(calls[0]))


def _split_cfg(data, ckpt, out):
    return infer_cfg(data, ckpt, out, "split_windows=2", "precision=fp32", "batch_size=2", "min_area=0", "cog=true")


def _two_processes(tmp_path, out: Path, kill: bool = False) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.start_processes(_split_worker, nprocs=2, start_method="spawn", args=(
        port, str(tmp_path / "images"), str(tmp_path / "b0.pth"), str(out), kill))


def _assert_same_outputs(one: Path, two: Path, stems=("city", "small")) -> None:
    for stem in stems:
        for kind in ("probabilities", "masks"):
            with rasterio.open(one / kind / f"{stem}.tif") as a, rasterio.open(two / kind / f"{stem}.tif") as b:
                assert np.array_equal(a.read(), b.read()) and np.array_equal(a.dataset_mask(), b.dataset_mask())
                assert (a.crs, a.transform, a.tags()) == (b.crs, b.transform, b.tags())
                assert b.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        fa = json.loads((one / "footprints" / f"{stem}.geojson").read_text())["features"]
        fb = json.loads((two / "footprints" / f"{stem}.geojson").read_text())["features"]
        assert fa == fb


@pytest.fixture
def city(tmp_path):
    """The city scene and a small image, a stand-in checkpoint file, and a single-process run of them."""
    from standins import PooledBrightnessModel

    import inference
    import model as M
    from lib.checkpoints import save_checkpoint

    (tmp_path / "images").mkdir()
    _city(tmp_path / "images")
    save_checkpoint(tmp_path / "b0.pth", M.build_model("efficientnet-b0", pretrained=False), meta={})
    one = inference.run(_split_cfg(tmp_path / "images", tmp_path / "b0.pth", tmp_path / "one"),
                        models=[PooledBrightnessModel()])
    assert one["images"]["city"]["buildings"] >= 5 and one["images"]["city"]["ranks"] == {"0": 9}
    return tmp_path


@pytest.mark.slow
def test_a_scene_split_between_two_processes_equals_one_process(city):
    _two_processes(city, city / "two")
    _assert_same_outputs(city / "one", city / "two")
    run = json.loads((city / "two" / "run.json").read_text())["images"]
    assert run["city"]["ranks"] == {"0": 6, "1": 6}  # window rows 0-1 and 1-2: row 1 reaches across the seam
    assert run["city"]["windows"] == 12 and run["small"]["ranks"] == {"0": 2}
    one = json.loads((city / "one" / "run.json").read_text())["images"]
    assert run["city"]["fingerprint"] == one["city"]["fingerprint"]  # a single-process rerun keeps it
    assert [run["city"][k] for k in ("cls_prob", "max_prob", "buildings")] == \
        [one["city"][k] for k in ("cls_prob", "max_prob", "buildings")]
    assert not (city / "two" / ".bands").exists() and not list((city / "two").glob(".run.rank*"))
    assert (city / "two.calls0").read_text() != "0" and (city / "two.calls1").read_text() != "0"


@pytest.mark.slow
def test_a_rank_killed_mid_scene_leaves_only_its_band_to_the_rerun(city):
    with pytest.raises(torch.multiprocessing.ProcessExitedException, match="SIGKILL"):
        _two_processes(city, city / "two", kill=True)
    bands = sorted(p.name for p in (city / "two" / ".bands" / "city").glob("*.json"))
    assert bands == ["0-344.json"]  # rank 0's band is finished, rank 1's is not
    _two_processes(city, city / "two")
    assert (city / "two.calls0").read_text() == "0"  # rank 0: its band and the small image were done
    assert (city / "two.calls1").read_text() != "0"
    _assert_same_outputs(city / "one", city / "two")
    run = json.loads((city / "two" / "run.json").read_text())["images"]
    assert run["city"]["ranks"] == {"0": 6, "1": 6} and not (city / "two" / ".bands").exists()


def test_a_scene_without_imagery_is_skipped_window_by_window_and_still_written(checkpoints, tmp_path):
    import geopandas as gpd

    import inference

    write_rgba(tmp_path / "void.tif", gradient_image(300, 520), np.zeros((300, 520), np.uint8))
    model = ConstantModel(0.9)
    run = inference.run(infer_cfg(tmp_path / "void.tif", checkpoints["b0"], tmp_path / "out"), models=[model])
    record = run["images"]["void"]
    assert model.calls == []  # no window reached the model
    assert (record["windows"], record["skipped_nodata_windows"], record["buildings"]) == (0, 6, 0)
    assert record["max_prob"] == 0 and record["cls_prob"] is None and record["ranks"] == {"0": 0}
    for kind in ("probabilities", "masks"):
        with rasterio.open(tmp_path / "out" / kind / "void.tif") as ds:
            assert ds.read(1).max() == 0 and ds.dataset_mask().max() == 0 and (ds.height, ds.width) == (300, 520)
    assert len(gpd.read_file(tmp_path / "out" / "footprints" / "void.geojson")) == 0
    assert (tmp_path / "out" / "stac" / "void.json").is_file()


# --------------------------------------------------------------------------------------------------
# Instances (touching buildings separated) and post-processing resolution
# --------------------------------------------------------------------------------------------------

class RoofsModel(torch.nn.Module):
    """Instance head from the input colours: building where red is bright, border where green is,
    no contact anywhere. Stride 4, like the real network; `config` says it has the head."""

    def __init__(self):
        super().__init__()
        self.config = {"instance_head": True}

    def forward(self, x):
        pooled = torch.nn.functional.avg_pool2d(x, 4)
        seg = torch.cat([torch.zeros_like(pooled[:, :1]), 5.0 * pooled[:, :1]], 1)
        instance = torch.cat([5.0 * pooled[:, 1:2], torch.full_like(pooled[:, :1], -10.0)], 1)
        return {"seg": seg, "cls": seg.mean((2, 3)), "instance": instance}


def _two_touching_roofs(path):
    """Two 64 x 64 px roofs sharing the column 96 wall (0.5 m pixels, EPSG:32632), the wall painted green."""
    from rasterio.transform import from_origin

    img = np.zeros((3, 128, 192), np.uint8)
    img[0, 32:96, 32:160] = 255
    img[1, 32:96, 92:100] = 255
    profile = {"driver": "GTiff", "width": 192, "height": 128, "count": 3, "dtype": "uint8", "crs": "EPSG:32632",
               "transform": from_origin(500000, 4000000, 0.5, 0.5)}
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(img)
    return path


def test_touching_roofs_become_two_footprints_with_the_instance_head_and_one_without(checkpoints, tmp_path):
    import geopandas as gpd

    import inference

    image = _two_touching_roofs(tmp_path / "roofs.tif")
    runs = {}
    for mode in ("auto", "false"):
        out = tmp_path / mode
        runs[mode] = inference.run(infer_cfg(image, checkpoints["b0"], out, "width=256", f"instances={mode}",
                                             "precision=fp32", "vector_format=geojson"),
                                   models=[RoofsModel()])
        runs[mode]["footprints"] = gpd.read_file(out / "footprints" / "roofs.geojson")
    assert len(runs["auto"]["footprints"]) == 2 and len(runs["false"]["footprints"]) == 1
    assert runs["auto"]["footprints"].to_crs(32632).area.tolist() == pytest.approx([1024, 1024], rel=0.03)  # 32 m side
    on, off = runs["auto"]["images"]["roofs"], runs["false"]["images"]["roofs"]
    assert (on["settings"]["instances"], off["settings"]["instances"], runs["auto"]["instances"]) == ("on", "off", "on")
    with rasterio.open(image) as src, rasterio.open(tmp_path / "auto" / "instances" / "roofs.tif") as ds:
        assert (ds.count, ds.dtypes, ds.crs, ds.transform) == (2, ("uint8", "uint8"), src.crs, src.transform)
        border, contact = ds.read()
        assert border[60, 96] > 200 and border[60, 50] < 20 and contact.max() < 5
        assert ds.tags()["BUILDINGS_INSTANCES"] == "on"
    assert not (tmp_path / "false" / "instances").exists()
    item = json.loads((tmp_path / "auto" / "stac" / "roofs.json").read_text())
    assert "instances" in item["assets"] and item["properties"]["buildings:instances"] == "on"


def test_instances_true_without_the_head_says_so_in_one_line_and_gives_components(checkpoints, tmp_path, capsys):
    import inference

    image = _two_touching_roofs(tmp_path / "roofs.tif")
    result = inference.run(infer_cfg(image, checkpoints["b0"], tmp_path / "o", "instances=true"),
                           models=[ConstantModel(0.9)])
    err = capsys.readouterr().err
    assert f"{checkpoints['b0']}: no instance head; footprints are the mask's connected components" in err
    assert result["instances"] == "off" and result["images"]["roofs"]["buildings"] == 1
    with pytest.raises(UserError, match="instances=maybe"):
        inference.run(infer_cfg(image, checkpoints["b0"], tmp_path / "o", "instances=maybe"),
                      models=[ConstantModel(0.9)])


def test_threshold_given_beats_the_checkpoints_tuned_one_which_beats_the_default(checkpoints, tmp_path):
    import inference

    image = _two_touching_roofs(tmp_path / "roofs.tif")
    tuned = ConstantModel(0.7)
    tuned.meta = {"postprocess": {"threshold": 0.8, "min_area": 2.0, "metric": 0.5}}
    cases = {"tuned": ([], tuned, 0.8, 0), "given": (["threshold=0.56"], tuned, 0.56, 255),
             "default": ([], ConstantModel(0.7), 0.5, 255)}
    for name, (extra, net, threshold, mask_value) in cases.items():
        out = tmp_path / name
        result = inference.run(infer_cfg(image, checkpoints["b0"], out, *extra), models=[net])
        settings = result["images"]["roofs"]["settings"]
        source = "tuned" if name == "tuned" else name
        assert (result["threshold"], settings["threshold"]) == (threshold, threshold)
        assert settings["postprocess_source"]["threshold"] == source
        assert settings["min_area"] == (4.0 if net is not tuned else 2.0)
        with rasterio.open(out / "masks" / "roofs.tif") as ds:
            assert ds.read(1).max() == mask_value
            assert float(ds.tags()["BUILDINGS_THRESHOLD"]) == threshold
            assert f"threshold={source}" in ds.tags()["BUILDINGS_POSTPROCESS_SOURCE"]


@pytest.mark.slow
def test_a_b0_checkpoint_with_the_instance_head_turns_instances_on_and_its_maps_are_written(tmp_path):
    import inference
    import model as M
    from lib.checkpoints import save_checkpoint
    from lib.segmentation import BORDER, CONTACT, has_instance_head

    torch.manual_seed(0)
    net = M.build_model("efficientnet-b0", pretrained=False, instance_head=True)
    save_checkpoint(tmp_path / "inst.pth", net)
    image = _two_touching_roofs(tmp_path / "roofs.tif")
    cfg = infer_cfg(image, tmp_path / "inst.pth", tmp_path / "o")
    eng, _ = inference.build_engine(cfg)
    assert has_instance_head(eng.models[0]) and eng.decoder.maps[1:] == (BORDER, CONTACT)
    assert not has_instance_head(M.build_model("efficientnet-b0", pretrained=False))
    result = inference.run(cfg)
    assert result["instances"] == "on" and (tmp_path / "o" / "instances" / "roofs.tif").is_file()


def _terraces(path, rows: int = 3, houses: int = 6, side: int = 64):
    """Rows of `houses` touching roofs (side x side px, 0.5 m, EPSG:32632), every shared wall painted green."""
    from rasterio.transform import from_origin

    h, w = 32 + rows * (side + 32), 64 + houses * side
    img = np.zeros((3, h, w), np.uint8)
    for r in range(rows):
        top = 32 + r * (side + 32)
        img[0, top:top + side, 32:32 + houses * side] = 255
        for k in range(1, houses):
            img[1, top:top + side, 32 + k * side - 4:32 + k * side + 4] = 255
    profile = {"driver": "GTiff", "width": w, "height": h, "count": 3, "dtype": "uint8", "crs": "EPSG:32632",
               "transform": from_origin(500000, 4000000, 0.5, 0.5)}
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(img)
    return path, rows * houses


def test_buildings_across_window_and_block_seams_come_out_once_each_and_whole(checkpoints, tmp_path):
    """Windows of 96 px with 32 px overlap cut through every roof; one window over the whole scene does not.
    Both give every house exactly once, in one piece, with the same outlines."""
    import geopandas as gpd

    import inference

    image, n = _terraces(tmp_path / "terraces.tif")
    found = {}
    for name, tiling in {"seams": ("tile_size=96", "width=96", "overlap=32"),
                         "whole": ("tile_size=512", "width=512", "overlap=0")}.items():
        out = tmp_path / name
        inference.run(infer_cfg(image, checkpoints["b0"], out, *tiling, "precision=fp32", "vector_format=geojson",
                                "regularize=false", "simplify=0"), models=[RoofsModel()])
        found[name] = gpd.read_file(out / "footprints" / "terraces.geojson").to_crs(32632)
    for frame in found.values():
        assert len(frame) == n and (frame.geom_type == "Polygon").all()
        assert frame.area.tolist() == pytest.approx([1024] * n, rel=0.05)  # 32 m x 32 m houses, not halves
    ious = [max(g.intersection(t).area / g.union(t).area for t in found["whole"].geometry)
            for g in found["seams"].geometry]
    assert min(ious) > 0.98  # the same outline, whichever windows cut it


def test_the_progress_record_is_rewritten_at_most_every_few_seconds_and_at_the_end(checkpoints, tmp_path,
                                                                                   monkeypatch):
    """run.json holds every image: one rewrite per image would cost O(images^2) on a city's folder."""
    import cv2

    import inference

    data = tmp_path / "images"
    data.mkdir()
    for i in range(3):
        cv2.imwrite(str(data / f"tile{i}.png"), gradient_image(40, 50))
    writes = []
    real = inference._write_run
    monkeypatch.setattr(inference, "_write_run", lambda path, info, done: (writes.append(len(done)),
                                                                         real(path, info, done)))
    monkeypatch.setattr(inference, "PROGRESS_EVERY_S", 3600.0)
    out = inference.run(infer_cfg(data, checkpoints["empty"], tmp_path / "slow"))
    assert writes == [1, 3, 3] and len(out["images"]) == 3  # the first image, the end, run()'s final record
    writes.clear()
    monkeypatch.setattr(inference, "PROGRESS_EVERY_S", 0.0)
    inference.run(infer_cfg(data, checkpoints["empty"], tmp_path / "fast"))
    assert writes == [1, 2, 3, 3, 3]


def test_images_finished_by_several_threads_equal_one_thread_and_settle_in_order(checkpoints, tmp_path):
    """finish_workers=3 (COGs, footprints and STAC items of several images at once) writes the same files as
    one thread, records the images in their order in run.json, and still sets an unreadable one aside."""
    import inference

    data = tmp_path / "images"
    data.mkdir()
    for k, (h, w) in enumerate(((256, 384), (200, 300), (320, 256), (128, 128), (300, 200))):
        write_rgba(data / f"img{k}.tif", gradient_image(h, w, seed=k), np.full((h, w), 255, np.uint8))
    (data / "img2b.tif").write_bytes(b"II*\x00 not really a tiff")
    runs = {}
    for workers in (1, 3):
        out = tmp_path / f"w{workers}"
        with pytest.raises(UserError, match="1 of 6 images failed: img2b.tif"):
            inference.run(infer_cfg(data, checkpoints["b0"], out, "cog=true", f"finish_workers={workers}"))
        runs[workers] = json.loads((out / "run.json").read_text())
    stems = ["img0", "img1", "img2", "img3", "img4"]
    assert list(runs[1]["images"]) == list(runs[3]["images"]) == ["img2b", *stems]  # set aside first
    assert runs[3]["images"]["img2b"]["status"] == "failed"
    for stem in stems:
        assert runs[1]["images"][stem]["fingerprint"] == runs[3]["images"][stem]["fingerprint"]
        for kind in ("probabilities", "masks"):
            a, pa = read(tmp_path / "w1" / kind / f"{stem}.tif")
            b, pb = read(tmp_path / "w3" / kind / f"{stem}.tif")
            assert np.array_equal(a, b) and pa["transform"] == pb["transform"]
        one, three = (json.loads((tmp_path / w / "footprints" / f"{stem}.geojson").read_text())["features"]
                      for w in ("w1", "w3"))
        assert [f["geometry"] for f in one] == [f["geometry"] for f in three]
        assert (tmp_path / "w3" / "stac" / f"{stem}.json").is_file()


def test_finish_workers_is_auto_or_a_positive_count(drone, checkpoints, tmp_path):
    import inference

    for bad in ("0", "-2", "many", "1.5"):
        with pytest.raises(UserError, match=f"finish_workers must be auto or a number of threads >= 1, not {bad}$"):
            inference.run(infer_cfg(drone, checkpoints["b0"], tmp_path / "o", f"finish_workers={bad}"))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("error", [RuntimeError("device lost"), KeyboardInterrupt()], ids=["model", "ctrl-c"])
def test_a_model_failure_with_images_still_finishing_keeps_the_finished_ones_and_a_rerun_completes(
        checkpoints, tmp_path, error):
    """The model fails (or the user presses Ctrl-C) on the fourth of six images while three finishing
    threads still hold earlier ones: the run stops with that error, every image is all its outputs or
    none (no temporary files), run.json vouches for the three finished images so a rerun skips them, and
    the rerun ends where an uninterrupted run ends."""
    import inference

    data = tmp_path / "images"
    data.mkdir()
    for k in range(6):
        write_rgba(data / f"img{k}.tif", gradient_image(192, 160, seed=k), np.full((192, 160), 255, np.uint8))

    class FailsOnFourthImage(ConstantModel):
        def forward(self, x):
            if len(self.calls) == 3:
                raise error
            return super().forward(x)

    out = tmp_path / "out"
    args = ("cog=true", "finish_workers=3", "tile_size=256", "precision=fp32")  # one model call per image
    with pytest.raises(type(error)):
        inference.run(infer_cfg(data, checkpoints["b0"], out, *args), models=[FailsOnFourthImage()])
    assert not [p for p in out.rglob(".*") if p.is_file()]  # no temporary file left
    kinds = ("probabilities", "masks", "footprints", "stac")
    for k in range(6):
        present = [any((out / kind).glob(f"img{k}.*")) for kind in kinds]
        assert all(present) == (k < 3) and any(present) == (k < 3), (k, present)
    recorded = json.loads((out / "run.json").read_text())["images"]
    assert list(recorded) == ["img0", "img1", "img2"]
    assert all(r["status"] == "done" and r["buildings"] >= 0 for r in recorded.values())
    again = inference.run(infer_cfg(data, checkpoints["b0"], out, *args), models=[ConstantModel()])
    clean = inference.run(infer_cfg(data, checkpoints["b0"], tmp_path / "clean", *args), models=[ConstantModel()])
    assert again["summary"]["skipped"] == 3 and again["summary"]["predicted"] == 3
    assert clean["summary"]["predicted"] == 6
    for k in range(6):
        a, _ = read(out / "masks" / f"img{k}.tif")
        b, _ = read(tmp_path / "clean" / "masks" / f"img{k}.tif")
        assert np.array_equal(a, b)
    assert list(json.loads((out / "run.json").read_text())["images"]) == [f"img{k}" for k in range(6)]

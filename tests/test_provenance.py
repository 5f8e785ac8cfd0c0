"""Every inference output tells how it was made: GSD matching, per-image provenance, the re-run rule,
precision, STAC items, fault isolation and nodata masks (inference.py, lib.provenance, lib.stac_outputs)."""

import json

import numpy as np
import pytest
import rasterio
import torch
from standins import ConstantModel, gradient_image, infer_cfg, read, write_rgba

from lib import geo_io
from lib.cli import compose_config
from lib.files import file_sha256
from lib.provenance import effective_tta

torch.set_num_threads(1)
TINY_TRAIN = ["arch=b0", "pretrained=false", "width=64", "batch_size=2", "num_workers=0", "threads=1",
              "progress=false", "augment=light", "max_steps=1"]


def _gsd(path):
    with rasterio.open(path) as ds:
        return geo_io.raster_gsd(ds)


def _run_json(out):
    return json.loads((out / "run.json").read_text())


@pytest.mark.slow
def test_a_model_trained_with_ref_scale_is_matched_to_the_image_gsd_by_default(chips, drone, tmp_path, capsys):
    import inference
    import train

    train.run(compose_config("train", [*TINY_TRAIN, f"data_dir={chips}", "ref_scale=0.3",
                                       f"output_dir={tmp_path / 'run'}"]))
    ckpt = tmp_path / "run" / "last.pth"
    meta = torch.load(ckpt, weights_only=True)["meta"]
    assert (meta["model_gsd"], meta["model_gsd_source"], meta["train_gsd"]) == (0.3, "ref_scale", 0.1)
    inference.run(infer_cfg(drone, ckpt, tmp_path / "o"))
    expected = 64 / 256 * _gsd(drone) / 0.3
    record = _run_json(tmp_path / "o")["images"]["drone"]
    assert record["settings"]["factor"] == [pytest.approx(expected, abs=1e-6)]
    assert record["models"][0]["model_gsd"] == 0.3 and record["models"][0]["model_gsd_source"] == "ref_scale"
    printed = capsys.readouterr().out
    assert f"drone.tif: factor {expected:.4g} (64/256 x image {_gsd(drone):.4g} / model 0.3 m/px (ref_scale))" in printed
    with rasterio.open(tmp_path / "o" / "probabilities" / "drone.tif") as ds:
        assert float(ds.tags()["BUILDINGS_FACTOR"]) == pytest.approx(expected, rel=1e-5)
        assert ds.tags()["BUILDINGS_MODEL_GSD"] == "0.3"
    off = inference.run(infer_cfg(drone, ckpt, tmp_path / "off", "match_gsd=false"))
    assert off["images"]["drone"]["settings"]["factor"] == [0.25]


def test_checkpoints_without_a_gsd_keep_width_over_tile_and_say_so(drone, checkpoints, tmp_path, capsys):
    import inference

    r = inference.run(infer_cfg(drone, checkpoints["full"], tmp_path))
    record = r["images"]["drone"]
    assert record["settings"]["factor"] == [0.25] and record["settings"]["model_gsd"] == [None]
    assert record["settings"]["image_gsd"] == pytest.approx(_gsd(drone), abs=1e-6)
    assert "drone.tif: factor 0.25 (64/256; model GSD unknown)" in capsys.readouterr().out
    with rasterio.open(tmp_path / "masks" / "drone.tif") as ds:
        assert ds.tags()["BUILDINGS_MODEL_GSD"] == "unknown"


@pytest.mark.slow
def test_rerun_recomputes_on_changed_settings_skips_same_ones_and_tags_agree_with_run_json(
        drone, checkpoints, tmp_path, capsys):
    import inference

    inference.run(infer_cfg(drone, checkpoints["full"], tmp_path, "threshold=0.5", "precision=fp32"))
    second = inference.run(infer_cfg(drone, checkpoints["empty"], tmp_path, "threshold=0.7", "precision=fp32"))
    assert second["summary"]["predicted"] == 1
    assert "recomputing drone.tif: models changed, threshold changed (0.5 -> 0.7)" in capsys.readouterr().out
    record = _run_json(tmp_path)["images"]["drone"]
    for kind in ("probabilities", "masks"):
        with rasterio.open(tmp_path / kind / "drone.tif") as ds:
            tags = ds.tags()
            assert float(tags["BUILDINGS_THRESHOLD"]) == record["settings"]["threshold"] == 0.7
            assert tags["BUILDINGS_MODELS"] == f"empty.pth:sha256={file_sha256(checkpoints['empty'])[:16]}"
            assert tags["BUILDINGS_SETTINGS_FINGERPRINT"] == record["fingerprint"]
            assert (tags["BUILDINGS_PRECISION"], tags["BUILDINGS_BACKEND"]) == ("fp32", "torch")
            assert ds.read(1).max() == 0  # the empty model's outputs, not the full one's
    third = inference.run(infer_cfg(drone, checkpoints["empty"], tmp_path, "threshold=0.7", "precision=fp32"))
    assert third["summary"]["skipped"] == 1 and third["summary"]["predicted"] == 0
    assert "drone.tif: finished with the same settings; skipped" in capsys.readouterr().out
    fourth = inference.run(infer_cfg(drone, checkpoints["empty"], tmp_path, "threshold=0.7", "precision=fp32",
                                     "simplify=2.0"))
    assert fourth["summary"]["predicted"] == 1  # a footprint option changes the outputs too


def test_precision_used_is_per_image_in_the_log_tags_and_run_json(drone, checkpoints, tmp_path, capsys):
    import inference

    r = inference.run(infer_cfg(drone, checkpoints["b0"], tmp_path, "precision=auto"))
    used = r["images"]["drone"]["precision"]
    assert used in ("fp32", "bf16") and used != "auto"
    assert f"; precision {used};" in capsys.readouterr().out
    with rasterio.open(tmp_path / "probabilities" / "drone.tif") as ds:
        assert ds.tags()["BUILDINGS_PRECISION"] == used


def test_export_built_in_tta_is_what_the_outputs_say():
    assert effective_tta(["none"], ["none", "hflip"]) == ["none", "hflip"]
    assert effective_tta(["none", "vflip"], None) == ["none", "vflip"]
    assert effective_tta(["hflip"], ["none", "vflip"]) == ["hflip+none", "hflip+vflip"]


def test_each_scene_gets_a_stac_item_in_a_catalog_that_pystac_reads_back(drone, checkpoints, tmp_path):
    import pystac
    from pystac.extensions.projection import ProjectionExtension

    import inference

    inference.run(infer_cfg(drone, checkpoints["full"], tmp_path, "cog=true"))
    catalog = pystac.read_file(str(tmp_path / "stac" / "catalog.json"))
    items = list(catalog.get_items())
    assert [i.id for i in items] == ["drone"]
    item = items[0]
    with rasterio.open(drone) as ds:
        from rasterio.warp import transform_bounds

        left, bottom, right, top = transform_bounds(ds.crs, "EPSG:4326", *ds.bounds)
        transform, shape = list(ds.transform)[:6], [ds.height, ds.width]
    assert item.bbox == pytest.approx([left, bottom, right, top], abs=1e-6)
    proj = ProjectionExtension.ext(item)
    assert (proj.epsg, proj.transform, proj.shape) == (32632, pytest.approx(transform), shape)
    assets = item.assets
    assert set(assets) == {"probability", "mask", "footprints", "footprints_native"}
    assert assets["probability"].media_type == "image/tiff; application=geotiff; profile=cloud-optimized"
    assert assets["footprints"].media_type == "application/geo+json" and assets["mask"].roles == ["data"]
    assert assets["mask"].href == "../masks/drone.tif"  # relative: the run folder can move
    with rasterio.open(assets["probability"].get_absolute_href()) as ds:
        assert ds.crs == 32632
    record = _run_json(tmp_path)["images"]["drone"]
    assert item.properties["buildings:fingerprint"] == record["fingerprint"]
    assert item.properties["buildings:models"][0]["sha256"] == file_sha256(checkpoints["full"])
    assert item.properties["buildings:factor"] == [0.25] and item.common_metadata.gsd == pytest.approx(_gsd(drone))
    assert item.get_single_link("derived_from").href == str(drone.resolve())


def test_an_unreadable_image_is_reported_skipped_and_retried_while_the_others_are_predicted(
        drone, checkpoints, tmp_path, capsys):
    import inference

    data = tmp_path / "images"
    data.mkdir()
    (data / "a_truncated.tif").write_bytes(drone.read_bytes()[:5000])
    for k in range(2):
        (data / f"good{k}.tif").write_bytes(drone.read_bytes())
    with pytest.raises(inference.ImagesFailed) as err:
        inference.run(infer_cfg(data, checkpoints["empty"], tmp_path / "o"))
    assert str(err.value).startswith("1 of 3 images failed: a_truncated.tif (")
    assert err.value.record["summary"]["predicted"] == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "a_truncated" in line]
    assert len(errors) == 1 and errors[0].count("a_truncated.tif") == 1
    run = _run_json(tmp_path / "o")
    assert run["images"]["a_truncated"]["status"] == "failed" and run["images"]["good0"]["status"] == "done"
    assert not list((tmp_path / "o").rglob("a_truncated*"))  # nothing half-written
    (data / "a_truncated.tif").write_bytes(drone.read_bytes())  # the user fixes the file
    again = inference.run(infer_cfg(data, checkpoints["empty"], tmp_path / "o"))
    assert again["summary"] == {"predicted": 1, "skipped": 2, "empty": [], "failed": []}
    assert "recomputing a_truncated.tif: it failed last time" in capsys.readouterr().out


@pytest.mark.slow
def test_command_line_exits_1_with_a_summary_when_an_image_fails(checkpoints, tmp_path):
    import os
    import subprocess
    import sys

    from lib.cli import REPO_DIR

    data = tmp_path / "images"
    data.mkdir()
    (data / "bad.tif").write_bytes(b"II*\x00 not a tiff")
    rgb = gradient_image(64, 64)
    write_rgba(data / "good.tif", rgb, np.full((64, 64), 255, np.uint8))
    proc = subprocess.run([sys.executable, "inference.py", f"data_dir={data}", f"model={checkpoints['empty']}",
                           f"output_dir={tmp_path / 'o'}", "tile_size=64", "width=64", "progress=false",
                           "backend=torch", "cog=false"], cwd=REPO_DIR, capture_output=True, text=True,
                          timeout=120, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: 1 of 2 images failed: bad.tif (")
    assert (tmp_path / "o" / "masks" / "good.tif").is_file()


def test_outputs_are_transparent_exactly_where_the_input_has_no_imagery(checkpoints, tmp_path):
    import inference

    rgb = gradient_image(300, 420)
    alpha = np.full((300, 420), 255, np.uint8)
    alpha[:, 300:] = 0
    alpha[50:80, 20:120] = 0
    src = write_rgba(tmp_path / "scene.tif", rgb, alpha)
    inference.run(infer_cfg(src, checkpoints["empty"], tmp_path / "o", "cog=true"))
    with rasterio.open(src) as ds:
        crs, transform = ds.crs, ds.transform
    for kind in ("probabilities", "masks"):
        with rasterio.open(tmp_path / "o" / kind / "scene.tif") as ds:
            assert np.array_equal(ds.dataset_mask() == 0, alpha == 0)
            assert (ds.crs, ds.transform) == (crs, transform)
    prob, _ = read(tmp_path / "o" / "probabilities" / "scene.tif")
    assert prob[alpha > 0].max() == 0  # probability 0 of imaged pixels is not nodata


def test_programmatic_models_record_their_own_provenance(drone, tmp_path):
    import inference

    net = ConstantModel(0.9)
    net.meta = {"model_gsd": 0.118, "model_gsd_source": "train_gsd"}
    path = tmp_path / "stand-in.pth"
    torch.save({"state_dict": {}}, path)
    r = inference.run(infer_cfg(drone, path, tmp_path / "o"), models=[net])
    settings = r["images"]["drone"]["settings"]
    assert settings["factor"] == [pytest.approx(0.25 * _gsd(drone) / 0.118, abs=1e-6)]


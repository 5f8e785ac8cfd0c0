"""benchmarks/folder_rate.py: steady images/s of finished folder runs, after each process's first image."""

import json
import os
import shutil

import pytest
from standins import benchmark_module, infer_cfg


def _folder_rate():
    return benchmark_module("folder_rate")


@pytest.mark.parametrize(("times", "processes", "rate"), [
    ([0.0, 1.0, 2.0, 3.0, 4.0], 1, 1.0),  # 4 images in the 4 s after the first
    ([0.0, 1.0, 1.5, 2.0, 3.0], 2, 1.5),  # both warm-up images left out: 3 images in the 2 s after the second
    ([10.0, 30.0, 31.0, 32.0], 1, 1.5 / 11),  # a slow first image is not counted, the wait after it is
])
def test_the_rate_counts_the_images_done_after_each_process_has_done_one(times, processes, rate):
    assert _folder_rate().steady_rate(times, processes) == pytest.approx(rate)


@pytest.mark.parametrize(("times", "processes"), [([], 1), ([0.0, 1.0], 1), ([0.0, 1.0, 2.0], 2),
                                                  ([5.0, 5.0, 5.0], 1)])
def test_too_few_images_to_time_give_no_rate(times, processes):
    assert _folder_rate().steady_rate(times, processes) is None


def test_a_real_folder_run_is_timed_from_its_stac_items(drone, checkpoints, tmp_path, capsys):
    """Every done image of a real run has the STAC item whose time is read; the figure printed is the
    steady rate and its share of the model-only images/s in bench_inference.py's results."""
    import inference

    fr = _folder_rate()
    images = tmp_path / "images"
    images.mkdir()
    for stem in ("a", "b", "c", "d"):
        shutil.copy(drone, images / f"{stem}.tif")
    out = tmp_path / "out"
    assert inference.run(infer_cfg(images, checkpoints["full"], out))["summary"]["predicted"] == 4
    times, ranks = fr.finish_times(out)
    assert len(times) == 4 and times == sorted(times) and ranks == 1
    for i, stem in enumerate("abcd"):  # finished at 100, 102, 103, 104 s
        os.utime(out / "stac" / f"{stem}.json", (100.0 + i + (i > 0), 100.0 + i + (i > 0)))
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"pipeline_vs_model": [{"model_only_images_s": 2.0}]}))
    capsys.readouterr()  # the run's own lines
    fr.main([str(out), str(tmp_path / "missing"), "--model-only", str(results)])
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("model alone: 2.00 images/s")
    assert printed[1] == f"{out}: 1 process, 4 images, steady 0.75 images/s,  37.5 % of the model alone"
    assert printed[2] == f"{tmp_path / 'missing'}: no finished images in its run.json"
    run = json.loads((out / "run.json").read_text())
    run["images"] = {"a": run["images"]["a"]}  # one image left: nothing to time after it
    (out / "run.json").write_text(json.dumps(run))
    fr.main([str(out)])
    assert capsys.readouterr().out == f"{out}: 1 image on 1 process: too few to time after the warm-up\n"
    (out / "stac" / "a.json").unlink()
    fr.main([str(out), "--model-only", str(tmp_path / "none.json")])
    assert capsys.readouterr().out.splitlines() == [
        f"{tmp_path / 'none.json'}: no model-only images/s (bench_inference.py section 2) in it",
        f"{out / 'stac' / 'a.json'}: missing, so {out} cannot be timed"]

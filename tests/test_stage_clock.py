"""benchmarks/stage_clock.py: the CPU of inference.py's stages beside the model, and the serial stages' limits."""

import shutil
import threading

import pytest
from standins import benchmark_module, infer_cfg


def _stage_clock():
    return benchmark_module("stage_clock")


def test_a_folder_run_is_split_into_its_stages_and_everything_is_put_back(drone, checkpoints, tmp_path):
    """Every stage of a real two-image run is timed (the lock too), the CPU stages are what the run spent,
    the serial limits are 1 / seconds, and after the block the lock, the engine and inference.py are the
    originals again (a later run is not timed)."""
    import inference
    from lib import geo_io
    from lib.raster_outputs import SceneWriter
    from lib.tiling import Engine

    sc = _stage_clock()
    images = tmp_path / "images"
    images.mkdir()
    for stem in ("a", "b"):
        shutil.copy(drone, images / f"{stem}.tif")
    originals = (geo_io.GDAL_LOCK, inference.start_image, Engine._prepare, SceneWriter.add)
    clock = sc.StageClock()
    with clock.watching(inference):
        assert isinstance(geo_io.GDAL_LOCK, sc._TimedLock)
        result = inference.run(infer_cfg(images, checkpoints["full"], tmp_path / "out", "cog=true"))
    assert result["summary"]["predicted"] == 2
    assert (geo_io.GDAL_LOCK, inference.start_image, Engine._prepare, SceneWriter.add) == originals
    assert isinstance(geo_io.GDAL_LOCK, type(threading.RLock()))

    per = clock.per_image(2)
    stages = [label for label, _, _ in sc.STAGES] + [sc.FINISH_STAGE, sc.MAIN_STAGE, sc.OTHER_STAGE, sc.LOCK_STAGE]
    assert list(per) == stages
    for stage in stages[:2] + [sc.FINISH_STAGE, sc.MAIN_STAGE, sc.LOCK_STAGE]:
        assert per[stage] > 0, stage
    limits = clock.serial_limits(2)
    assert limits[sc.FINISH_STAGE] == pytest.approx(1 / per[sc.FINISH_STAGE])
    assert limits[sc.LOCK_STAGE] == pytest.approx(1 / per[sc.LOCK_STAGE])

    before = dict(clock.seconds)
    inference.run(infer_cfg(images, checkpoints["full"], tmp_path / "again", "cog=true"))
    assert clock.seconds == before


def test_the_timed_lock_counts_only_the_outermost_hold_and_stays_reentrant():
    import time

    sc = _stage_clock()
    clock = sc.StageClock()
    lock = sc._TimedLock(threading.RLock(), clock)
    with lock:
        with lock:  # the engine's GDAL calls nest (an RLock)
            time.sleep(0.02)
        time.sleep(0.02)
    assert 0.04 <= clock.seconds[sc.LOCK_STAGE] < 0.2
    done = []
    worker = threading.Thread(target=lambda: (lock.__enter__(), done.append(1), lock.__exit__(None, None, None)))
    worker.start()
    worker.join(5)
    assert done == [1]  # released: another thread takes it

"""lib.distributed: identity without torchrun, and real collectives in a two-process gloo group; lib.scene_bands:
how work is cut and shared among ranks, and the partial files of a split scene."""

import json
import os
import socket
from pathlib import Path

import pytest
import torch

from lib import distributed
from lib.distributed import (
    Dist,
    all_reduce,
    broadcast_object,
    gather_object,
    gpu_index,
    leave_process_group,
    setup_distributed,
)
from lib.errors import UserError


def test_without_torchrun_a_process_is_rank_0_of_1_and_collectives_are_the_identity(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    d, device = setup_distributed("cpu")
    assert (d.rank, d.world, d.local_rank, d.main, d.enabled) == (0, 1, 0, True, False)
    assert device == torch.device("cpu") and not torch.distributed.is_initialized()
    assert all_reduce([1.5, 2.0], d, device) == [1.5, 2.0]
    assert broadcast_object({"a": 1}, d) == {"a": 1}
    assert gather_object("x", d) == ["x"]
    leave_process_group(d)  # nothing to leave


def test_torchrun_environment_sets_rank_and_world():
    d = Dist(rank=1, world=4, local_rank=1)
    assert not d.main and d.enabled


def test_gpu_index_shares_gpus_in_turn_for_inference_and_refuses_extra_training_processes():
    assert [gpu_index(r, 1, share=True) for r in range(4)] == [0, 0, 0, 0]
    assert [gpu_index(r, 2, share=True) for r in range(5)] == [0, 1, 0, 1, 0]
    assert [gpu_index(r, 4, share=False) for r in range(4)] == [0, 1, 2, 3]
    with pytest.raises(UserError, match="more processes on this node than it has GPUs \\(2\\).*--nproc_per_node=2"):
        gpu_index(2, 2, share=False)
    with pytest.raises(UserError, match="no GPU is visible"):
        gpu_index(0, 0, share=True)


@pytest.mark.parametrize("share", [True, False])
def test_torchrun_ranks_on_one_gpu_join_a_gloo_group_for_inference_and_fail_clearly_for_training(monkeypatch,
                                                                                               share):
    """Four ranks on a node with one GPU (CUDA faked: these machines have none): inference puts all on
    cuda:0 in a gloo group (NCCL refuses two ranks on one GPU); training stops before joining any group."""
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    joined, selected = [], []
    monkeypatch.setattr(distributed, "resolve_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", selected.append)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend, **kw: joined.append((backend, kw)))
    if not share:
        with pytest.raises(UserError, match="one process per GPU"):
            setup_distributed("cuda", share_gpus=False)
        assert not joined and not selected
        return
    d, device = setup_distributed("cuda", share_gpus=True)
    assert (d.rank, d.world, d.local_rank) == (3, 4, 3)
    assert device == torch.device("cuda", 0) and selected == [device]
    assert [b for b, _ in joined] == ["gloo"] and "device_id" not in joined[0][1]


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    d, device = setup_distributed("cpu")
    result = {"sum": all_reduce([rank + 1.0, 10.0], d, device),
              "max": all_reduce([float(rank)], d, device, op=torch.distributed.ReduceOp.MAX),
              "broadcast": broadcast_object(f"from {rank}", d),
              "gathered": gather_object({"rank": rank}, d)}
    leave_process_group(d)
    result["left"] = not torch.distributed.is_initialized()
    with open(f"{out}/{rank}.json", "w") as f:
        json.dump(result, f)


@pytest.mark.slow
def test_two_gloo_processes_sum_broadcast_and_gather_in_rank_order(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.start_processes(_worker, args=(port, str(tmp_path)), nprocs=2, start_method="spawn")
    for rank in (0, 1):
        r = json.loads((tmp_path / f"{rank}.json").read_text())
        assert r["sum"] == [3.0, 20.0] and r["max"] == [1.0]
        assert r["broadcast"] == "from 0"  # rank 0's value everywhere (e.g. the run folder name)
        assert r["gathered"] == [{"rank": 0}, {"rank": 1}] and r["left"]


# --------------------------------------------------------------------------------------------------
# lib.scene_bands: which scenes are split, who gets what, the partial files
# --------------------------------------------------------------------------------------------------

def _engine():
    from standins import ConstantModel

    from lib.tiling import Engine

    return Engine([ConstantModel()], widths=[64], tile_size=256, overlap=64)


def test_large_scenes_get_one_band_per_rank_small_ones_stay_whole_and_every_unit_has_one_owner():
    from lib import scene_bands
    from lib.image_sources import ImageInput

    eng = _engine()
    images = [ImageInput("big", Path("big.tif")), ImageInput("small", Path("small.tif"))]
    shapes = [(600, 500), (200, 300)]  # 3 x 3 and 1 x 2 windows of 256 px with overlap 64
    units = scene_bands.plan(images, shapes, eng, world=2, split_windows=2)
    assert [(u.image.stem, u.band, u.cost) for u in units] == [
        ("big", (0, 344), 6), ("big", (344, 600), 6), ("small", None, 2)]  # window row 1 reaches across 344
    assert scene_bands.split_images(units) == {"big": [(0, 344), (344, 600)]}
    for world, split_windows in ((1, 2), (2, 0), (2, 5)):  # one process, never, or 9 < 5 x 2 windows
        assert all(u.band is None for u in scene_bands.plan(images, shapes, eng, world, split_windows))
    shares = [scene_bands.share(units, [u.cost for u in units], [u.key for u in units], r, 2) for r in (0, 1)]
    assert [[(u.image.stem, u.band) for u in s] for s in shares] == [
        [("big", (0, 344)), ("small", None)], [("big", (344, 600))]]
    assert scene_bands.share(units, [1, 1, 1], [u.key for u in units], 0, 1) == units


def _meta(rank, windows, rows, precision="fp32", cls=0.5):
    return {"rank": rank, "windows": windows, "skipped": 1, "rows": rows, "precision": precision,
            "scores": {"building_present": cls}, "map_max": {"building": windows / 10}}


def test_band_records_add_up_to_the_scene_figures_and_windows_per_rank():
    from lib import scene_bands

    metas = [_meta(1, 6, [344, 600], "bf16", None), _meta(0, 5, [0, 344], "fp32", 0.25), _meta(1, 2, [600, 700])]
    stats = scene_bands.merged_stats(metas)
    assert (stats.windows, stats.skipped) == (13, 3)
    assert stats.scores == {"building_present": 0.5} and stats.map_max == {"building": 0.6}
    assert scene_bands.windows_per_rank(metas) == {"0": 5, "1": 8}
    assert list(scene_bands.windows_per_rank(metas)) == ["0", "1"]
    assert scene_bands.precision_of(metas) == "bf16+fp32"


def test_a_band_counts_as_finished_only_with_its_raster_and_the_same_settings(tmp_path):
    import numpy as np

    from lib import scene_bands
    from lib.segmentation import BUILDING
    from lib.tiling import Block, SceneStats

    with scene_bands.BandWriter(tmp_path, "city", (100, 140), 30, threshold=0.5) as band:
        for row in (100, 120):
            prob = torch.linspace(0, 1, 30).repeat(20, 1)
            valid = np.ones((20, 30), bool)
            valid[:, :3] = False
            band.add(Block(row, {BUILDING: prob}, valid))
        assert scene_bands.finished_band(tmp_path, "city", (100, 140), "fp") is None  # not before commit
        meta = band.commit(SceneStats(windows=4, scores={"s": float("nan")}, map_max={BUILDING: 1.0}), "fp", 1,
                           "fp32")
    assert meta["blocks"] == [[100, 0, 20, 30], [120, 0, 20, 30]] and meta["scores"] == {"s": None}
    assert scene_bands.finished_band(tmp_path, "city", (100, 140), "fp")["rank"] == 1
    assert scene_bands.finished_band(tmp_path, "city", (100, 140), "other settings") is None

    class Collect:
        def __init__(self):
            self.calls = []

        def write(self, row, prob, mask, col, valid):
            self.calls.append((row, col, prob, mask, valid))

    sink = Collect()
    scene_bands.replay(tmp_path, "city", [meta], sink)
    assert [(r, c) for r, c, *_ in sink.calls] == [(100, 0), (120, 0)]
    _, _, prob, mask, valid = sink.calls[1]
    expected = np.round(torch.linspace(0, 1, 30).numpy() * 255).astype(np.uint8)
    assert np.array_equal(prob[0], expected) and not valid[:, :3].any() and valid[:, 3:].all()
    assert mask.dtype == bool and np.array_equal(mask[0], valid[0] & (torch.linspace(0, 1, 30).numpy() >= 0.5))
    scene_bands.band_paths(tmp_path, "city", (100, 140))[0].unlink()
    assert scene_bands.finished_band(tmp_path, "city", (100, 140), "fp") is None  # its raster is gone
    scene_bands.remove_bands(tmp_path, "city")
    assert list(tmp_path.iterdir()) == []


def test_bands_with_instance_maps_replay_into_the_same_rasters_and_instances_as_one_writer(tmp_path):
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin

    from lib import scene_bands
    from lib.raster_outputs import SceneWriter, footprint_polygonizer
    from lib.segmentation import BORDER, BUILDING, CONTACT
    from lib.tiling import Block, SceneStats

    h, w = 80, 50
    building = torch.zeros(h, w)
    building[10:70, 10:40] = 0.9  # one blob across both bands ...
    border = torch.zeros(h, w)
    border[38:42, 10:40] = 1.0  # ... that the border map cuts in two
    maps = {BUILDING: building, BORDER: border, CONTACT: torch.zeros(h, w)}
    blocks = [Block(r, {k: v[r:r + 20] for k, v in maps.items()}, np.ones((20, w), bool)) for r in range(0, h, 20)]
    profile = {"driver": "GTiff", "width": w, "height": h, "count": 1, "dtype": "uint8", "crs": "EPSG:32632",
               "transform": from_origin(500000, 4000000, 0.5, 0.5)}

    def write(folder, feed):
        folder.mkdir()
        poly = footprint_polygonizer(h, w, instance=True, seed_threshold=0.5, seed_min_area=1.0, gsd=0.5)
        with SceneWriter(folder / "p.tif", folder / "m.tif", profile, cog=False, polygonizer=poly,
                         instance_path=folder / "i.tif") as writer:
            feed(writer)
            writer.commit()
        rasters = [rasterio.open(folder / f"{k}.tif").read() for k in "pmi"]
        return rasters, sorted(round(p.geom.area) for p in poly.finish())

    def replayed(writer):
        metas = []
        for band in ((0, 40), (40, 80)):
            with scene_bands.BandWriter(tmp_path, "s", band, w, 0.5, instance=True) as bw:
                for block in blocks[band[0] // 20:band[1] // 20]:
                    bw.add(block)
                metas.append(bw.commit(SceneStats(windows=1), "fp", 0, "fp32"))
        scene_bands.replay(tmp_path, "s", metas, writer)

    one, pieces = write(tmp_path / "one", lambda writer: [writer.add(b) for b in blocks])
    two, pieces2 = write(tmp_path / "two", replayed)
    assert pieces == pieces2 and len(pieces) == 2
    assert all(np.array_equal(a, b) for a, b in zip(one, two)) and one[2].shape == (2, h, w)

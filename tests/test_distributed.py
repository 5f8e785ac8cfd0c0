"""lib.distributed: identity without torchrun, and real collectives in a two-process gloo group."""

import json
import os
import socket

import pytest
import torch

from lib.distributed import Dist, all_reduce, broadcast_object, gather_object, leave_process_group, setup_distributed


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

"""lib.devices: the device, native arithmetic, how many threads finish images beside the model and how many
processes load training data."""

import pytest
import torch

from lib import devices
from lib.errors import UserError


@pytest.mark.parametrize(("cores", "device", "threads"), [
    (2, "cpu", 1), (4, "cpu", 1), (8, "cpu", 2), (16, "cpu", 4), (64, "cpu", 8),
    (2, "cuda", 1), (16, "cuda", 8), (6, "cuda", 3), (1, "cuda", 1),
])
def test_auto_finishing_threads_leave_a_cpu_model_its_cores_and_give_an_accelerators_host_more(
        monkeypatch, cores, device, threads):
    monkeypatch.setattr(devices.os, "cpu_count", lambda: cores)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert devices.finishing_threads("auto", torch.device(device)) == threads
    assert devices.finishing_threads(None, torch.device(device)) == threads


@pytest.mark.parametrize(("processes", "threads"), [("1", 8), ("2", 4), ("4", 2), ("16", 1), ("32", 1)])
def test_auto_finishing_threads_split_the_node_among_torchruns_processes(monkeypatch, processes, threads):
    """16 cores beside a GPU: 8 threads for one process, half of its share of the cores for each of several."""
    monkeypatch.setattr(devices.os, "cpu_count", lambda: 16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", processes)
    assert devices.finishing_threads("auto", torch.device("cuda")) == threads
    assert devices.finishing_threads(5, torch.device("cuda")) == 5  # a given count is per process


def test_a_given_count_is_taken_as_it_is_and_anything_else_is_one_line():
    assert devices.finishing_threads(3, torch.device("cpu")) == 3
    assert devices.finishing_threads("12", torch.device("cuda")) == 12
    assert devices.finishing_threads("auto") >= 1  # no device: the value is only checked
    for bad in (0, -1, "x", 1.5, "2.0", True):
        with pytest.raises(UserError, match="finish_workers must be auto or a number of threads >= 1"):
            devices.finishing_threads(bad)


@pytest.mark.parametrize(("cores", "device", "processes", "workers"), [
    (2, "cpu", "1", 2), (64, "cpu", "1", 2), (64, "cpu", "8", 2),  # the CPU model keeps its cores
    (16, "cuda", "1", 8), (64, "cuda", "1", 8), (4, "cuda", "1", 3), (2, "cuda", "1", 2),
    (16, "cuda", "4", 3), (16, "cuda", "8", 2), (16, "cuda", "16", 2),
])
def test_auto_loader_workers_feed_a_gpu_from_the_process_share_of_cores_and_leave_a_cpu_model_its_own(
        monkeypatch, cores, device, processes, workers):
    """Beside a GPU: this process's share of the cores but one (the main process's), 2 to 8; on the CPU: 2."""
    monkeypatch.setattr(devices.os, "cpu_count", lambda: cores)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", processes)
    assert devices.loader_workers("auto", torch.device(device)) == workers
    assert devices.loader_workers(None, torch.device(device)) == workers


def test_a_given_loader_count_is_kept_and_anything_else_is_one_line():
    assert devices.loader_workers(0, torch.device("cuda")) == 0  # no worker processes: load in the main one
    assert devices.loader_workers("5", torch.device("cpu")) == 5
    assert devices.loader_workers("auto") == 2  # no device: the value is only checked
    for bad in (-1, "x", 1.5, "2.0", True):
        with pytest.raises(UserError, match="num_workers must be auto or a number of processes >= 0"):
            devices.loader_workers(bad)

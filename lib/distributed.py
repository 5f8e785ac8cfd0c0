"""Where a process sits in a `torchrun` job, and the few collective operations the scripts need.

Training (gradient averaging, sharded validation) and inference (images and bands of large scenes
shared among ranks, lib.scene_bands) both run under `torchrun --nproc_per_node=N`; without torchrun
every helper here is the identity, so single-process code paths stay unchanged.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lib.devices import resolve_device
from lib.errors import UserError


@dataclass
class Dist:
    """Where this process sits in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


TIMEOUT = datetime.timedelta(minutes=30)  # how long a collective waits for the slowest rank


def setup_distributed(device_name: str, timeout: datetime.timedelta = TIMEOUT,
                      share_gpus: bool = False) -> tuple[Dist, torch.device]:
    """Read torchrun's RANK/WORLD_SIZE/LOCAL_RANK and join the process group (nccl on CUDA, gloo on CPU).

    `timeout` bounds every collective: a rank that waits longer for the others fails (and torchrun
    stops the job) instead of hanging; inference raises it, as ranks wait there for others' merges.
    `share_gpus` (inference): more processes than GPUs take the GPUs in turn (`gpu_index`), and the
    group is gloo, as inference only exchanges small Python objects and NCCL refuses two ranks on one
    GPU. Several processes then share a GPU's work and each has its own CPU threads and GIL for the
    outputs (polygons, COGs) -- what keeps a fast GPU busy when one process's CPU side cannot."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    d = Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    device = resolve_device(device_name)
    if device.type == "cuda":
        index = gpu_index(d.local_rank, torch.cuda.device_count(), share_gpus) if d.enabled else (device.index or 0)
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    if d.enabled and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" and not share_gpus else "gloo"
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=timeout, **kwargs)
    return d, device


def gpu_index(local_rank: int, gpus: int, share: bool) -> int:
    """The GPU of the process with `local_rank` on a node with `gpus`: its own, or with `share` the GPUs
    in turn; training (NCCL, one process per GPU) with more processes than GPUs fails in one line."""
    if gpus < 1:
        raise UserError("device=cuda: no GPU is visible to this process (CUDA_VISIBLE_DEVICES?)")
    if share:
        return local_rank % gpus
    if local_rank >= gpus:
        raise UserError(f"torchrun started more processes on this node than it has GPUs ({gpus}): training "
                        f"runs one process per GPU, so use --nproc_per_node={gpus}")
    return local_rank


def all_reduce(values: list[float], d: Dist, device: torch.device, op=None) -> list[float]:
    """Sum (or `op`) a few numbers across processes; identity in a single process."""
    if not d.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t.tolist()


def broadcast_object(obj, d: Dist):
    """Rank 0's value of a small picklable object, on every rank."""
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_object(obj, d: Dist) -> list:
    """Every rank's value of a small picklable object, on every rank (rank order)."""
    if not d.enabled:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def leave_process_group(d: Dist) -> None:
    """Leave the job's process group, without a barrier: after a failure the other ranks may be inside
    another collective, and waiting for them would hang this rank instead of letting torchrun stop the job."""
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()

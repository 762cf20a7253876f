"""Data-parallel training under `torchrun`: the few collective operations the Trainer needs.

    torchrun --nproc_per_node 2 my_script.py      # my_script builds a Trainer and calls fit()

torchrun starts one process per device and tells each who it is through the environment (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). `setup()` reads it and joins the process group
(NCCL on GPUs, gloo on CPUs); a plain `python my_script.py` is a world of one process, where every
helper below does nothing. Call `cleanup()` at the end of the script.

Data parallelism (DDP, Li et al., 2020): every rank holds the whole model, runs its shard of the
global batch, and DistributedDataParallel all-reduces (averages) the gradients during backward,
so every rank applies the same update and the weights stay identical. Rank 0 does the talking:
progress bar, logs, samples and checkpoints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class DistInfo:
    """Who this process is: rank in [0, world_size), and its device index on this machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs and writes files."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def default_device(self) -> torch.device:
        """This rank's GPU (cuda:LOCAL_RANK) if there is one, else the CPU."""
        return torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")


def setup() -> DistInfo:
    """Join the process group that torchrun's environment describes (or that is already joined).

    Without torchrun (no WORLD_SIZE > 1 in the environment) this is one process: DistInfo().
    """
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) == 1:
            return DistInfo()
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank()
    return DistInfo(rank, dist.get_world_size(), int(os.environ.get("LOCAL_RANK", rank)))


def cleanup():
    """Leave the process group, if this process joined one (the end of a torchrun script)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, info: DistInfo, device: torch.device, broadcast_buffers: bool = False) -> nn.Module:
    """DDP around `model` when there are several ranks (it broadcasts rank 0's weights and buffers
    once), else `model`.

    DDP's default also re-broadcasts every buffer before each forward. The course's buffers are
    constants (a frozen caption table of megabytes, position tables), equal on every rank from the
    start, so that traffic is off; pass broadcast_buffers=True for a model whose buffers change in
    training (BatchNorm's running statistics).
    """
    if not info.enabled:
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   broadcast_buffers=broadcast_buffers)


def _comm_device() -> str:
    return "cuda" if dist.get_backend() == "nccl" else "cpu"  # NCCL only moves GPU tensors


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The mean of `t` over ranks (a new tensor on t's device); `t` itself in one process."""
    if not info.enabled:
        return t
    total = t.to(_comm_device(), copy=True)
    dist.all_reduce(total)  # sum: ReduceOp.AVG exists only on NCCL
    return (total / info.world_size).to(t.device)


def all_gather(t: torch.Tensor, info: DistInfo) -> list[torch.Tensor]:
    """Every rank's `t` (the same shape on all), in rank order, on the CPU; [t] in one process."""
    if not info.enabled:
        return [t.cpu()]
    parts = [torch.empty_like(t, device=_comm_device()) for _ in range(info.world_size)]
    dist.all_gather(parts, t.to(_comm_device()))
    return [p.cpu() for p in parts]


def barrier(info: DistInfo):
    """Wait until every rank gets here."""
    if info.enabled:
        dist.barrier()


def main_first(fn, info: DistInfo):
    """`fn()` on rank 0 while the other ranks wait, then on the other ranks; `fn()` in one process.

    For a file cache that every rank needs: rank 0 builds it once, the others then find it built.
    If rank 0 fails, torchrun stops the waiting ranks.
    """
    if not info.is_main:
        barrier(info)  # wait for rank 0's fn() to finish
    result = fn()
    if info.is_main:
        barrier(info)  # let the others go
    return result

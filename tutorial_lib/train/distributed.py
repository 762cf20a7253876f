"""Training on several processes under `torchrun`: DDP or FSDP2, sharded checkpoints, and the few
collective operations the Trainer needs.

    torchrun --nproc_per_node 2 my_script.py      # my_script builds a Trainer and calls fit()

torchrun starts one process per device and tells each who it is through the environment (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). `setup()` reads it and joins the process group
(NCCL on GPUs, gloo on CPUs); a plain `python my_script.py` is a world of one process, where every
helper below does nothing. Call `cleanup()` at the end of the script.

Data parallelism (DDP, Li et al., 2020, "PyTorch Distributed"; `wrap`): every rank holds the whole
model, runs its shard of the global batch, and DistributedDataParallel all-reduces (averages) the
gradients during backward, so every rank applies the same update and the weights stay identical.

Fully sharded data parallelism (FSDP, Zhao et al., 2023, "PyTorch FSDP"; here FSDP2, `shard`, as the
`torch.distributed.fsdp.fully_shard` docs describe it): each rank keeps 1/world of every parameter,
gradient and optimizer moment (each tensor cut along its first dimension, a DTensor). Before each
block's forward (and again in backward) the block's parameters are all-gathered, and freed after;
gradients are reduce-scattered, so each rank updates its own shard. Memory per rank falls with the
number of ranks, for about 1.5x DDP's communication. The units gathered at once are the model's
transformer blocks (`fsdp_units`), then the rest of the model.

Sharded checkpoints (`save_sharded`, `load_sharded`): torch.distributed.checkpoint (DCP) writes each
rank's shards into its own file and reads them back, so no rank ever holds the whole state. The
files are DCP's Hugging Face storage (safetensors, each shard's offsets in its header), not DCP's
default format, whose `.metadata` file is a pickle (read with pickle.load) and whose tensors are
torch.save records: nothing here is pickled, in files or between ranks.

Rank 0 does the talking: progress bar, logs, samples and the checkpoint's trainer.json.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from ..versions import require_torch


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


def broadcast_module(model: nn.Module, info: DistInfo):
    """Copy rank 0's parameters and buffers into every rank's `model` (what DDP does when it wraps)."""
    if not info.enabled:
        return
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            data = t.to(_comm_device())
            dist.broadcast(data, src=0)
            t.copy_(data)


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The submodules FSDP gathers one at a time: every module held in an nn.ModuleList whose class
    name ends in "Block" (DiT's `blocks`, also inside a wrapper that holds the DiT), inner
    ones first (fully_shard must reach a module before any module that contains it)."""
    found = [m for holder in model.modules() if isinstance(holder, nn.ModuleList)
             for m in holder if type(m).__name__.endswith("Block")]
    return found[::-1]  # modules() lists a module before what it contains


def shard(model: nn.Module, device: torch.device, param_dtype: torch.dtype | None = None) -> nn.Module:
    """FSDP2 in place: `fully_shard` each of `fsdp_units(model)`, then the model (the rest of its
    parameters); its parameters become DTensors, 1/world of each on this rank.

    param_dtype=torch.bfloat16 is FSDP's mixed precision, for the blocks: their gathered parameters,
    inputs, forward and backward are bfloat16, their gradients are reduced in float32, and the
    sharded parameters, gradients and optimizer moments stay float32, so no autocast is needed. The
    rest (patch, timestep and caption embedders, final layer: little of the compute) stays float32,
    because FSDP casts a unit's floating-point inputs to its param_dtype, and a bfloat16 noise level
    t (8 significant bits) moves the fastest channels of DiT's 1000 t sinusoidal embedding by up to
    1.66 (measured; 0.002 when the float32 embedding is rounded instead).
    """
    require_torch("fsdp")
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # torch >= 2.6

    units = fsdp_units(model)
    if param_dtype is not None and not units:
        raise ValueError(f"FSDP's mixed precision casts a model's blocks (modules in an nn.ModuleList whose class "
                         f"name ends in 'Block'), and {type(model).__name__} has none: train it with "
                         "mixed_precision='no', or with parallelism='ddp' and autocast.")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh)  # float32
    return model


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (a collective: every rank must call it); any other tensor itself."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state_dict of a sharded `model` on rank 0's CPU, {} on the other ranks (a collective:
    each tensor is gathered in turn, so rank 0 needs memory for the model, not the GPU)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_sharded(state: dict, folder: Path):
    """Write every rank's shards of `state` (nested dicts of tensors and DTensors) into `folder`: one
    safetensors file per rank (a collective; `folder` must exist and be shared by all ranks)."""
    require_torch("sharded_checkpoints")
    dcp.save(state, storage_writer=dcp.HuggingFaceStorageWriter(str(folder), save_distributed=True))


def load_sharded(state: dict, folder: Path):
    """Read `save_sharded`'s files into `state`'s tensors, in place, each rank its own shards."""
    require_torch("sharded_checkpoints")
    dcp.load(state, storage_reader=dcp.HuggingFaceStorageReader(str(folder)))


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


def all_gather_json(obj, info: DistInfo) -> list:
    """Every rank's JSON-able `obj` (a few file records), sent as UTF-8 JSON, in rank order; [obj] in
    one process."""
    if not info.enabled:
        return [obj]
    data = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)
    sizes = [int(n) for n in all_gather(torch.tensor(len(data)), info)]
    padded = torch.cat([data, data.new_zeros(max(sizes) - len(data))])  # all_gather wants one shape
    return [json.loads(bytes(part[:n].numpy())) for part, n in zip(all_gather(padded, info), sizes)]


def all_true(flag: bool, info: DistInfo) -> bool:
    """Whether `flag` holds on every rank."""
    return all(t.item() for t in all_gather(torch.tensor(int(flag)), info))


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

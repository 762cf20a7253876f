"""Training on several processes under `torchrun`: DDP, FSDP2 or HSDP, sharded checkpoints, and the
few collective operations the Trainer needs.

    torchrun --nproc_per_node 2 my_script.py      # my_script builds a Trainer and calls fit()

torchrun starts one process per device and tells each who it is through the environment (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). `setup()` reads it and joins the process group
(NCCL on GPUs, gloo on CPUs); a plain `python my_script.py` is a world of one process, where every
helper below does nothing. Call `cleanup()` at the end of the script, also when it fails (the CLI
does): it destroys the process group, so no rank exits holding it. On success, `barrier()` first, so
that every rank leaves together (not while rank 0 still writes its files).

The process group's timeout (`setup(timeout_minutes)`, TrainerConfig.dist_timeout_minutes, the CLI's
--dist-timeout, else $TUTORIAL_LIB_DIST_TIMEOUT_MINUTES, else 30 minutes) is how long a collective
waits for the slowest rank before the run is stopped. Ranks wait that long while rank 0 writes a
whole checkpoint (DDP: the model, EMA and AdamW's two moments, 16 bytes per parameter, 12 GB for
DiT-XL/2's 758M, then its SHA-256), and while rank 0 encodes the latent cache alone. NCCL's own
default, 10 minutes, stops a run whose file system writes that checkpoint below about 20 MB/s;
30 minutes allows 7 MB/s, and a rank that is really gone is still noticed within half an hour.

Data parallelism (DDP, Li et al., 2020, "PyTorch Distributed"; `wrap`): every rank holds the whole
model, runs its shard of the global batch, and DistributedDataParallel all-reduces (averages) the
gradients during backward, so every rank applies the same update and the weights stay identical.

Fully sharded data parallelism (FSDP, Zhao et al., 2023, "PyTorch FSDP"; here FSDP2, `shard`, as the
`torch.distributed.fsdp.fully_shard` docs describe it): each rank keeps 1/world of every parameter,
gradient and optimizer moment (each tensor cut along its first dimension, a DTensor; expert weights
below). Before each
block's forward (and again in backward) the block's parameters are all-gathered, and freed after;
gradients are reduce-scattered, so each rank updates its own shard. Memory per rank falls with the
number of ranks, for about 1.5x DDP's communication. The units gathered at once are the ones each
model names with its `fsdp_units()` method, in the order they run (`fsdp_units`): the DiT's blocks,
the MMDiT's double- and single-stream blocks, the UNet's down, mid and up blocks (diffusers'), the
tiny transformer's blocks; the rest of the model (embedders, final layer) is the root unit.
Activation checkpointing sits inside each unit (models/dit.py explains why), so the recompute in
backward runs on the inputs FSDP has already cast.

Hybrid sharding (HSDP, parallelism="hsdp"; the FSDP paper's hybrid strategy): a 2-D mesh of
[nodes, ranks per node] (torchrun's LOCAL_WORLD_SIZE), each parameter sharded across the ranks of a
node and replicated across nodes. The all-gathers of every block stay inside a node (NVLink); across
nodes only the gradients travel, all-reduced between replicas once per step. Memory per rank falls
with the ranks of one node, not of the whole job.

Gradient accumulation: on every micro-batch but the last, FSDP and HSDP skip their reduce-scatter and
all-reduce (`set_requires_gradient_sync(False)`, FSDP1's `no_sync`) and each rank accumulates its
unsharded gradients (in float32 under bf16: FSDP upcasts them to reduce_dtype); the last micro-batch
reduces the sum once. This trades memory for grad_accum_steps - 1 fewer collectives per step: every rank
holds the whole model's gradient unsharded in float32 during the step (4 bytes per parameter, for
DiT-XL/2's 758M: 3.0 GB), not 1/ranks of it. With grad_accum_steps = 1 nothing changes.

Expert weights (models/moe.py, [E, ...] for E experts) are sharded on dim 0 when the ranks divide E,
else on their largest dimension that the ranks divide (`fully_shard`'s shard_placement_fn, torch 2.6
like `torch.distributed.fsdp.fully_shard` itself): with E = 8 experts on 16 ranks, dim 0 would leave
8 ranks holding only padding, and its AdamW moments.

Sharded checkpoints (`save_sharded`, `load_sharded`): torch.distributed.checkpoint (DCP) writes each
rank's shards into its own file and reads them back, so no rank ever holds the whole state. The
files are DCP's Hugging Face storage (safetensors, each shard's offsets in its header), not DCP's
default format, whose `.metadata` file is a pickle (read with pickle.load) and whose tensors are
torch.save records: nothing here is pickled, in files or between ranks. The files are named, never
listed (`shard_file`): on a shared file system one node's listing of a folder can lag another's writes.

Rank 0 does the talking: progress bar, logs, samples and the checkpoint's trainer.json.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Shard
from torch.nn.parallel import DistributedDataParallel

from ..models.moe import Experts
from ..versions import require_torch


DEFAULT_TIMEOUT_MINUTES = 30.0  # the process group's (module docstring)
TIMEOUT_ENV = "TUTORIAL_LIB_DIST_TIMEOUT_MINUTES"


@dataclass(frozen=True)
class DistInfo:
    """Who this process is: rank in [0, world_size), and its device index on this machine, of the
    local_world_size ranks there (torchrun's LOCAL_WORLD_SIZE: the ranks of one node)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

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


def timeout(minutes: float | None = None) -> timedelta:
    """The process group's timeout: `minutes`, else $TUTORIAL_LIB_DIST_TIMEOUT_MINUTES, else 30 minutes."""
    if minutes is None:
        text = os.environ.get(TIMEOUT_ENV)
        try:
            minutes = DEFAULT_TIMEOUT_MINUTES if text is None else float(text)
        except ValueError:
            raise ValueError(f"${TIMEOUT_ENV} must be a number of minutes, got {text!r}.") from None
    if not minutes > 0:
        raise ValueError(f"The process group's timeout must be > 0 minutes, got {minutes}.")
    return timedelta(minutes=minutes)


def setup(timeout_minutes: float | None = None) -> DistInfo:
    """Join the process group that torchrun's environment describes (or that is already joined), with
    `timeout(timeout_minutes)` for its collectives (module docstring); the first call joins.

    Without torchrun (no WORLD_SIZE > 1 in the environment) this is one process: DistInfo().
    """
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) == 1:
            return DistInfo()
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timeout(timeout_minutes))
    rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank, world, int(os.environ.get("LOCAL_RANK", rank)),
                    int(os.environ.get("LOCAL_WORLD_SIZE", world)))


def cleanup():
    """Leave the process group, if this process joined one (the end of a torchrun script)."""
    if dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def process_group(timeout_minutes: float | None = None):
    """`with process_group() as info:` a torchrun script's work between `setup(timeout_minutes)` and
    `cleanup()`. After the work, every rank waits for the others before it leaves, so that none destroys
    the group while rank 0 still writes its files; on an error this rank leaves at once (torchrun stops
    the others)."""
    info = setup(timeout_minutes)
    try:
        yield info
        barrier(info)
    finally:
        cleanup()


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
    """The submodules FSDP gathers one at a time: those that each model inside `model` names with its
    `fsdp_units()` method (a DiT held by a wrapper too), in the order each model runs them."""
    return [unit for m in model.modules() if callable(getattr(m, "fsdp_units", None)) for unit in m.fsdp_units()]


def device_mesh(info: DistInfo, device: torch.device, hybrid: bool = False) -> DeviceMesh:
    """The ranks FSDP shards over: all of them in a row, or with `hybrid` (HSDP) a 2-D mesh of
    [nodes, ranks per node], sharded within a node and replicated across nodes."""
    if not hybrid:
        return init_device_mesh(device.type, (info.world_size,), mesh_dim_names=("shard",))
    per_node = info.local_world_size
    if info.world_size % per_node:
        raise ValueError(f"HSDP shards within a node and replicates across nodes: the {info.world_size} ranks must be "
                         f"nodes x {per_node} ranks per node (torchrun's LOCAL_WORLD_SIZE, equal on every node).")
    return init_device_mesh(device.type, (info.world_size // per_node, per_node),
                            mesh_dim_names=("replicate", "shard"))


def expert_placement(param: nn.Parameter, ranks: int) -> Shard | None:
    """Where FSDP cuts an expert weight [E, ...] (models/moe.py): None (dim 0, FSDP's default) when the
    `ranks` that share it divide E, else Shard(d) on the largest dimension d that they divide."""
    if param.shape[0] % ranks == 0:
        return None
    dims = [d for d in range(1, param.ndim) if param.shape[d] % ranks == 0]
    if not dims:
        raise ValueError(f"FSDP cannot shard the expert weights of shape {tuple(param.shape)} over {ranks} ranks "
                         f"without padding: no dimension divides by {ranks}. Use a number of experts, width or "
                         "MLP width divisible by the ranks that shard (the GPUs per node under HSDP).")
    return Shard(max(dims, key=lambda d: param.shape[d]))


def shard(model: nn.Module, mesh: DeviceMesh, param_dtype: torch.dtype | None = None) -> nn.Module:
    """FSDP2 in place: `fully_shard` each of `fsdp_units(model)`, then the model (the rest of its
    parameters), over `mesh` (`device_mesh`); its parameters become DTensors, 1/ranks of each on this rank
    (ranks: those of the mesh's "shard" dimension).

    param_dtype=torch.bfloat16 is FSDP's mixed precision, for the units: their gathered parameters,
    inputs, forward and backward are bfloat16, their gradients are reduced in float32, and the
    sharded parameters, gradients and optimizer moments stay float32, so no autocast is needed. Each
    unit returns float32 (output_dtype), the dtype of the root's layers that run between and after
    the units (the UNet's conv_norm_out, the tiny transformer's patch_out, the DiT's final layer);
    bfloat16 -> float32 -> bfloat16 is exact, so the next unit computes on the very numbers it would
    have had. The root (patch, timestep and caption embedders, final layer: little of the compute)
    stays float32, because FSDP casts a unit's floating-point inputs to its param_dtype, and a bfloat16
    noise level t (8 significant bits) moves the fastest channels of DiT's 1000 t sinusoidal embedding
    by up to 1.66 (measured; 0.002 when the float32 embedding is rounded instead).
    """
    require_torch("fsdp")
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # torch >= 2.6

    units = fsdp_units(model)
    if param_dtype is not None and not units:
        raise ValueError(f"FSDP's mixed precision casts a model's units (its `fsdp_units()`), and "
                         f"{type(model).__name__} names none: train it with mixed_precision='no', or with "
                         "parallelism='ddp' and autocast.")
    ranks = mesh.size(mesh.ndim - 1)  # the "shard" dimension's
    experts = {p for m in model.modules() if isinstance(m, Experts) for p in m.parameters()}

    def placement(param: nn.Parameter) -> Shard | None:
        return expert_placement(param, ranks) if param in experts else None

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32,
                                  output_dtype=torch.float32 if param_dtype is not None else None)
    for unit in units[::-1]:  # reversed: an inner unit before a unit that holds it (a model inside a unit)
        fully_shard(unit, mesh=mesh, mp_policy=policy, shard_placement_fn=placement)
    fully_shard(model, mesh=mesh, shard_placement_fn=placement)  # float32
    return model


def set_gradient_sync(model: nn.Module, sync: bool):
    """Whether a sharded model's backward reduces its gradients (FSDP's reduce-scatter and, under HSDP,
    the all-reduce between replicas) or accumulates them unsharded on each rank (module docstring)."""
    model.set_requires_gradient_sync(sync)  # both collectives (FSDPModule.set_requires_all_reduce: HSDP's alone)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (a collective: every rank must call it); any other tensor itself."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state_dict of a sharded `model` on rank 0's CPU, {} on the other ranks (a collective:
    each tensor is gathered in turn, so rank 0 needs memory for the model, not the GPU)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_sharded(state: dict, folder: Path):
    """Write every rank's shards of `state` (nested dicts of tensors and DTensors) into `folder`: one
    safetensors file per rank, `shard_file(rank)` (a collective; `folder` must exist and be shared by
    all ranks)."""
    require_torch("sharded_checkpoints")
    dcp.save(state, storage_writer=dcp.HuggingFaceStorageWriter(str(folder), save_distributed=True))


def shard_file(rank: int) -> str:
    """The name of the file that `save_sharded` writes rank `rank`'s shards to (none if it has nothing
    to write). DCP's HuggingFaceStorageWriter(save_distributed=True) numbers the ranks' save plans from
    1, in rank order, and puts all of a rank's tensors in one file (torch/distributed/checkpoint/
    hf_storage.py, prepare_global_plan; _hf_utils.py, _gen_file_name)."""
    return f"shard-{rank + 1:05d}-model-00001-of-00001.safetensors"


def load_sharded(state: dict, folder: Path, files: list[str]):
    """Read `save_sharded`'s `files` (names in `folder`) into `state`'s tensors, in place, each rank
    its own shards; any other file in `folder` is not read."""
    require_torch("sharded_checkpoints")
    reader = dcp.HuggingFaceStorageReader(str(folder))
    reader.fs = _Named(reader.fs, files)  # its read_metadata reads the files that fs.ls(folder) returns
    dcp.load(state, storage_reader=reader)


class _Named:
    """DCP's file system `fs`, listing a checkpoint folder as the files named instead of asking the
    directory (whose listing, on a shared file system, can lag what another node wrote)."""

    def __init__(self, fs, names: list[str]):
        self.fs, self.names = fs, names

    def ls(self, path) -> list[str]:
        return [str(self.fs.concat_path(path, name)) for name in self.names]

    def __getattr__(self, name):  # everything else: fs's own
        return getattr(self.fs, name)


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


def broadcast_json(obj, info: DistInfo):
    """Rank 0's JSON-able `obj` on every rank (the others pass anything, None say); `obj` in one process."""
    return all_gather_json(obj, info)[0]


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

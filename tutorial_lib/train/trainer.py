"""The training loop of notebook 03 onwards and of the CLI, in one file to read top to bottom.

`Trainer(model, loss_fn, data, TrainerConfig(...), sample_fn).fit()` minimises
`loss_fn(model, batch, generator) -> loss` (or `(loss, {name: value})`). One optimizer step:

    the next global batch of `batch_size` examples (shuffled epochs, seeded) as [grad_accum_steps,
    ranks, micro-batch]: this rank's column, read by a DataLoader (workers, pinned memory, prefetch)
    for each of the grad_accum_steps micro-batches:
        with autocast (not under FSDP): loss = loss_fn(model, micro-batch, generator)
        (loss / grad_accum_steps).backward()   # DDP and FSDP reduce the gradients on the last
                                               # micro-batch only; before it, they accumulate
    loss and metrics, averaged over micro-batches and ranks, kept on the device
    clip the gradient norm (unscaled first under fp16)
    lr <- schedule(step); optimizer step, skipped on the device once a loss or norm was not finite; EMA update
    at logging, sampling, snapshot and checkpoint steps: the scalars since the last such step read on
    the host (the only sync with a GPU); one not finite -> stop (NonFiniteError) before writing anything
    every log_every steps:        mean scalars -> progress bar, TensorBoard, history.jsonl
    every sample_every steps:     sample_fn(EMA model, step) -> samples/step_XXXXXXXX.png (+ TensorBoard)
    every posthoc_snapshot_every steps: the post-hoc EMAs -> posthoc_ema/step_XXXXXXXX_sigma_rel_S.safetensors
    every checkpoint_every steps: a checkpoint directory, written whole or not at all

`batch_size` is the global batch of one optimizer step: ranks x grad_accum_steps x micro-batch, so
one process with grad_accum_steps=2 and two processes (torchrun, see distributed.py) with 1 take
the same step.

Data: `data` is tensors (or nested tuples / lists / dicts of them), or a map-style dataset whose
`__getitems__(indices)` returns one whole batch (tensors, and lists of strings such as captions).
Batches come through a torch DataLoader: `num_workers` processes per rank gather them ahead of the
step (`prefetch_factor` micro-batches each), into pinned memory on a GPU, and only tensors move to
the device. Its sampler starts from the data order's state when `fit()` starts and runs ahead; the
trainer's own copy of the order advances one global batch per step, and that is what a checkpoint
records, so the read-ahead never changes where a resumed run continues.

Several ranks (torchrun; distributed.py): parallelism="ddp" keeps the whole model on every rank;
"fsdp" shards parameters, gradients, optimizer moments and the EMA across ranks (FSDP2), with
bf16 mixed precision done by FSDP itself (the model's FSDP units in bfloat16, the rest in float32);
"hsdp" shards them within each node and replicates across nodes. In one process "fsdp" and "hsdp"
are plain training (nothing to shard). activation_checkpointing recomputes each block in backward
(any mode), from inside the block. dist_timeout_minutes bounds how long a collective waits for the
slowest rank (distributed.setup).

Checkpoints (checkpoint.py describes their files and how they are written, verified and chosen):
every checkpoint_every steps, out_dir/checkpoints/step_XXXXXXXX, written whole or not at all, with
out_dir/checkpoints/latest naming the newest. Under FSDP and HSDP each rank writes and reads its own shards;
`export_ema()` gives the whole EMA model to save and share. Resume (`load_checkpoint`, from the
newest good checkpoint) is exact: weights, EMA (and post-hoc EMAs), optimizer moments, the step, the
RNG states of every rank and the position in the data order. A run stopped and resumed ends bit for
bit where an uninterrupted run ends, as long as loss_fn takes its randomness from the generator it
is given or torch's global RNG (not from Python's `random` or NumPy), and a dataset's __getitems__
draws none (its workers' RNGs are not checkpointed).

Post-hoc EMA (EDM2; ema.py), off by default: with posthoc_ema_sigma_rels=(0.05, 0.10) the trainer
tracks those power-function EMAs and saves them every posthoc_snapshot_every steps (and after the
last) to out_dir/posthoc_ema, written before the checkpoint of the same step. A run resumed from step
s drops the snapshots after s that an interrupted run left (as it drops history.jsonl's records) and
writes them again, bit for bit the same; a fresh run drops them all. After training,
`ema.reconstruct_ema(out_dir/"posthoc_ema", sigma_rel)` gives the EMA of any width in between.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..versions import require_torch
from ..weights import atomic_write
from . import distributed
from .checkpoint import CheckpointError  # noqa: F401 (what load_checkpoint raises: importable from here too)
from .checkpoint import Checkpointer, Progress, TrainingState, model_record
from .common import warmup_cosine, warmup_inverse_sqrt
from .ema import EMA, MAX_SIGMA_REL, SNAPSHOT_NAME, PowerEMA
from .loader import Gathered, MicroBatches, ShuffledBatches, in_cpu_memory, tree_map, whole_batch

SCHEDULES = ("constant", "cosine", "inverse_sqrt")
PRECISIONS = ("no", "bf16", "fp16")
PARALLELISMS = ("ddp", "fsdp", "hsdp")
SHARDED = ("fsdp", "hsdp")  # the parallelisms that shard (distributed.shard)


# Devices whose AdamW is the fused one: a kernel per step, which can skip a step on the device (found_inf).
# Elsewhere torch's default AdamW, bit for bit as before, and a host check (on the CPU, no sync at all).
FUSED_ADAMW = ("cuda",)


class NonFiniteError(FloatingPointError):
    """The loss or the gradient norm became NaN or infinite; training stopped before that update."""


@dataclass
class TrainerConfig:
    steps: int = 1000  # optimizer steps
    batch_size: int = 128  # global batch of one step = ranks x grad_accum_steps x micro-batch
    grad_accum_steps: int = 1
    lr: float = 1e-3  # peak learning rate
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW's
    weight_decay: float = 0.01  # on parameters with >= 2 dimensions; none on biases and norms
    warmup_steps: int = 100  # linear warm-up from lr / warmup_steps to lr
    # after warm-up: "constant"; "cosine" down to lr * min_lr_ratio; or EDM2's "inverse_sqrt": constant until
    # lr_decay_start steps, then lr * sqrt(lr_decay_start / step)
    schedule: str = "cosine"
    min_lr_ratio: float = 0.05
    lr_decay_start: int | None = None
    grad_clip: float | None = 1.0  # max global gradient norm; None: no clipping (the norm is still logged)
    ema_decay: float = 0.999
    # EDM2's post-hoc EMA (ema.py): the sigma_rels of the power-function EMAs to track, e.g. (0.05, 0.10),
    # and the steps between their snapshots in out_dir/posthoc_ema. None: off.
    posthoc_ema_sigma_rels: tuple[float, ...] | None = None
    posthoc_snapshot_every: int | None = None
    mixed_precision: str = "no"  # "no" | "bf16" (CPU or GPU) | "fp16" (GPU only, with a GradScaler; not with FSDP)
    # With several ranks: "ddp" (every rank holds the whole model), "fsdp" (shards) or "hsdp" (shards within a
    # node, replicas across nodes); distributed.py.
    parallelism: str = "ddp"
    # How long a collective waits for the slowest rank; None: $TUTORIAL_LIB_DIST_TIMEOUT_MINUTES, else 30
    # (distributed.setup: longer than rank 0's checkpoint write). Applies when the Trainer joins the group.
    dist_timeout_minutes: float | None = None
    activation_checkpointing: bool = False  # recompute each block in backward (models with `gradient_checkpointing`)
    # DataLoader worker processes per rank; 0: batches are read in the training process. None: `workers()`
    # (on a GPU, up to 4 per rank from the CPUs this process may use; 0 on the CPU, where workers take its cores).
    num_workers: int | None = None
    prefetch_factor: int | None = None  # micro-batches each worker reads ahead (workers only); None: 2
    pin_memory: bool | None = None  # page-locked batches, copied to the GPU asynchronously; None: on CUDA (CPU data)
    compile: bool = False  # torch.compile the model that trains (the EMA copy stays eager)
    compile_backend: str = "inductor"
    log_every: int = 50  # steps per history record (the means over those steps)
    sample_every: int | None = None  # steps between sample grids (with a sample_fn); None: never
    checkpoint_every: int | None = 500  # None: never
    keep_checkpoints: int | None = 3  # the newest ones kept; None: all
    out_dir: str = "runs/train"
    tensorboard: bool = True  # scalars and samples to out_dir/tensorboard, if tensorboard is installed
    seed: int = 0
    device: str | None = None  # None: this rank's GPU if there is one, else the CPU

    def __post_init__(self):
        self.betas = tuple(self.betas)  # JSON gives a list
        sigma_rels = self.posthoc_ema_sigma_rels
        if sigma_rels is not None:
            self.posthoc_ema_sigma_rels = sigma_rels = tuple(float(s) for s in sigma_rels)
        checks = [
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.grad_accum_steps >= 1, f"grad_accum_steps must be >= 1, got {self.grad_accum_steps}"),
            (self.batch_size % self.grad_accum_steps == 0,
             f"batch_size {self.batch_size} is not divisible by grad_accum_steps {self.grad_accum_steps}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
             f"betas must be two numbers in [0, 1), got {self.betas}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}"),
            (self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}, got {self.schedule!r}"),
            (0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}"),
            ((self.schedule == "inverse_sqrt") == (self.lr_decay_start is not None),
             f"lr_decay_start goes with schedule 'inverse_sqrt' (the step its decay starts), and only with it; "
             f"got schedule {self.schedule!r} and lr_decay_start {self.lr_decay_start}"),
            (self.lr_decay_start is None or self.lr_decay_start >= 1,
             f"lr_decay_start must be >= 1, got {self.lr_decay_start}"),
            (self.grad_clip is None or self.grad_clip > 0,
             f"grad_clip must be > 0 or None, got {self.grad_clip}"),
            (0 <= self.ema_decay < 1, f"ema_decay must be in [0, 1), got {self.ema_decay}"),
            (self.mixed_precision in PRECISIONS,
             f"mixed_precision must be one of {PRECISIONS}, got {self.mixed_precision!r}"),
            (self.parallelism in PARALLELISMS,
             f"parallelism must be one of {PARALLELISMS}, got {self.parallelism!r}"),
            (self.parallelism not in SHARDED or self.mixed_precision != "fp16",
             f"parallelism={self.parallelism!r} takes mixed_precision 'bf16' or 'no', not 'fp16' (it would need a "
             "GradScaler over sharded gradients)"),
            (self.parallelism not in SHARDED or sigma_rels is None,
             f"posthoc_ema_sigma_rels is not supported with parallelism={self.parallelism!r} (its snapshots are "
             "whole models); use parallelism='ddp'"),
            (self.dist_timeout_minutes is None or self.dist_timeout_minutes > 0,
             f"dist_timeout_minutes must be > 0 or None, got {self.dist_timeout_minutes}"),
            (self.num_workers is None or self.num_workers >= 0,
             f"num_workers must be >= 0 or None (auto), got {self.num_workers}"),
            (self.prefetch_factor is None or (self.prefetch_factor >= 1 and self.num_workers != 0),
             f"prefetch_factor (micro-batches each worker reads ahead) must be >= 1 and needs num_workers "
             f">= 1 (or None), got prefetch_factor={self.prefetch_factor} with num_workers={self.num_workers}"),
            (self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}"),
            (sigma_rels is None or (len(sigma_rels) >= 1 and len(set(sigma_rels)) == len(sigma_rels)
                                    and all(0 < s < MAX_SIGMA_REL for s in sigma_rels)),
             f"posthoc_ema_sigma_rels must be distinct numbers in (0, {MAX_SIGMA_REL:.4f}), got {sigma_rels}"),
            ((sigma_rels is None) == (self.posthoc_snapshot_every is None),
             "posthoc_ema_sigma_rels and posthoc_snapshot_every go together (both set, or both None), got "
             f"{sigma_rels} and {self.posthoc_snapshot_every}"),
        ]
        checks += [(getattr(self, name) is None or getattr(self, name) >= 1,
                    f"{name} must be >= 1 or None, got {getattr(self, name)}")
                   for name in ("sample_every", "checkpoint_every", "keep_checkpoints", "posthoc_snapshot_every")]
        problems = [message for ok, message in checks if not ok]
        if problems:
            raise ValueError("Bad TrainerConfig: " + "; ".join(problems) + ".")

    def lr_at(self, step: int) -> float:
        """The learning rate of optimizer step `step` (0-based)."""
        if self.schedule == "cosine":
            return self.lr * warmup_cosine(step, self.steps, self.warmup_steps, self.min_lr_ratio)
        if self.schedule == "inverse_sqrt":
            return self.lr * warmup_inverse_sqrt(step, self.warmup_steps, self.lr_decay_start)
        return self.lr * min(1.0, (step + 1) / max(1, self.warmup_steps))

    def workers(self, device: torch.device, data_on_cpu: bool = True) -> int:
        """DataLoader workers per rank: num_workers, or for None, on a GPU, min(4, c - 1) for the c CPUs each
        of this node's ranks may use (the affinity mask's CPUs over LOCAL_WORLD_SIZE, torchrun's; one left
        for the training process itself), so that decoding and collating overlap the GPU's work; 0 on the
        CPU, where workers would take the cores the model trains on, and for data already on a GPU."""
        if self.num_workers is not None:
            return self.num_workers
        if device.type == "cpu" or not data_on_cpu:
            return 0
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        per_rank = cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        return min(4, max(0, per_rank - 1))


class Trainer:
    """Trains `model` on `loss_fn` over `data` (see the module docstring for one step).

    model: any nn.Module; moved to the trainer's device. If it has a `config` dataclass, that is
        recorded in checkpoints, so loading a checkpoint of another config fails clearly.
    loss_fn(model, batch, generator) -> loss, or (loss, {name: scalar}): a scalar over one
        micro-batch, mean-reduced. `model` is the module to call (wrapped by DDP or torch.compile:
        use `trainer.model` for its attributes). `generator` is a seeded torch.Generator on the
        trainer's device, one per rank, for every random draw (noise, timesteps, caption dropout):
        draw with device=generator.device. Metrics must have the same names at every call; as
        tensors (not Python numbers) they keep the step free of syncs with the host. Under FSDP
        with bf16 the model's FSDP units run in bfloat16 and return float32 (distributed.shard).
    data: a tensor, a (nested) tuple / list / dict of tensors with the same first dimension, an
        object with __len__ whose __getitem__ takes a LongTensor of indices, or a map-style dataset
        with __len__ and __getitems__(list of indices) -> one whole batch (tensors, lists of strings).
    sample_fn(ema_model, step) -> images [N, C, H, W] in [-1, 1], optional: called on rank 0 under
        torch.no_grad, with the RNG states forked so that sampling never changes training (under
        FSDP with the EMA that `export_ema()` gathers, on rank 0's device).
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, data, config: TrainerConfig | None = None,
                 sample_fn: Callable | None = None):
        self.cfg = cfg = config or TrainerConfig()
        self.loss_fn, self.sample_fn = loss_fn, sample_fn
        self.dataset = data if hasattr(data, "__getitems__") else Gathered(data)
        self.dist = distributed.setup(cfg.dist_timeout_minutes)
        self.device = torch.device(cfg.device) if cfg.device else self.dist.default_device()
        cuda = self.device.type == "cuda"
        if cuda and self.device.index is None:  # "cuda": the current GPU (under torchrun, LOCAL_RANK's)
            self.device = torch.device("cuda", torch.cuda.current_device())
        if cfg.mixed_precision == "fp16" and not cuda:
            raise ValueError(f"mixed_precision='fp16' needs a CUDA GPU (its GradScaler), not {self.device}; "
                             "use 'bf16' or 'no' on the CPU.")
        if cfg.mixed_precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
            raise ValueError("This GPU does not support bfloat16; use mixed_precision='fp16' or 'no'.")
        on_cpu = in_cpu_memory(data)
        self.pin_memory = cuda and on_cpu if cfg.pin_memory is None else cfg.pin_memory
        if self.pin_memory and not cuda:
            raise ValueError(f"pin_memory=True speeds up copies to a CUDA GPU; this trainer runs on {self.device}. "
                             "Use pin_memory=None or False.")
        self.num_workers = cfg.workers(self.device, on_cpu)
        if not on_cpu and (cfg.num_workers or self.pin_memory):
            raise ValueError("The data's tensors are on a GPU already: they are indexed in the training process, so "
                             "use num_workers=0 and pin_memory=None or False (workers and pinned memory serve data "
                             "in CPU memory).")
        switches = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
        if cfg.activation_checkpointing and not switches:
            raise ValueError(f"activation_checkpointing=True needs a model with a `gradient_checkpointing` switch "
                             f"(DiT has one); {type(model).__name__} has none.")
        shards = cfg.grad_accum_steps * self.dist.world_size
        if cfg.batch_size % shards:
            raise ValueError(f"batch_size {cfg.batch_size} is not divisible by grad_accum_steps x ranks "
                             f"= {cfg.grad_accum_steps} x {self.dist.world_size}.")
        self.batches = ShuffledBatches(len(self.dataset), cfg.batch_size, cfg.seed)  # the order checkpoints record

        # Randomness, per rank: torch's global RNG (dropout, say) and loss_fn's generator, whose
        # seed is drawn from the former so that one seed gives two independent streams.
        torch.manual_seed(cfg.seed + self.dist.rank)
        # It lives on the training device, so noise, t and masks are drawn there (no copy, no sync).
        self.generator = torch.Generator(self.device).manual_seed(int(torch.randint(2**62, ())))

        self.model = model.to(self.device).train()  # the module itself: checkpoints and EMA use it
        self._model_record = model_record(model)  # before FSDP renames its class (DiT -> FSDPDiT)
        self.sharded = cfg.parallelism in SHARDED and self.dist.enabled  # one process: nothing to shard
        require_torch("grad_clip", *(("fsdp", "sharded_checkpoints") if self.sharded else ()))
        if self.sharded:
            distributed.broadcast_module(self.model, self.dist)  # rank 0's initial weights, as DDP's
            self.net = self.model  # what loss_fn calls; sharded in place below
        else:
            self.net = distributed.wrap(self.model, self.dist, self.device)  # DDP (it broadcasts) or the model
        self.ema = EMA(self.model, cfg.ema_decay)  # after the broadcast: every rank starts alike
        self.posthoc_ema = PowerEMA(self.model, cfg.posthoc_ema_sigma_rels) if cfg.posthoc_ema_sigma_rels else None
        if self.sharded:
            self._skeleton = copy.deepcopy(self.model).to("meta")  # what export_ema fills; no memory
            bf16 = torch.bfloat16 if cfg.mixed_precision == "bf16" else None
            mesh = distributed.device_mesh(self.dist, self.device, hybrid=cfg.parallelism == "hsdp")
            distributed.shard(self.model, mesh, param_dtype=bf16)
            distributed.shard(self.ema.model, mesh)  # the same shards: each rank averages its own
        for switch in switches if cfg.activation_checkpointing else []:
            switch.gradient_checkpointing = True  # the live model's only: the EMA never runs backward
        if cfg.compile:
            for module in self.model.modules():  # position tables built before tracing (DiT.build_positions)
                if hasattr(module, "build_positions"):
                    module.build_positions()
            self.net = torch.compile(self.net, backend=cfg.compile_backend)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in self.params if p.ndim >= 2]},
                  {"params": [p for p in self.params if p.ndim < 2], "weight_decay": 0.0}]
        self.fused = self.device.type in FUSED_ADAMW
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas,
                                           weight_decay=cfg.weight_decay, fused=self.fused or None)
        self.scaler = torch.amp.GradScaler("cuda") if cfg.mixed_precision == "fp16" else None

        self.step = 0  # optimizer steps done
        self.history: list[dict] = []  # one record of mean scalars per log_every steps
        self._pending = {"sums": {}, "counts": {}}  # scalars since the last record, on the host
        self._unread: list[tuple[int, float, list[str], torch.Tensor]] = []  # (step, lr, names, values on the device)
        self._skip = torch.zeros((), device=self.device)  # 1 from a non-finite step on: updates skipped
        self.out_dir = Path(cfg.out_dir)
        self.checkpointer = Checkpointer(self.out_dir / "checkpoints", self.dist, self.sharded, cfg.keep_checkpoints)
        self.checkpoint_dir = self.checkpointer.directory
        self.posthoc_dir = self.out_dir / "posthoc_ema"

    @property
    def ema_model(self) -> nn.Module:
        """The EMA of the weights (eval mode): what to sample with. Under FSDP it is sharded (every
        forward is a collective): take `export_ema()` to sample or save."""
        return self.ema.model

    def export_ema(self) -> nn.Module | None:
        """A plain (unsharded) copy of the EMA model on the CPU, in eval mode, on rank 0; None on the
        other ranks. Every rank must call it: under FSDP it gathers the EMA's shards, once, onto rank
        0's CPU (the only time the whole EMA is assembled)."""
        if not self.sharded:
            return copy.deepcopy(self.ema.model).cpu() if self.dist.is_main else None
        state = distributed.full_state_dict(self.ema.model)
        if not self.dist.is_main:
            return None
        model = copy.deepcopy(self._skeleton).to_empty(device="cpu")
        for name, buffer in self.model.named_buffers():  # with the non-persistent ones state_dict omits
            model.get_buffer(name).copy_(buffer)
        model.load_state_dict(state)
        return model.eval().requires_grad_(False)

    # ------------------------------------------------------------------------------ the loop
    def fit(self) -> list[dict]:
        """Train until config.steps; return the history (a dict of mean scalars per record)."""
        cfg, main = self.cfg, self.dist.is_main
        if self.step == 0 and self.has_checkpoints():
            raise FileExistsError(f"{self.checkpoint_dir} already holds checkpoints: resume with "
                                  "trainer.load_checkpoint() first, or use a new (or emptied) out_dir.")
        if main and self.step == 0:
            self._write_history()  # a fresh history.jsonl
        if main and self.posthoc_ema is not None:
            self._drop_snapshots_after(self.step)
        self.model.train()
        writer = self._tensorboard() if main else None
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", disable=not main)
        micro_batches = iter(self._loader())  # from the data order's state now (after a resume, the restored one)
        try:
            while self.step < cfg.steps:
                self._train_step(micro_batches)
                bar.update()
                done = self.step == cfg.steps
                everies = (cfg.log_every, cfg.sample_every, cfg.posthoc_snapshot_every, cfg.checkpoint_every)
                if any(_due(self.step, every, done) for every in everies):
                    self._read_scalars()  # the one sync with the host, before anything is logged or written
                if _due(self.step, cfg.log_every, done):
                    record = self._log(writer)
                    bar.set_postfix(loss=f"{record['loss']:.4g}", lr=f"{record['lr']:.3g}")
                if self.sample_fn is not None and _due(self.step, cfg.sample_every, done):
                    self._sample(writer)
                # Before the checkpoint: resuming from it must find this step's snapshots written.
                if main and self.posthoc_ema is not None and _due(self.step, cfg.posthoc_snapshot_every, done):
                    self.posthoc_ema.save_snapshots(self.posthoc_dir, self.step, cfg.posthoc_snapshot_every)
                if _due(self.step, cfg.checkpoint_every, done):
                    self.save_checkpoint()
        finally:
            if hasattr(micro_batches, "_shutdown_workers"):  # stop the DataLoader's workers now, not when collected
                micro_batches._shutdown_workers()
            bar.close()
            if writer is not None:
                writer.close()
        return self.history

    def _loader(self) -> DataLoader:
        """This rank's micro-batches, forever, from the data order's current state (module docstring)."""
        cfg = self.cfg
        sampler = MicroBatches(self.batches.state_dict(), cfg.grad_accum_steps, self.dist.rank, self.dist.world_size)
        # Its own generator: the loader draws its workers' seeds from it, not from torch's global RNG.
        return DataLoader(self.dataset, batch_sampler=sampler, collate_fn=whole_batch, num_workers=self.num_workers,
                          prefetch_factor=cfg.prefetch_factor if self.num_workers else None, pin_memory=self.pin_memory,
                          generator=torch.Generator().manual_seed(cfg.seed))

    def _train_step(self, micro_batches):
        """One optimizer step over the next grad_accum_steps of `micro_batches` (`_loader`'s). Its
        scalars (loss, metrics, grad_norm; the same on every rank) stay on the device, appended to
        `_unread` for `_read_scalars`: no step syncs with the host.

        A non-finite loss or gradient norm cannot stop the loop without a sync, so it stops the
        updates instead: `_skip` becomes 1 on the device, and from then on the fused AdamW (on CUDA)
        skips every step (`found_inf`, the flag GradScaler's skips use), so that gradient clipping's
        NaN never reaches a weight. `_read_scalars`, at the next logging, sampling or checkpoint step,
        raises NonFiniteError naming the first bad step, before anything is written. Off CUDA, AdamW
        is torch's default one, which has no found_inf: there the skip is decided on the host, which on
        the CPU costs nothing. Under fp16 the GradScaler skips the steps whose gradient is not finite
        (and lowers its scale); a non-finite loss poisons the gradients so that it skips those too."""
        cfg, accum = self.cfg, self.cfg.grad_accum_steps
        lr = cfg.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.batches.next()  # the order a checkpoint records: the batch that the loader's copy yields now
        total = 0.0
        for i in range(accum):
            batch = tree_map(lambda t: t.to(self.device, non_blocking=self.pin_memory) if torch.is_tensor(t) else t,
                              next(micro_batches))
            with self._no_sync() if i < accum - 1 else nullcontext():  # gradients reduced on the last only
                with self._autocast():
                    loss, metrics = self._loss(batch)
                (self.scaler.scale(loss / accum) if self.scaler else loss / accum).backward()
            values = [loss.detach().float(), *(torch.as_tensor(v, device=self.device).detach().float()
                                               for v in metrics.values())]
            total = total + torch.stack(values)  # [1 + metrics]
        means = distributed.all_reduce_mean(total / accum, self.dist)  # averaged over micro-batches and ranks
        grads = [p.grad for p in self.params if p.grad is not None]
        if self.scaler:  # non-finite gradients make the scaler skip: a non-finite loss (ever) makes them so
            self._skip = torch.maximum(self._skip, (~means[0].isfinite()).float())
            torch._foreach_mul_(grads, torch.where(self._skip > 0, math.nan, 1.0))
            self.scaler.unscale_(self.optimizer)
        # FSDP: each rank's norm is of its shards; full_tensor combines them into the whole gradient's.
        norm = distributed.full_tensor(nn.utils.get_total_norm(grads))
        nn.utils.clip_grads_with_norm_(self.params, cfg.grad_clip or math.inf, norm)
        if self.scaler:
            self.scaler.step(self.optimizer)  # fused AdamW: the scaler hands it found_inf, no sync
            self.scaler.update()
            values = [means, norm[None].float(), self.scaler._get_scale_async()[None].float()]
        else:
            finite = means[0].isfinite() & norm.isfinite()
            self._skip = torch.maximum(self._skip, (~finite).float())
            if self.fused:
                self.optimizer.found_inf = self._skip  # read by the fused step: 1 skips it
                self.optimizer.step()
                del self.optimizer.found_inf
            elif not self._skip.item():  # no found_inf here: a host check (on the CPU, no sync)
                self.optimizer.step()
            values = [means, norm[None].float()]
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update(self.model, self.step)  # after a skipped step, an average of unchanged weights
        if self.posthoc_ema is not None:
            self.posthoc_ema.update(self.model, self.step)
        names = ["loss", *metrics, "grad_norm", *(["loss_scale"] if self.scaler else [])]
        self._unread.append((self.step, lr, names, torch.cat(values)))
        self.step += 1

    def _read_scalars(self):
        """The scalars of the steps since the last read, to the host in one sync and into the pending
        sums; NonFiniteError for the first step whose loss (or, without fp16's scaler, gradient norm)
        was not finite. Under fp16 a non-finite gradient norm is the scaler's business: left out."""
        if not self._unread:
            return
        rows = torch.cat([values for *_, values in self._unread]).tolist()
        for step, lr, names, values in self._unread:
            scalars = dict(zip(names, rows[:len(names)]))
            del rows[:len(names)]
            for what, name in (("loss", "loss"), ("gradient norm", "grad_norm")):
                if not math.isfinite(scalars[name]) and not (self.scaler and name == "grad_norm"):
                    self._unread, self._skip = [], torch.zeros_like(self._skip)  # a caller may resume and go on
                    raise NonFiniteError(self._stop_message(step, what, scalars[name]))
            if not math.isfinite(scalars["grad_norm"]):
                del scalars["grad_norm"]
            self._add_pending({**scalars, "lr": lr})
        self._unread = []

    def _loss(self, batch) -> tuple[torch.Tensor, dict]:
        out = self.loss_fn(self.net, batch, self.generator)
        loss, metrics = out if isinstance(out, tuple) else (out, {})
        if not (torch.is_tensor(loss) and loss.ndim == 0):
            raise ValueError(f"loss_fn must return a scalar tensor, or (loss, metrics); got "
                             f"{tuple(loss.shape) if torch.is_tensor(loss) else type(loss).__name__}.")
        return loss, metrics

    @contextmanager
    def _no_sync(self):
        """Backward inside accumulates this rank's gradients without reducing them across ranks (DDP's
        no_sync; FSDP's and HSDP's gradient sync off, distributed.set_gradient_sync)."""
        if not self.dist.enabled:
            yield
        elif not self.sharded:
            with self.net.no_sync():
                yield
        else:
            distributed.set_gradient_sync(self.model, False)
            try:
                yield
            finally:
                distributed.set_gradient_sync(self.model, True)

    def _autocast(self):
        if self.cfg.mixed_precision == "no" or self.sharded:  # FSDP casts the weights itself (distributed.shard)
            return nullcontext()
        dtype = torch.bfloat16 if self.cfg.mixed_precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _stop_message(self, step: int, what: str, value: float) -> str:
        """For a non-finite `what` at optimizer step `step` (0-based), read at step self.step."""
        latest = self.checkpointer.latest()
        kept = (f"the last good checkpoint, {self.checkpoint_dir / latest}, is untouched"
                if latest is not None else "no checkpoint had been written")
        return (f"Step {step + 1}: the {what} is {value}. Training stopped before this update (seen at step "
                f"{self.step}, the next that reads the scalars; the updates in between were skipped); {kept}. "
                "Try a lower lr, a longer warm-up, gradient clipping, or mixed_precision='no'.")

    # ------------------------------------------------------------------------------ logs, samples
    def _add_pending(self, scalars: dict[str, float]):
        sums, counts = self._pending["sums"], self._pending["counts"]
        for name, value in scalars.items():
            sums[name] = sums.get(name, 0.0) + value
            counts[name] = counts.get(name, 0) + 1

    def _log(self, writer) -> dict:
        """Append the means of the pending scalars to the history (and its file, and TensorBoard)."""
        sums, counts = self._pending["sums"], self._pending["counts"]
        record = {"step": self.step, **{name: sums[name] / counts[name] for name in sums}}
        self.history.append(record)
        self._pending = {"sums": {}, "counts": {}}
        if self.dist.is_main:
            with open(self.out_dir / "history.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            if writer is not None:
                for name, value in record.items():
                    if name != "step":
                        writer.add_scalar(f"train/{name}", value, self.step)
        return record

    def _write_history(self):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        lines = "".join(json.dumps(record) + "\n" for record in self.history)
        atomic_write(self.out_dir / "history.jsonl", lambda tmp: Path(tmp).write_text(lines))

    def _tensorboard(self):
        """A SummaryWriter on out_dir/tensorboard, or None (with one message) without the package."""
        if not self.cfg.tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            print("TensorBoard logging skipped: the tensorboard package is not installed "
                  "(pip install 'tutorial_lib[tensorboard]'); the scalars are still in history.jsonl.")
            return None
        # purge_step: a resumed run hides what the interrupted one logged after its checkpoint.
        return SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=self.step or None)

    @torch.no_grad()
    def _sample(self, writer):
        ema = self.export_ema() if self.sharded else self.ema.model  # FSDP: every rank helps gather it
        if not self.dist.is_main:
            return
        import torchvision

        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            images = self.sample_fn(ema.to(self.device), self.step)  # [N, C, H, W] in [-1, 1]
        images = images.detach().float().cpu().clamp(-1, 1).add(1).div(2)
        grid = torchvision.utils.make_grid(images, nrow=math.ceil(math.sqrt(len(images))))  # [3, H', W']
        path = self.out_dir / "samples" / f"step_{self.step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        torchvision.utils.save_image(grid, path)
        if writer is not None:
            writer.add_image("samples", grid, self.step)

    def _drop_snapshots_after(self, step: int):
        """Remove the post-hoc EMA snapshots of steps after `step` (an interrupted run's, which this run
        writes again) and the temporary files of interrupted writes."""
        if not self.posthoc_dir.is_dir():
            return
        for leftover in self.posthoc_dir.glob(".step_*.tmp"):
            leftover.unlink(missing_ok=True)
        later = [p for p in self.posthoc_dir.iterdir()
                 if (m := SNAPSHOT_NAME.fullmatch(p.name)) and int(m.group(1)) > step]
        for path in later:
            path.unlink()
        if later:
            print(f"Removed {len(later)} post-hoc EMA snapshots after step {step} from {self.posthoc_dir}: an "
                  "interrupted run wrote them, and this run writes them again.", file=sys.stderr, flush=True)

    # ------------------------------------------------------------------------------ checkpoints
    def _training_state(self) -> TrainingState:
        """What a checkpoint is written from and restored into (checkpoint.py)."""
        return TrainingState(model=self.model, ema=self.ema.model, optimizer=self.optimizer, data_order=self.batches,
                             generator=self.generator, device=self.device, config=self.cfg,
                             model_record=self._model_record, posthoc_ema=self.posthoc_ema, scaler=self.scaler)

    def save_checkpoint(self) -> Path | None:
        """Write checkpoints/step_XXXXXXXX and point `latest` at it; its path on rank 0, else None.

        Every rank must call this: each one's RNG states are gathered, and under FSDP each rank writes
        its own shards. Rank 0 writes the rest.
        """
        return self.checkpointer.save(self._training_state(), Progress(self.step, self.history, self._pending))

    def load_checkpoint(self, path: str | Path = "latest") -> Path:
        """Restore everything from a checkpoint directory, verified (default: the one `latest` names, or
        if that one is missing or damaged, the newest good one, with a message for each one skipped);
        its path. A damaged checkpoint given by path, or one of another model, data order (batch_size,
        seed, data set), number of ranks or parallelism, is a CheckpointError (`Checkpointer.load` says
        what must match), raised before anything is loaded. Every rank must call this.
        """
        path, progress = self.checkpointer.load(self._training_state(), path)
        self.step, self.history, self._pending = progress.step, progress.history, progress.pending
        if self.dist.is_main:
            self._write_history()  # drop records the interrupted run logged after this checkpoint
        return path

    def checkpoints(self) -> list[Path]:
        """The checkpoint directories in out_dir/checkpoints, newest first (not yet verified)."""
        return self.checkpointer.checkpoints()

    def has_checkpoints(self) -> bool:
        """Whether out_dir holds a checkpoint (or a `latest` pointer) that a fresh run would overwrite
        (rank 0's answer: every rank must call this)."""
        return self.checkpointer.has_checkpoints()


# ---------------------------------------------------------------------------------- helpers
def _due(step: int, every: int | None, last: bool) -> bool:
    """Whether an every-N-steps action (None: never) runs after `step`; it always runs after the last."""
    return every is not None and (step % every == 0 or last)

"""The training loop of notebook 03 onwards and of the CLI, in one file to read top to bottom.

`Trainer(model, loss_fn, data, TrainerConfig(...), sample_fn).fit()` minimises
`loss_fn(model, batch, generator) -> loss` (or `(loss, {name: value})`). One optimizer step:

    the next global batch of `batch_size` examples (shuffled epochs, seeded) as [grad_accum_steps,
    ranks, micro-batch]: this rank's column, read by a DataLoader (workers, pinned memory, prefetch)
    for each of the grad_accum_steps micro-batches:
        with autocast (not under FSDP): loss = loss_fn(model, micro-batch, generator)
        (loss / grad_accum_steps).backward()   # DDP all-reduces gradients on the last micro-batch,
                                               # FSDP reduce-scatters them on each
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
bf16 mixed precision done by FSDP itself (the blocks in bfloat16, the rest in float32). In one
process "fsdp" is plain training (nothing to shard). activation_checkpointing recomputes each
transformer block in backward (any mode).

A checkpoint, out_dir/checkpoints/step_XXXXXXXX/, holds
    model.safetensors      the model's state_dict
    ema.safetensors        the EMA model's state_dict
    optimizer.safetensors  the optimizer state's tensors, keyed "<parameter index>.<name>"
    posthoc_ema.safetensors  with posthoc_ema_sigma_rels only: the tracked power-function EMAs
    trainer.json           the rest: step, configs, the optimizer's param groups and non-tensor
                           state, GradScaler state, every rank's RNG states (base64), data order,
                           the history and the scalars not yet logged
and out_dir/checkpoints/latest names the newest. Under FSDP (trainer.json's "kind": "sharded") a
checkpoint holds instead one shard-XXXXX-model-00001-of-00001.safetensors per rank, with that rank's
shards of the model, EMA and optimizer state, written and read back by that rank alone, so that no
rank ever holds the whole state (DCP, see distributed.py), and trainer.json, which names the
optimizer's parameters and records the tensors' full shapes. Such a checkpoint resumes the run
(parallelism="fsdp", as many ranks); `export_ema()` gives the whole EMA model to save and share.
Nothing is pickled. Each checkpoint is written into a temporary directory, flushed to the disk
(fsync) and then renamed into place, and `latest` is replaced the same way after it, so a crash or
a power loss at any moment leaves the previous checkpoint and pointer intact. trainer.json records
the size and SHA-256 of each tensor file: `load_checkpoint()` verifies them (each rank hashing its
share of the files), and if the newest checkpoint is missing or damaged it says so and falls back to
the newest good one.

Resume (`load_checkpoint`) is exact: weights, EMA (and post-hoc EMAs), optimizer moments, the step
(the learning rate is a function of the step, so there is no scheduler state beyond it), the RNG
states of every rank (torch's global CPU and CUDA generators and loss_fn's generator) and the
position in the data order. A run stopped and resumed ends bit for bit where an uninterrupted run
ends, as long as loss_fn takes its randomness from the generator it is given or torch's global RNG
(not from Python's `random` or NumPy), and a dataset's __getitems__ draws none (its workers' RNGs
are not checkpointed).

Post-hoc EMA (EDM2; ema.py), off by default: with posthoc_ema_sigma_rels=(0.05, 0.10) the trainer
tracks those power-function EMAs and saves them every posthoc_snapshot_every steps (and after the
last) to out_dir/posthoc_ema, written before the checkpoint of the same step. A run resumed from step
s drops the snapshots after s that an interrupted run left (as it drops history.jsonl's records) and
writes them again, bit for bit the same; a fresh run drops them all. After training,
`ema.reconstruct_ema(out_dir/"posthoc_ema", sigma_rel)` gives the EMA of any width in between.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..weights import atomic_write, flush, publish
from . import distributed
from .common import warmup_cosine
from .ema import EMA, MAX_SIGMA_REL, SNAPSHOT_NAME, PowerEMA
from .loader import Gathered, MicroBatches, ShuffledBatches, in_cpu_memory, tree_map, whole_batch

SCHEDULES = ("constant", "cosine")
PRECISIONS = ("no", "bf16", "fp16")
PARALLELISMS = ("ddp", "fsdp")
TENSOR_FILES = ("model.safetensors", "ema.safetensors", "optimizer.safetensors")
CHECKPOINT_FILES = (*TENSOR_FILES, "trainer.json")
POSTHOC_FILE = "posthoc_ema.safetensors"  # in checkpoints of runs with posthoc_ema_sigma_rels
FORMAT = 2  # version of the checkpoint layout; 2 added the tensor files' sizes and SHA-256
READS = (1, 2)  # the formats load_checkpoint reads (1: nothing to verify the tensor files by)
STEP_DIR = re.compile(r"step_\d{8}")


# Devices whose AdamW is the fused one: a kernel per step, which can skip a step on the device (found_inf).
# Elsewhere torch's default AdamW, bit for bit as before, and a host check (on the CPU, no sync at all).
FUSED_ADAMW = ("cuda",)


class NonFiniteError(FloatingPointError):
    """The loss or the gradient norm became NaN or infinite; training stopped before that update."""


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, or written for another model or run."""


@dataclass
class TrainerConfig:
    steps: int = 1000  # optimizer steps
    batch_size: int = 128  # global batch of one step = ranks x grad_accum_steps x micro-batch
    grad_accum_steps: int = 1
    lr: float = 1e-3  # peak learning rate
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW's
    weight_decay: float = 0.01  # on parameters with >= 2 dimensions; none on biases and norms
    warmup_steps: int = 100  # linear warm-up from lr / warmup_steps to lr
    schedule: str = "cosine"  # after warm-up: "constant", or "cosine" down to lr * min_lr_ratio
    min_lr_ratio: float = 0.05
    grad_clip: float | None = 1.0  # max global gradient norm; None: no clipping (the norm is still logged)
    ema_decay: float = 0.999
    # EDM2's post-hoc EMA (ema.py): the sigma_rels of the power-function EMAs to track, e.g. (0.05, 0.10),
    # and the steps between their snapshots in out_dir/posthoc_ema. None: off.
    posthoc_ema_sigma_rels: tuple[float, ...] | None = None
    posthoc_snapshot_every: int | None = None
    mixed_precision: str = "no"  # "no" | "bf16" (CPU or GPU) | "fp16" (GPU only, with a GradScaler; not with FSDP)
    # With several ranks: "ddp" (every rank holds the whole model) or "fsdp" (shards; distributed.py).
    parallelism: str = "ddp"
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
            (self.grad_clip is None or self.grad_clip > 0,
             f"grad_clip must be > 0 or None, got {self.grad_clip}"),
            (0 <= self.ema_decay < 1, f"ema_decay must be in [0, 1), got {self.ema_decay}"),
            (self.mixed_precision in PRECISIONS,
             f"mixed_precision must be one of {PRECISIONS}, got {self.mixed_precision!r}"),
            (self.parallelism in PARALLELISMS,
             f"parallelism must be one of {PARALLELISMS}, got {self.parallelism!r}"),
            (self.parallelism != "fsdp" or self.mixed_precision != "fp16",
             "parallelism='fsdp' takes mixed_precision 'bf16' or 'no', not 'fp16' (it would need a GradScaler "
             "over sharded gradients)"),
            (self.parallelism != "fsdp" or sigma_rels is None,
             "posthoc_ema_sigma_rels is not supported with parallelism='fsdp' (its snapshots are whole "
             "models); use parallelism='ddp'"),
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
        with bf16 the blocks run in bfloat16 (distributed.shard): take the loss in float32,
        `model(...).float()`.
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
        self.dist = distributed.setup()
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
        self._model_record = _model_record(model)  # before FSDP renames its class (DiT -> FSDPDiT)
        self.sharded = cfg.parallelism == "fsdp" and self.dist.enabled  # one process: nothing to shard
        if self.sharded:
            distributed.broadcast_module(self.model, self.dist)  # rank 0's initial weights, as DDP's
            self.net = self.model  # what loss_fn calls; sharded in place below
        else:
            self.net = distributed.wrap(self.model, self.dist, self.device)  # DDP (it broadcasts) or the model
        # On every micro-batch but the last, DDP skips its all-reduce and gradients just accumulate.
        # FSDP reduce-scatters on every micro-batch instead: unsharded gradients would cost the memory it saves.
        self._no_sync = self.net.no_sync if self.dist.enabled and not self.sharded else nullcontext
        self.ema = EMA(self.model, cfg.ema_decay)  # after the broadcast: every rank starts alike
        self.posthoc_ema = PowerEMA(self.model, cfg.posthoc_ema_sigma_rels) if cfg.posthoc_ema_sigma_rels else None
        if self.sharded:
            self._skeleton = copy.deepcopy(self.model).to("meta")  # what export_ema fills; no memory
            bf16 = torch.bfloat16 if cfg.mixed_precision == "bf16" else None
            distributed.shard(self.model, self.device, param_dtype=bf16)
            distributed.shard(self.ema.model, self.device)  # the same shards: each rank averages its own
        for switch in switches if cfg.activation_checkpointing else []:
            switch.gradient_checkpointing = True  # the live model's only: the EMA never runs backward
        if cfg.compile:
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
        self.checkpoint_dir = self.out_dir / "checkpoints"
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
            with self._no_sync() if i < accum - 1 else nullcontext():
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

    def _autocast(self):
        if self.cfg.mixed_precision == "no" or self.sharded:  # FSDP casts the weights itself (distributed.shard)
            return nullcontext()
        dtype = torch.bfloat16 if self.cfg.mixed_precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _stop_message(self, step: int, what: str, value: float) -> str:
        """For a non-finite `what` at optimizer step `step` (0-based), read at step self.step."""
        latest = self.checkpoint_dir / "latest"
        kept = (f"the last good checkpoint, {self.checkpoint_dir / latest.read_text().strip()}, is untouched"
                if latest.is_file() else "no checkpoint had been written")
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
            _warn(f"Removed {len(later)} post-hoc EMA snapshots after step {step} from {self.posthoc_dir}: an "
                  "interrupted run wrote them, and this run writes them again.")

    # ------------------------------------------------------------------------------ checkpoints
    def _rng_state(self) -> dict[str, torch.Tensor]:
        """This rank's RNG states, as uint8 tensors."""
        state = {"torch": torch.get_rng_state(), "generator": self.generator.get_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def save_checkpoint(self) -> Path | None:
        """Write checkpoints/step_XXXXXXXX and point `latest` at it; its path on rank 0, else None.

        Every rank must call this: each one's RNG states are gathered, and under FSDP each rank writes
        its own shards. Rank 0 writes the rest.
        """
        gathered = {name: distributed.all_gather(t, self.dist) for name, t in self._rng_state().items()}
        rng = [{name: _b64(ranks[r]) for name, ranks in gathered.items()}
               for r in range(self.dist.world_size)]
        name = f"step_{self.step:08d}"
        tmp = self.checkpoint_dir / f".{name}.tmp"
        main = self.dist.is_main
        if main:
            shutil.rmtree(tmp, ignore_errors=True)  # an interrupted write's
            tmp.mkdir(parents=True)
        try:
            entries = self._write_tensors(tmp)
            path = self._publish(tmp, name, {**entries, "rng": rng}) if main else None
        finally:
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
        distributed.barrier(self.dist)  # on return, the checkpoint exists for every rank
        return path

    def _write_tensors(self, tmp: Path) -> dict:
        """Write the tensor files into `tmp`; on rank 0, trainer.json's entries that describe them."""
        if self.sharded:
            distributed.barrier(self.dist)  # rank 0 has made tmp
            tensors, optimizer = self._sharded_state()
            distributed.save_sharded(tensors, tmp)
            names = sorted(p.name for p in tmp.iterdir())
            share = {n: _file_record(tmp / n) for n in names[self.dist.rank::self.dist.world_size]}
            files = {n: r for part in distributed.all_gather_json(share, self.dist) for n, r in part.items()}
            shapes = {k: list(v.shape) for k, v in tensors["model"].items()}
            return {"kind": "sharded", "files": files, "optimizer": optimizer, "shapes": shapes}
        if not self.dist.is_main:
            return {}
        optimizer_tensors, optimizer = _flatten_optimizer(self.optimizer.state_dict())
        save_file(_cpu(self.model.state_dict()), tmp / "model.safetensors")
        save_file(_cpu(self.ema.model.state_dict()), tmp / "ema.safetensors")
        save_file(_cpu(optimizer_tensors), tmp / "optimizer.safetensors")
        if self.posthoc_ema is not None:
            save_file(_cpu(self.posthoc_ema.state_dict()), tmp / POSTHOC_FILE)
        files = TENSOR_FILES + ((POSTHOC_FILE,) if self.posthoc_ema is not None else ())
        return {"kind": "safetensors", "files": {f: _file_record(tmp / f) for f in files}, "optimizer": optimizer}

    def _sharded_state(self) -> tuple[dict, dict]:
        """FSDP: this rank's shards (DTensors) of the model, the EMA and the optimizer state, for DCP to
        write or to read into, and the optimizer's JSON-able rest (its parameters named)."""
        optimizer, rest = _flatten_optimizer(get_optimizer_state_dict(self.model, self.optimizer))
        model, ema = get_model_state_dict(self.model), get_model_state_dict(self.ema.model)
        return {"model": model, "ema": ema, "optimizer": optimizer}, rest

    def _publish(self, tmp: Path, name: str, entries: dict) -> Path:
        """Rank 0: write trainer.json beside the tensor files in `tmp`, flush them all to the disk, rename
        `tmp` to checkpoints/`name` and point `latest` at it."""
        meta = {
            "format": FORMAT,
            "step": self.step,
            "config": dataclasses.asdict(self.cfg),
            "model": self._model_record,
            "world_size": self.dist.world_size,
            "data_order": self.batches.state_dict(),
            "grad_scaler": self.scaler.state_dict() if self.scaler else None,
            "history": self.history,
            "pending": self._pending,
            **entries,  # kind, files, optimizer (the param groups and non-tensor state), rng (per rank)
        }
        (tmp / "trainer.json").write_text(json.dumps(meta))
        for f in (*meta["files"], "trainer.json"):
            flush(tmp / f)
        final = self.checkpoint_dir / name
        old = tmp.with_name(tmp.name + ".old")
        if final.exists():  # this step was saved before (a run resumed from an older checkpoint)
            os.replace(final, old)
        try:
            publish(tmp, final, mode=0o777)
        finally:
            shutil.rmtree(old, ignore_errors=True)
        atomic_write(self.checkpoint_dir / "latest", lambda p: Path(p).write_text(name + "\n"))
        self._prune()
        return final

    def _prune(self):
        """Keep the newest keep_checkpoints up to this step; remove leftovers of interrupted writes."""
        for leftover in self.checkpoint_dir.glob(".step_*"):
            shutil.rmtree(leftover, ignore_errors=True)
        for leftover in self.checkpoint_dir.glob(".latest.*.tmp"):
            leftover.unlink(missing_ok=True)
        if self.cfg.keep_checkpoints:
            done = [d for d in self.checkpoints() if int(d.name[5:]) <= self.step]  # newest first
            for d in done[self.cfg.keep_checkpoints:]:
                shutil.rmtree(d)

    def checkpoints(self) -> list[Path]:
        """The checkpoint directories in out_dir/checkpoints, newest first (not yet verified)."""
        if not self.checkpoint_dir.is_dir():
            return []
        found = [d for d in self.checkpoint_dir.iterdir() if STEP_DIR.fullmatch(d.name) and d.is_dir()]
        return sorted(found, reverse=True)

    def has_checkpoints(self) -> bool:
        """Whether out_dir holds a checkpoint (or a `latest` pointer) that a fresh run would overwrite."""
        return bool(self.checkpoints()) or (self.checkpoint_dir / "latest").exists()

    def load_checkpoint(self, path: str | Path = "latest") -> Path:
        """Restore everything from a checkpoint directory (default: the one `latest` names, or if
        that one is missing or damaged, the newest good one, with a message for each one skipped).

        The files are verified against the sizes and SHA-256 that trainer.json records. The model
        must have the checkpoint's class, config and tensor shapes; batch_size, seed, the data set's
        size, the number of ranks and the checkpoint's kind (FSDP's shards or whole files) must match
        (the data order and each rank's RNG streams depend on them). Other config fields may change
        (train longer, another lr), at the price of bit-exactness. Every check runs before anything
        is loaded. Every rank must call this.
        """
        if str(path) == "latest":
            path, meta = self._newest_good()
        else:
            path = Path(path)
            meta = self._verified(path)
        self._check_compatible(path, meta)
        try:
            self.batches.load_state_dict(meta["data_order"])
        except ValueError as exc:
            raise CheckpointError(f"{path}: {exc}") from None

        if self.sharded:
            tensors, _ = self._sharded_state()  # this rank's shards, which DCP reads into
            distributed.load_sharded(tensors, path)
            set_model_state_dict(self.model, tensors["model"])
            set_model_state_dict(self.ema.model, tensors["ema"])
            set_optimizer_state_dict(self.model, self.optimizer,
                                     _unflatten_optimizer(tensors["optimizer"], meta["optimizer"], param_key=str))
        else:
            device = str(self.device)
            self.model.load_state_dict(load_file(path / "model.safetensors", device=device))
            self.ema.model.load_state_dict(load_file(path / "ema.safetensors", device=device))
            # On the CPU: load_state_dict moves the moments to each parameter's device but leaves AdamW's step
            # counters where they are, and on a GPU they would cost a host sync per parameter per step.
            optimizer_tensors = load_file(path / "optimizer.safetensors")
            self.optimizer.load_state_dict(_unflatten_optimizer(optimizer_tensors, meta["optimizer"]))
        if self.posthoc_ema is not None:
            self.posthoc_ema.load_state_dict(load_file(path / POSTHOC_FILE, device=str(self.device)))
        if self.scaler and meta["grad_scaler"]:
            self.scaler.load_state_dict(meta["grad_scaler"])
        self.step, self.history, self._pending = meta["step"], meta["history"], meta["pending"]
        rng = {name: _unb64(text) for name, text in meta["rng"][self.dist.rank].items()}
        torch.set_rng_state(rng["torch"])
        self.generator.set_state(rng["generator"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        if self.dist.is_main:
            self._write_history()  # drop records the interrupted run logged after this checkpoint
        return path

    def _newest_good(self) -> tuple[Path, dict]:
        """(path, trainer.json) of the checkpoint `latest` names, else of the newest one that verifies."""
        pointer = self.checkpoint_dir / "latest"
        candidates = self.checkpoints()
        if pointer.is_file():
            named = pointer.read_text().strip()
            if STEP_DIR.fullmatch(named) and (self.checkpoint_dir / named).is_dir():
                candidates.remove(self.checkpoint_dir / named)
                candidates.insert(0, self.checkpoint_dir / named)
            else:
                _warn(f"{pointer} names {named!r}, which is not a checkpoint here; looking for the newest good one.")
        if not candidates:
            raise CheckpointError(f"No checkpoint to resume: {self.checkpoint_dir} holds none.")
        problems = []
        for path in candidates:
            try:
                meta = self._verified(path)
            except CheckpointError as err:
                problems.append(str(err))
                _warn(f"Skipping a damaged checkpoint: {err}")
                continue
            if problems:
                _warn(f"Resuming from {path}, the newest good checkpoint.")
            return path, meta
        raise CheckpointError(f"No usable checkpoint in {self.checkpoint_dir}: " + " ".join(problems))

    def _verified(self, path: Path) -> dict:
        """`verify_checkpoint(path)` with the hashing shared by the ranks (each hashes its share of the
        files) and one verdict for all: a checkpoint damaged for one rank is damaged for every rank."""
        try:
            meta, problem = verify_checkpoint(path, self.dist.rank, self.dist.world_size), None
        except CheckpointError as err:
            meta, problem = None, err
        if not distributed.all_true(problem is None, self.dist):
            raise problem or CheckpointError(f"{path}: another rank found it damaged (its message says how).")
        return meta

    def _check_compatible(self, path: Path, meta: dict):
        if meta["world_size"] != self.dist.world_size:
            raise CheckpointError(f"{path} was written by {meta['world_size']} processes and this run has "
                                  f"{self.dist.world_size}: each rank's RNG streams are restored, so resume "
                                  f"with the same number (torchrun --nproc_per_node {meta['world_size']}).")
        kind, ours = meta.get("kind", "safetensors"), "sharded" if self.sharded else "safetensors"
        if kind != ours:
            raise CheckpointError(f"{path} holds a {kind} checkpoint and this run writes {ours} ones: resume "
                                  f"with parallelism={'fsdp' if kind == 'sharded' else 'ddp'!r}, as it was written.")
        saved, ours = meta["model"], self._model_record
        if saved != ours:
            a, b = saved["config"] or {}, ours["config"] or {}
            diff = {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
            raise CheckpointError(f"{path} holds a {saved['class']} and this trainer's model is a "
                                  f"{ours['class']}; their configs differ in (checkpoint, this model): "
                                  f"{diff}.")
        if kind == "sharded":
            saved_shapes = meta["shapes"]
        else:
            with safe_open(str(path / "model.safetensors"), framework="pt") as f:
                saved_shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
        shapes = {k: list(v.shape) for k, v in self.model.state_dict().items()}  # full shapes, also of DTensors
        if saved_shapes != shapes:
            bad = sorted(k for k in set(saved_shapes) | set(shapes) if saved_shapes.get(k) != shapes.get(k))
            pairs = {k: (saved_shapes.get(k), shapes.get(k)) for k in bad[:5]}
            more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
            raise CheckpointError(f"{path}: the model's tensors differ from this model's; (checkpoint, this "
                                  f"model) shapes: {pairs}{more}.")
        saved = meta["config"].get("posthoc_ema_sigma_rels")
        saved = (tuple(saved) if saved else None, meta["config"].get("posthoc_snapshot_every"))
        ours = (self.cfg.posthoc_ema_sigma_rels, self.cfg.posthoc_snapshot_every)
        if ours[0] is not None and (saved != ours or not (path / POSTHOC_FILE).is_file()):
            raise CheckpointError(f"{path} was written with (posthoc_ema_sigma_rels, posthoc_snapshot_every) = "
                                  f"{saved} and this run has {ours}: a power-function EMA averages from step 1 "
                                  "on one grid of snapshots, so it cannot start or change mid-run. Resume "
                                  f"with {saved}, or start a new run in another out_dir.")


# ---------------------------------------------------------------------------------- helpers
def verify_checkpoint(path: str | Path, rank: int = 0, world_size: int = 1) -> dict:
    """trainer.json of the checkpoint at `path`, once its files are all there and the tensor files have
    the size and SHA-256 it records; else a CheckpointError that says what is wrong. Of world_size
    ranks, rank `rank` checks the size of every file and the SHA-256 of its share (every
    world_size-th file, from its rank on)."""
    path = Path(path)
    if not (path / "trainer.json").is_file():
        missing = [f for f in CHECKPOINT_FILES if not (path / f).is_file()]
        raise CheckpointError(f"{path} is not a checkpoint (missing {', '.join(missing)}).")
    try:
        meta = json.loads((path / "trainer.json").read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}/trainer.json is not valid JSON ({err}).") from None
    if not isinstance(meta, dict) or meta.get("format") not in READS:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointError(f"{path}: checkpoint format {found}, this trainer reads {READS}.")
    files = meta.get("files") or dict.fromkeys(TENSOR_FILES)  # format 1 recorded no sizes or digests
    missing = [name for name in files if not (path / name).is_file()]
    if missing:
        raise CheckpointError(f"{path} is not a checkpoint (missing {', '.join(missing)}).")
    for i, (name, want) in enumerate(sorted(files.items())):
        if want is None:
            continue
        size_only = {"bytes": (path / name).stat().st_size, "sha256": want["sha256"]}
        got = _file_record(path / name) if i % world_size == rank else size_only
        if got != want:
            what = "size" if got["bytes"] != want["bytes"] else "SHA-256"
            raise CheckpointError(f"{path}/{name} is damaged: its {what} differs from the one recorded "
                                  f"when it was written ({got} != {want}).")
    return meta


def _file_record(path: Path) -> dict:
    """{"bytes": size, "sha256": hex digest} of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()}


def _warn(message: str):
    print(message, file=sys.stderr, flush=True)


def _due(step: int, every: int | None, last: bool) -> bool:
    """Whether an every-N-steps action (None: never) runs after `step`; it always runs after the last."""
    return every is not None and (step % every == 0 or last)


def _model_record(model: nn.Module) -> dict:
    """The model's class name and config (JSON-normalised: tuples become lists), or None for no config."""
    config = getattr(model, "config", None)
    config = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else None
    return json.loads(json.dumps({"class": type(model).__name__, "config": config}))


def _cpu(tensors: dict) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies, as safetensors wants them (it refuses tensors that share memory)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state_dict as (its tensors keyed "<parameter>.<name>", the JSON-able rest); the
    parameter is an index (optimizer.state_dict) or a name (get_optimizer_state_dict, under FSDP)."""
    tensors, scalars = {}, {}
    for param, param_state in state["state"].items():
        for name, value in param_state.items():
            (tensors if torch.is_tensor(value) else scalars)[f"{param}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], rest: dict, param_key=int) -> dict:
    """The inverse of `_flatten_optimizer`: a state_dict for optimizer.load_state_dict (param_key=int)
    or set_optimizer_state_dict (param_key=str)."""
    state = {}
    for key, value in [*tensors.items(), *rest["scalars"].items()]:
        param, name = key.rsplit(".", 1)  # a parameter's name has dots, a state's name none
        state.setdefault(param_key(param), {})[name] = value
    # JSON turned tuples (AdamW's betas) into lists.
    groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in group.items()}
              for group in rest["param_groups"]]
    return {"state": state, "param_groups": groups}


def _b64(t: torch.Tensor) -> str:
    """A uint8 tensor (an RNG state) as base64 text."""
    return base64.b64encode(t.numpy().tobytes()).decode("ascii")


def _unb64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)

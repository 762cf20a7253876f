"""Checkpoints: everything a training run needs to continue, written whole or not at all, verified
when read back, and the newest good one found after a crash. The Trainer (trainer.py) is the one
user: a `Checkpointer` holds the folder and who this process is, and a `TrainingState` names the live
objects a checkpoint is written from and restored into.

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
(parallelism "fsdp" or "hsdp", as many ranks); the Trainer's `export_ema()` gives the whole EMA model to save
and share. Nothing is pickled.

Each checkpoint is written into a temporary directory, flushed to the disk (fsync) and then renamed
into place, and `latest` is replaced the same way after it, so a crash or a power loss at any moment
leaves the previous checkpoint and pointer intact. trainer.json records the size and SHA-256 of each
tensor file: `Checkpointer.load` verifies them (each rank hashing its share of the files), and if the
newest checkpoint is missing or damaged it says so and falls back to the newest good one.

Many nodes, one shared file system: a directory listing on one node can lag what another node has
just written, so no rank relies on its own listing. A shard file's name is built from its rank
(`distributed.shard_file`): each rank records the size and SHA-256 of the file it wrote itself, and
DCP reads back exactly the files trainer.json names, each looked up by its name. Which checkpoints
exist, and which one `latest` names, is rank 0's reading, sent to every rank, so that all of them
try the same checkpoints in the same order. Only rank 0 lists folders: to find the checkpoints, and
to prune old ones and the leftovers of interrupted writes.

Resume is exact: weights, EMA (and post-hoc EMAs), optimizer moments, the step (the learning rate is
a function of the step, so there is no scheduler state beyond it), the RNG states of every rank
(torch's global CPU and CUDA generators and loss_fn's generator) and the position in the data order.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from ..weights import atomic_write, flush, publish
from . import distributed
from .distributed import DistInfo
from .ema import PowerEMA
from .loader import ShuffledBatches

TENSOR_FILES = ("model.safetensors", "ema.safetensors", "optimizer.safetensors")
CHECKPOINT_FILES = (*TENSOR_FILES, "trainer.json")
POSTHOC_FILE = "posthoc_ema.safetensors"  # in checkpoints of runs with posthoc_ema_sigma_rels
FORMAT = 2  # version of the checkpoint layout; 2 added the tensor files' sizes and SHA-256
READS = (1, 2)  # the formats `load` reads (1: nothing to verify the tensor files by)
STEP_DIR = re.compile(r"step_\d{8}")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, or written for another model or run."""


@dataclass
class TrainingState:
    """The live objects a checkpoint is written from and restored into (in place)."""

    model: nn.Module  # the module itself, not its DDP or torch.compile wrapper; under FSDP, sharded in place
    ema: nn.Module  # the EMA of the model (sharded alike)
    optimizer: torch.optim.Optimizer  # over the model's parameters
    data_order: ShuffledBatches  # its load_state_dict refuses (ValueError) another seed, batch or data size
    generator: torch.Generator  # this rank's generator for loss_fn
    device: torch.device  # the model's: whole-file tensors load onto it, and its CUDA RNG state is saved
    config: Any  # the run's config dataclass (TrainerConfig), recorded whole; its posthoc_ema_* fields must match
    model_record: dict  # `model_record(model)`, taken before FSDP renamed the model's class
    posthoc_ema: PowerEMA | None = None
    scaler: torch.amp.GradScaler | None = None


@dataclass
class Progress:
    """How far the run is: optimizer steps done, its history records, and the scalars not yet logged."""

    step: int
    history: list[dict]
    pending: dict


class Checkpointer:
    """Writes and reads the checkpoints of one run in `directory` (out_dir/checkpoints).

    sharded: FSDP's layout (each rank writes and reads its own shard file), else whole files that
    rank 0 writes. keep: the newest checkpoints kept (None: all). Every rank calls `save`, `load` and
    `has_checkpoints`, with the same arguments.
    """

    def __init__(self, directory: str | Path, dist: DistInfo, sharded: bool, keep: int | None):
        self.directory, self.dist, self.sharded, self.keep = Path(directory), dist, sharded, keep

    # ------------------------------------------------------------------------------ the folder
    def checkpoints(self) -> list[Path]:
        """The checkpoint directories, newest first (not yet verified), as this process lists them."""
        if not self.directory.is_dir():
            return []
        found = [d for d in self.directory.iterdir() if STEP_DIR.fullmatch(d.name) and d.is_dir()]
        return sorted(found, reverse=True)

    def has_checkpoints(self) -> bool:
        """Whether the folder holds a checkpoint (or a `latest` pointer) that a fresh run would
        overwrite: rank 0's answer, on every rank."""
        found = self.dist.is_main and (bool(self.checkpoints()) or (self.directory / "latest").exists())
        return distributed.broadcast_json(found, self.dist)

    def latest(self) -> str | None:
        """The name that `latest` holds (not checked), None without a pointer."""
        pointer = self.directory / "latest"
        return pointer.read_text().strip() if pointer.is_file() else None

    # ------------------------------------------------------------------------------ writing
    def save(self, state: TrainingState, progress: Progress) -> Path | None:
        """Write step_XXXXXXXX (of progress.step) and point `latest` at it; its path on rank 0, else None.

        Each rank's RNG states are gathered, and under FSDP each rank writes its own shards. Rank 0
        writes the rest.
        """
        gathered = {name: distributed.all_gather(t, self.dist) for name, t in _rng_state(state).items()}
        rng = [{name: _b64(ranks[r]) for name, ranks in gathered.items()} for r in range(self.dist.world_size)]
        name = f"step_{progress.step:08d}"
        tmp = self.directory / f".{name}.tmp"
        main = self.dist.is_main
        if main:
            shutil.rmtree(tmp, ignore_errors=True)  # an interrupted write's
            tmp.mkdir(parents=True)
        try:
            entries = self._write_tensors(state, tmp)
            path = self._publish(state, progress, tmp, name, {**entries, "rng": rng}) if main else None
        finally:
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
        distributed.barrier(self.dist)  # on return, the checkpoint exists for every rank
        return path

    def _write_tensors(self, state: TrainingState, tmp: Path) -> dict:
        """Write the tensor files into `tmp`; on rank 0, trainer.json's entries that describe them."""
        if self.sharded:
            distributed.barrier(self.dist)  # rank 0 has made tmp
            tensors, optimizer = _sharded_state(state)
            distributed.save_sharded(tensors, tmp)
            # Each rank describes the file it wrote: its name is known, and it is on this rank's disk cache.
            own = tmp / distributed.shard_file(self.dist.rank)
            share = {own.name: _file_record(own)} if own.is_file() else {}  # none: all this rank's shards empty
            files = {n: r for part in distributed.all_gather_json(share, self.dist) for n, r in part.items()}
            shapes = {k: list(v.shape) for k, v in tensors["model"].items()}
            return {"kind": "sharded", "files": files, "optimizer": optimizer, "shapes": shapes}
        if not self.dist.is_main:
            return {}
        optimizer_tensors, optimizer = _flatten_optimizer(state.optimizer.state_dict())
        save_file(_cpu(state.model.state_dict()), tmp / "model.safetensors")
        save_file(_cpu(state.ema.state_dict()), tmp / "ema.safetensors")
        save_file(_cpu(optimizer_tensors), tmp / "optimizer.safetensors")
        if state.posthoc_ema is not None:
            save_file(_cpu(state.posthoc_ema.state_dict()), tmp / POSTHOC_FILE)
        files = TENSOR_FILES + ((POSTHOC_FILE,) if state.posthoc_ema is not None else ())
        return {"kind": "safetensors", "files": {f: _file_record(tmp / f) for f in files}, "optimizer": optimizer}

    def _publish(self, state: TrainingState, progress: Progress, tmp: Path, name: str, entries: dict) -> Path:
        """Rank 0: write trainer.json beside the tensor files in `tmp`, flush them all to the disk, rename
        `tmp` to `name` and point `latest` at it."""
        meta = {
            "format": FORMAT,
            "step": progress.step,
            "config": dataclasses.asdict(state.config),
            "model": state.model_record,
            "world_size": self.dist.world_size,
            "data_order": state.data_order.state_dict(),
            "grad_scaler": state.scaler.state_dict() if state.scaler else None,
            "history": progress.history,
            "pending": progress.pending,
            **entries,  # kind, files, optimizer (the param groups and non-tensor state), rng (per rank)
        }
        (tmp / "trainer.json").write_text(json.dumps(meta))
        for f in (*meta["files"], "trainer.json"):
            flush(tmp / f)
        final = self.directory / name
        old = tmp.with_name(tmp.name + ".old")
        if final.exists():  # this step was saved before (a run resumed from an older checkpoint)
            os.replace(final, old)
        try:
            publish(tmp, final, mode=0o777)
        finally:
            shutil.rmtree(old, ignore_errors=True)
        atomic_write(self.directory / "latest", lambda p: Path(p).write_text(name + "\n"))
        self._prune(progress.step)
        return final

    def _prune(self, step: int):
        """Keep the newest `keep` checkpoints up to `step`; remove leftovers of interrupted writes."""
        for leftover in self.directory.glob(".step_*"):
            shutil.rmtree(leftover, ignore_errors=True)
        for leftover in self.directory.glob(".latest.*.tmp"):
            leftover.unlink(missing_ok=True)
        if self.keep:
            done = [d for d in self.checkpoints() if int(d.name[5:]) <= step]  # newest first
            for d in done[self.keep:]:
                shutil.rmtree(d)

    # ------------------------------------------------------------------------------ reading
    def load(self, state: TrainingState, path: str | Path = "latest") -> tuple[Path, Progress]:
        """Restore `state` from a checkpoint directory (default: the one `latest` names, or if that one
        is missing or damaged, the newest good one, with a message for each one skipped), this rank's
        RNG states with it; (its path, the progress it records).

        The files are verified against the sizes and SHA-256 that trainer.json records. The model
        must have the checkpoint's class, config and tensor shapes; the data order (batch_size, seed,
        the data set's size), the number of ranks and the checkpoint's kind (FSDP's shards or whole
        files) must match (the data order and each rank's RNG streams depend on them). Other config
        fields may change (train longer, another lr), at the price of bit-exactness. Every check runs
        before anything is loaded.
        """
        if str(path) == "latest":
            path, meta = self._newest_good()
        else:
            path = Path(path)
            meta = self._verified(path)
        self._check_compatible(state, path, meta)
        try:
            state.data_order.load_state_dict(meta["data_order"])
        except ValueError as exc:
            raise CheckpointError(f"{path}: {exc}") from None

        if self.sharded:
            tensors, _ = _sharded_state(state)  # this rank's shards, which DCP reads into
            distributed.load_sharded(tensors, path, list(meta["files"]))
            set_model_state_dict(state.model, tensors["model"])
            set_model_state_dict(state.ema, tensors["ema"])
            set_optimizer_state_dict(state.model, state.optimizer,
                                     _unflatten_optimizer(tensors["optimizer"], meta["optimizer"], param_key=str))
        else:
            device = str(state.device)
            state.model.load_state_dict(load_file(path / "model.safetensors", device=device))
            state.ema.load_state_dict(load_file(path / "ema.safetensors", device=device))
            # On the CPU: load_state_dict moves the moments to each parameter's device but leaves AdamW's step
            # counters where they are, and on a GPU they would cost a host sync per parameter per step.
            optimizer_tensors = load_file(path / "optimizer.safetensors")
            state.optimizer.load_state_dict(_unflatten_optimizer(optimizer_tensors, meta["optimizer"]))
        if state.posthoc_ema is not None:
            state.posthoc_ema.load_state_dict(load_file(path / POSTHOC_FILE, device=str(state.device)))
        if state.scaler and meta["grad_scaler"]:
            state.scaler.load_state_dict(meta["grad_scaler"])
        rng = {name: _unb64(text) for name, text in meta["rng"][self.dist.rank].items()}
        if rng["generator"].numel() != state.generator.get_state().numel():
            raise CheckpointError(f"{path} holds the state of a loss generator of another device type than this run's "
                                  f"({state.generator.device.type}): the generator lives on the training device, so "
                                  "resume on the kind of device that wrote the checkpoint.")
        torch.set_rng_state(rng["torch"])
        state.generator.set_state(rng["generator"])
        if "cuda" in rng and state.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], state.device)
        return path, Progress(meta["step"], meta["history"], meta["pending"])

    def _newest_good(self) -> tuple[Path, dict]:
        """(path, trainer.json) of the checkpoint `latest` names, else of the newest one that verifies."""
        candidates = distributed.broadcast_json(self._candidates() if self.dist.is_main else None, self.dist)
        if not candidates:
            raise CheckpointError(f"No checkpoint to resume: {self.directory} holds none.")
        problems = []
        for path in (self.directory / name for name in candidates):
            try:
                meta = self._verified(path)
            except CheckpointError as err:
                problems.append(str(err))
                _warn(f"Skipping a damaged checkpoint: {err}")
                continue
            if problems:
                _warn(f"Resuming from {path}, the newest good checkpoint.")
            return path, meta
        raise CheckpointError(f"No usable checkpoint in {self.directory}: " + " ".join(problems))

    def _candidates(self) -> list[str]:
        """Rank 0: the checkpoints' names in the order to try them, the one `latest` names first."""
        candidates = [d.name for d in self.checkpoints()]
        named = self.latest()
        if named is not None:
            if STEP_DIR.fullmatch(named) and (self.directory / named).is_dir():
                if named in candidates:
                    candidates.remove(named)
                candidates.insert(0, named)
            else:
                pointer = self.directory / "latest"
                _warn(f"{pointer} names {named!r}, which is not a checkpoint here; looking for the newest good one.")
        return candidates

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

    def _check_compatible(self, state: TrainingState, path: Path, meta: dict):
        if meta["world_size"] != self.dist.world_size:
            raise CheckpointError(f"{path} was written by {meta['world_size']} processes and this run has "
                                  f"{self.dist.world_size}: each rank's RNG streams are restored, so resume "
                                  f"with the same number (torchrun --nproc_per_node {meta['world_size']}).")
        kind, ours = meta.get("kind", "safetensors"), "sharded" if self.sharded else "safetensors"
        if kind != ours:
            raise CheckpointError(f"{path} holds a {kind} checkpoint and this run writes {ours} ones: resume "
                                  f"with parallelism={'fsdp' if kind == 'sharded' else 'ddp'!r}, as it was written.")
        saved, ours = meta["model"], state.model_record
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
        shapes = {k: list(v.shape) for k, v in state.model.state_dict().items()}  # full shapes, also of DTensors
        if saved_shapes != shapes:
            bad = sorted(k for k in set(saved_shapes) | set(shapes) if saved_shapes.get(k) != shapes.get(k))
            pairs = {k: (saved_shapes.get(k), shapes.get(k)) for k in bad[:5]}
            more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
            raise CheckpointError(f"{path}: the model's tensors differ from this model's; (checkpoint, this "
                                  f"model) shapes: {pairs}{more}.")
        saved = meta["config"].get("posthoc_ema_sigma_rels")
        saved = (tuple(saved) if saved else None, meta["config"].get("posthoc_snapshot_every"))
        ours = (state.config.posthoc_ema_sigma_rels, state.config.posthoc_snapshot_every)
        if ours[0] is not None and (saved != ours or not (path / POSTHOC_FILE).is_file()):
            raise CheckpointError(f"{path} was written with (posthoc_ema_sigma_rels, posthoc_snapshot_every) = "
                                  f"{saved} and this run has {ours}: a power-function EMA averages from step 1 "
                                  "on one grid of snapshots, so it cannot start or change mid-run. Resume "
                                  f"with {saved}, or start a new run in another out_dir.")


def verify_checkpoint(path: str | Path, rank: int = 0, world_size: int = 1) -> dict:
    """trainer.json of the checkpoint at `path`, once its files are all there and the tensor files have
    the size and SHA-256 it records; else a CheckpointError that says what is wrong. Of world_size
    ranks, rank `rank` checks the size of every file and the SHA-256 of its share (every
    world_size-th file, from its rank on). The files are the ones trainer.json names, each looked up
    by its name: the folder is never listed."""
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


def model_record(model: nn.Module) -> dict:
    """The model's class name and config (JSON-normalised: tuples become lists), or None for no config."""
    config = getattr(model, "config", None)
    config = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else None
    return json.loads(json.dumps({"class": type(model).__name__, "config": config}))


# ---------------------------------------------------------------------------------- helpers
def _file_record(path: Path) -> dict:
    """{"bytes": size, "sha256": hex digest} of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()}


def _warn(message: str):
    print(message, file=sys.stderr, flush=True)


def _rng_state(state: TrainingState) -> dict[str, torch.Tensor]:
    """This rank's RNG states, as uint8 tensors."""
    rng = {"torch": torch.get_rng_state(), "generator": state.generator.get_state()}
    if state.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(state.device)
    return rng


def _sharded_state(state: TrainingState) -> tuple[dict, dict]:
    """FSDP: this rank's shards (DTensors) of the model, the EMA and the optimizer state, for DCP to
    write or to read into, and the optimizer's JSON-able rest (its parameters named)."""
    optimizer, rest = _flatten_optimizer(get_optimizer_state_dict(state.model, state.optimizer))
    model, ema = get_model_state_dict(state.model), get_model_state_dict(state.ema)
    return {"model": model, "ema": ema, "optimizer": optimizer}, rest


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

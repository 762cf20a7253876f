"""Weights as safetensors, with the model's config stored beside them in the file's metadata.

Loading checks the config first: weights from another config are refused with both configs
named, never half-loaded. Writes are atomic (temporary file, fsync, then rename), so a crash or a
power loss mid-write leaves the previous file intact. Nothing is ever unpickled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .paths import ASSETS_DIR


class WeightsError(RuntimeError):
    """Weights that do not fit the model asked for, or a file that is not safetensors."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path: str | Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def flush(path: str | Path, mode: int = 0o666):
    """Give a new file or directory the permissions a plain `open` would (`mode` less the umask,
    where mkstemp, mkdtemp and safetensors make them owner-only) and put its data, or a directory's
    entries, on the disk (fsync)."""
    os.chmod(path, mode & ~_umask())
    _fsync(path)


def publish(tmp: str | Path, path: str | Path, mode: int = 0o666):
    """Make a finished temporary file or directory `tmp` the real `path`: `flush` it, rename it
    atomically, and fsync the parent directory's entry too, so that after a crash or a power loss
    the name holds the old data or the new, whole."""
    tmp, path = Path(tmp), Path(path)
    flush(tmp, mode)
    os.replace(tmp, path)
    _fsync(path.parent)


def atomic_write(path: str | Path, write) -> Path:
    """Call `write(tmp_path)` then publish it as `path`, so readers see the old or the new file, whole,
    even after a crash or a power loss."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        publish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def save_weights(model: torch.nn.Module, path: str | Path, kind: str, extra: dict | None = None):
    """Save `model.state_dict()` with `model.config` (a dataclass) and `extra` in the metadata."""
    meta = {"kind": kind, "config": json.dumps(dataclasses.asdict(model.config), sort_keys=True)}
    meta["extra"] = json.dumps(extra or {}, sort_keys=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def read_weights(path: str | Path, kind: str) -> tuple[dict, dict, dict]:
    """(state_dict, config dict, extra dict) from a file written by `save_weights`."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file.")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(f"{path}: not a readable safetensors file ({exc}).") from exc
    if meta.get("kind") != kind:
        raise WeightsError(f"{path}: holds weights of kind {meta.get('kind')!r}, not {kind!r}.")
    return state, json.loads(meta["config"]), json.loads(meta.get("extra", "{}"))


def load_into(model: torch.nn.Module, path: str | Path, kind: str) -> dict:
    """Load weights into an existing model after checking that the configs agree; return extra."""
    state, config, extra = read_weights(path, kind)
    ours = json.loads(json.dumps(dataclasses.asdict(model.config)))  # tuples -> lists, as saved
    if config != ours:
        diff = {k: (config.get(k), ours.get(k)) for k in set(config) | set(ours)
                if config.get(k) != ours.get(k)}
        raise WeightsError(f"{path}: saved for another config; (saved, this model) differ in {diff}.")
    model.load_state_dict(state)
    return extra


def load_model(cls, config_cls, path: str | Path, kind: str):
    """Build `cls(config_cls(**saved config))` and load its weights: (model, extra)."""
    state, config, extra = read_weights(path, kind)
    model = cls(config_cls(**config))
    model.load_state_dict(state)
    return model, extra


COMPONENT_WEIGHTS = "diffusion_pytorch_model.safetensors"  # diffusers' file name in a component folder


def missing_message(what: str) -> str:
    return f"{what}; copy the whole folder that save_pretrained wrote, or save the pipeline again."


def read_component_config(folder: str | Path) -> tuple[str | None, dict]:
    """(class name, config) of a pipeline component folder (pipeline.save_component), clear errors if absent."""
    folder = Path(folder)
    path = folder / "config.json"
    if not folder.is_dir():
        raise WeightsError(missing_message(f"{folder.parent} has no {folder.name}/ folder"))
    if not path.is_file():
        raise WeightsError(missing_message(f"{folder} is not a pipeline component folder (no config.json)"))
    config = json.loads(path.read_text())
    return config.pop("_class_name", None), config


def read_component_weights(folder: str | Path, name: str) -> dict:
    """The state dict of the trained component `name` in `folder`, clear errors if missing or corrupt."""
    path = Path(folder) / COMPONENT_WEIGHTS
    if not path.is_file():
        raise WeightsError(missing_message(f"{folder} has no {COMPONENT_WEIGHTS}: the {name}'s weights are missing"))
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise WeightsError(missing_message(f"{path} is not a readable safetensors file ({err}): "
                                    "truncated or corrupted")) from err


def weights_hash(model: torch.nn.Module) -> str:
    """A short SHA-256 of the config and every parameter's bytes: the key of derived caches. Config
    fields marked `metadata={"hashed": False}` (a precision policy such as a VAE's force_upcast) are left out."""
    unhashed = {f.name for f in dataclasses.fields(model.config) if not f.metadata.get("hashed", True)}
    config = {k: v for k, v in dataclasses.asdict(model.config).items() if k not in unhashed}
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def asset(name: str) -> Path:
    """Path of a weights file (or folder) shipped with the package, with a clear error if it is missing."""
    path = ASSETS_DIR / name
    if not path.exists():
        raise WeightsError(f"Shipped weights {path} are missing; reinstall tutorial_lib or "
                           "retrain them with the command in docs/shipped_weights.md.")
    return path

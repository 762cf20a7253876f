"""Fashion-MNIST encoded once by the VAE, cached as memory-mapped arrays.

Layout: `data/latents/vae-<hash>/{train,test}_latents.npy`, `{train,test}_labels.npy`, `meta.json`.
The hash covers the VAE's config and every weight (`weights.weights_hash`), so new weights get a
new cache and the stale one is removed. An `image_size` above 32 encodes the images upsampled to that
size (`to_model_images(images, size)`), for more latent tokens per image (64 px: 16x16 latents, 256
tokens at patch 1; notebook 06's masking study), cached beside the 32-px cache as
`vae-<hash>-<size>px`. Latents are the VAE's posterior means, already scaled:
z_s = (z - shift_factor) * scaling_factor. The factors were measured from data when the VAE was
trained; `meta.json` records them with the mean and std of the cached training latents (about 0, 1).

Several processes may build the same cache at once (two notebook kernels, two runs, the ranks of a
torchrun job) without harm: each encodes into a private folder `.vae-<hash>.tmp-<pid>-<random>` and
publishes it with one atomic rename; whoever renames second finds the cache there, keeps it and
drops its own. A published folder is never written again, so one that fails the check on opening
(meta.json or an array missing, truncated, or of the wrong shape: a crash of an older version that
wrote in place) is damaged: it is reported and rebuilt. Under torchrun it is cheaper still to let
rank 0 build while the other ranks wait (`train.distributed.main_first`, as the CLI does).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..paths import data_root, shown
from ..weights import weights_hash
from .fashion_mnist import IMAGE_SIZE, check_image_size, load_fashion_mnist, to_model_images

SPLITS = ("train", "test")
LEFTOVER_AGE_S = 24 * 3600  # a private folder untouched for this long belongs to a dead process


class LatentCache:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.meta = json.loads((self.path / "meta.json").read_text())

    def latents(self, split: str = "train") -> np.ndarray:
        """Scaled latents, memory-mapped: [N, C, h, w] float32 (read-only)."""
        return np.load(self.path / f"{split}_latents.npy", mmap_mode="r")

    def labels(self, split: str = "train") -> np.ndarray:
        return np.load(self.path / f"{split}_labels.npy")

    def tensors(self, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """(latents [N, C, h, w], labels [N]) copied into memory as torch tensors."""
        return torch.from_numpy(np.array(self.latents(split))), torch.from_numpy(self.labels(split))

    def __repr__(self):
        m = self.meta
        return (f"LatentCache({shown(self.path)}, shape={m['shape']}, scaling_factor={m['scaling_factor']:.4f}, "
                f"train mean/std={m['train_mean']:.3f}/{m['train_std']:.3f})")


def _write(path: Path, write):
    """Create the file `path` with `write(f)`, flushed to disk before its folder is published."""
    with open(path, "xb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _save_npy(path: Path, array: np.ndarray):
    _write(path, lambda f: np.save(f, array))


@torch.no_grad()
def _encode(vae, images: np.ndarray, out: Path, batch_size: int, image_size: int, desc: str):
    x = to_model_images(images, image_size)
    device = next(vae.parameters()).device
    z = torch.cat([vae.encode_to_latents(c.to(device)).cpu()
                   for c in tqdm(x.split(batch_size), desc=desc, leave=False)])
    _save_npy(out, z.numpy())
    return z


def _problem(path: Path) -> str | None:
    """Why the folder `path` is not a complete cache, or None if it is one.

    Opening an array memory-mapped reads only its header and checks the file's size against it, so a
    missing, truncated or foreign file is caught without reading any latents.
    """
    try:
        meta = json.loads((path / "meta.json").read_text())
        for split in SPLITS:
            n = meta["counts"][split]
            z = np.load(path / f"{split}_latents.npy", mmap_mode="r")
            y = np.load(path / f"{split}_labels.npy", mmap_mode="r")
            if z.shape != (n, *meta["shape"]) or y.shape != (n,):
                return (f"{split} arrays of shapes {z.shape} and {y.shape}, "
                        f"but meta.json says {n} x {meta['shape']}")
    except (OSError, EOFError, ValueError, KeyError, TypeError) as err:
        return f"{type(err).__name__}: {err}"
    return None


def _private(base: Path, name: str) -> Path:
    """A new name in `base` for this process alone; the leading dot keeps it out of `vae-*`."""
    return base / f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"


def _discard(folder: Path):
    """Delete `folder`, first renamed aside so that no reader ever finds it half deleted."""
    trash = _private(folder.parent, folder.name)
    try:
        folder.rename(trash)
    except FileNotFoundError:  # another process is deleting it
        return
    shutil.rmtree(trash, ignore_errors=True)


def _remove_stale(base: Path, vae_hash: str):
    """Delete the finished caches of other VAEs, and private folders that a dead process left.

    A `vae-*` folder is finished (builds are published by a rename), so deleting one of another VAE
    never cuts into a write; this VAE's caches at other image sizes are kept. A private `.vae-*.tmp-*`
    folder may be another process's build in progress: it is deleted only once nothing has been
    written in it for `LEFTOVER_AGE_S`. No build takes that long, and unlike a check of its pid, an
    age is also right on a disk that several machines share. (A folder renamed aside by `_discard` keeps its old age: two processes may both
    delete it, which is harmless.)
    """
    for folder in base.glob("vae-*"):
        if folder.name.split("-")[1] != vae_hash and folder.is_dir():  # weights changed: never used again
            _discard(folder)
    for folder in base.glob(".vae-*.tmp-*"):
        try:
            age = time.time() - folder.stat().st_mtime
        except FileNotFoundError:
            continue
        if age > LEFTOVER_AGE_S:
            shutil.rmtree(folder, ignore_errors=True)


def _build(vae, folder: Path, vae_hash: str, batch_size: int, image_size: int):
    """Encode both splits into `folder`, meta.json last."""
    stats = {}
    for split in SPLITS:
        images, labels = load_fashion_mnist(split)
        stats[split] = _encode(vae, images, folder / f"{split}_latents.npy", batch_size, image_size,
                                 f"encoding {split}")
        _save_npy(folder / f"{split}_labels.npy", labels)
    meta = {
        "vae_hash": vae_hash, "image_size": image_size, "shape": list(stats["train"].shape[1:]),
        "counts": {s: len(stats[s]) for s in SPLITS},
        "scaling_factor": vae.config.scaling_factor, "shift_factor": vae.config.shift_factor,
        "train_mean": float(stats["train"].mean()), "train_std": float(stats["train"].std()),
    }
    _write(folder / "meta.json", lambda f: f.write(json.dumps(meta, indent=1).encode()))


def _publish(tmp: Path, path: Path):
    """Rename the finished build `tmp` to `path`: atomic, so others see no cache or a whole one.

    If another process published the same cache first, the rename fails and theirs is kept.
    """
    try:
        tmp.rename(path)
    except OSError as err:
        if _problem(path) is not None:
            raise RuntimeError(f"Could not move the new latent cache to {path} ({type(err).__name__}: "
                               f"{err}). Delete {path} if it exists and run again.") from err


def latent_cache(vae=None, root: str | Path | None = None, batch_size: int = 500,
                 image_size: int = IMAGE_SIZE) -> LatentCache:
    """The cache for this VAE (the shipped one by default) at `image_size` px, building it on first use.

    Safe to call from several processes at once (see the module's docstring); under torchrun, let
    rank 0 build it while the others wait: `distributed.main_first(latent_cache, info)`.
    """
    if vae is None:
        from ..vae.autoencoder import load_vae

        vae = load_vae()
    vae.eval()
    base = Path(root) if root is not None else data_root() / "latents"
    check_image_size(image_size)
    vae_hash = weights_hash(vae)
    key = f"vae-{vae_hash}" + (f"-{image_size}px" if image_size != IMAGE_SIZE else "")
    path = base / key
    if path.exists():
        problem = _problem(path)
        if problem is None:
            return LatentCache(path)
        print(f"Rebuilding the latent cache {path}: it is incomplete or damaged ({problem}).")
        _discard(path)
    base.mkdir(parents=True, exist_ok=True)
    _remove_stale(base, vae_hash)
    tmp = _private(base, key)
    tmp.mkdir()
    try:
        _build(vae, tmp, vae_hash, batch_size, image_size)
        _publish(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # still there unless it was published
    return LatentCache(path)

"""Fashion-MNIST encoded once by the VAE, cached as memory-mapped arrays.

Layout: `data/latents/vae-<hash>/{train,test}_latents.npy`, `{train,test}_labels.npy`, `meta.json`.
The hash covers the VAE's config and every weight (`weights.weights_hash`), so new weights get a
new cache and the stale one is removed. Latents are the VAE's posterior means, already scaled:
z_s = (z - shift_factor) * scaling_factor. The factors were measured from data when the VAE was
trained; `meta.json` records them with the mean and std of the cached training latents (about 0, 1).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..paths import data_root
from ..weights import atomic_write, weights_hash
from .fashion_mnist import load_fashion_mnist, to_model_images

SPLITS = ("train", "test")


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
        return (f"LatentCache({self.path}, shape={m['shape']}, scaling_factor={m['scaling_factor']:.4f}, "
                f"train mean/std={m['train_mean']:.3f}/{m['train_std']:.3f})")


def _save_npy(path: Path, array: np.ndarray):
    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, array)

    atomic_write(path, write)


@torch.no_grad()
def _encode(vae, images: np.ndarray, out: Path, batch_size: int, desc: str):
    x = to_model_images(images)
    device = next(vae.parameters()).device
    z = torch.cat([vae.encode_to_latents(c.to(device)).cpu()
                   for c in tqdm(x.split(batch_size), desc=desc, leave=False)])
    _save_npy(out, z.numpy())
    return z


def latent_cache(vae=None, root: str | Path | None = None, batch_size: int = 500) -> LatentCache:
    """The cache for this VAE (the shipped one by default), building it on first use."""
    if vae is None:
        from ..vae.autoencoder import load_vae

        vae = load_vae()
    vae.eval()
    base = Path(root) if root is not None else data_root() / "latents"
    key = f"vae-{weights_hash(vae)}"
    path = base / key
    if (path / "meta.json").is_file():
        return LatentCache(path)
    for stale in base.glob("vae-*"):  # weights changed: older caches can never be used again
        shutil.rmtree(stale, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)
    stats = {}
    for split in SPLITS:
        images, labels = load_fashion_mnist(split)
        z = _encode(vae, images, path / f"{split}_latents.npy", batch_size, f"encoding {split}")
        _save_npy(path / f"{split}_labels.npy", labels)
        stats[split] = z
    meta = {
        "vae_hash": key[4:], "shape": list(stats["train"].shape[1:]),
        "counts": {s: len(stats[s]) for s in SPLITS},
        "scaling_factor": vae.config.scaling_factor, "shift_factor": vae.config.shift_factor,
        "train_mean": float(stats["train"].mean()), "train_std": float(stats["train"].std()),
    }
    atomic_write(path / "meta.json", lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=1)))
    return LatentCache(path)

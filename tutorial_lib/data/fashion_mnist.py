"""The real Fashion-MNIST (Xiao, Rasul & Vollgraf, 2017): finding it, checking it, loading it.

Sources, tried in order:
  1. an explicit `root=` argument, or the environment variable `FASHION_MNIST_DIR`;
  2. `data/fashion-mnist/` or torchvision's layout `data/FashionMNIST/raw/` (see `paths.data_root`);
  3. `/usr/share/datasets/fashion-mnist/` (Debian/Ubuntu package `dataset-fashion-mnist`);
  4. torchvision's download into `data/` (needs the internet).

The files are IDX (LeCun et al.): a big-endian magic number (0x0000 08 NDIM), NDIM big-endian
uint32 sizes, then uint8 values. Every file is checked before anything is returned.
"""

from __future__ import annotations

import gzip
import os
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..paths import data_root
from .captions import caption_for
from .classes import CLASSES
SPLIT_SIZES = {"train": 60_000, "test": 10_000}
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
IMAGE_SIZE = 32  # 28x28 padded by 2 on each side, so that three halvings stay integral

HOW_TO_GET = (
    "Fashion-MNIST was not found. Any one of these fixes it:\n"
    "  - Debian/Ubuntu/Colab: `sudo apt-get install dataset-fashion-mnist` "
    "(installs /usr/share/datasets/fashion-mnist/);\n"
    "  - download the four *-ubyte.gz files from "
    "https://github.com/zalandoresearch/fashion-mnist (data/fashion) into {local};\n"
    "  - point FASHION_MNIST_DIR (or `root=`) at a folder that holds them;\n"
    "  - or go online once so that torchvision can download them.\n"
    "Looked in: {looked}"
)


class DataError(RuntimeError):
    """Missing, truncated or corrupt data, with the file named and a way to fix it."""


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path: str | Path, expected_ndim: int) -> np.ndarray:
    """Read one IDX file of uint8 values, checking its magic number and its length exactly."""
    path = Path(path)
    try:
        with _open(path) as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
        raise DataError(f"{path}: cannot be read ({exc}). Delete it and fetch it again.") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] != expected_ndim:
        raise DataError(
            f"{path}: not an IDX file of uint8 with {expected_ndim} dimensions "
            f"(magic number {raw[:4].hex() or 'missing'}, expected 000008{expected_ndim:02x})."
        )
    header = 4 + 4 * expected_ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated inside its header ({len(raw)} bytes).")
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=expected_ndim, offset=4))
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise DataError(
            f"{path}: {len(raw)} bytes but its header {shape} promises {expected}: "
            "the file is truncated or corrupt. Delete it and fetch it again."
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()


def _find_file(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _candidates(root: str | Path | None) -> list[Path]:
    if root is not None:
        return [Path(root).expanduser()]  # an explicit choice is never silently replaced
    local = data_root()
    return [local / "fashion-mnist", local / "FashionMNIST" / "raw", DEBIAN_DIR]


def find_data_dir(root: str | Path | None = None, download: bool = True) -> Path:
    """The first folder holding all four Fashion-MNIST files, downloading as a last resort."""
    root = root if root is not None else os.environ.get("FASHION_MNIST_DIR") or None
    candidates = _candidates(root)
    for folder in candidates:
        if all(_find_file(folder, stem) for pair in _FILES.values() for stem in pair):
            return folder
    if root is not None:
        raise DataError(f"{root}: does not hold the four Fashion-MNIST files "
                        f"({', '.join(s for p in _FILES.values() for s in p)}, optionally .gz).")
    if download:
        try:
            from torchvision.datasets import FashionMNIST as _TV

            _TV(str(data_root()), train=True, download=True)
            _TV(str(data_root()), train=False, download=True)
            return data_root() / "FashionMNIST" / "raw"
        except Exception:  # offline, or the mirror is down: fall through to the instructions
            pass
    looked = ", ".join(str(c) for c in candidates)
    raise DataError(HOW_TO_GET.format(local=data_root() / "fashion-mnist", looked=looked))


@lru_cache(maxsize=4)
def _load(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    image_stem, label_stem = _FILES[split]
    images = read_idx(_find_file(folder, image_stem), 3)
    labels = read_idx(_find_file(folder, label_stem), 1)
    n = SPLIT_SIZES[split]
    if images.shape != (n, 28, 28) or labels.shape != (n,):
        raise DataError(f"{folder}: the {split} split has images {images.shape} and labels "
                        f"{labels.shape}; expected ({n}, 28, 28) and ({n},).")
    if labels.max() >= len(CLASSES):
        raise DataError(f"{folder}: {split} labels contain {labels.max()}, beyond the 10 classes.")
    return images, labels


def load_fashion_mnist(split: str = "train", root: str | Path | None = None):
    """Raw Fashion-MNIST: (images uint8 [N, 28, 28], labels int64 [N]) for split 'train' or 'test'."""
    if split not in _FILES:
        raise ValueError(f"Unknown split {split!r}; choose 'train' or 'test'.")
    images, labels = _load(find_data_dir(root), split)
    return images.copy(), labels.astype(np.int64)  # copies: callers may not corrupt the cache


def check_image_size(size: int):
    """The sizes the course's images come in: 32 (the padded image) or a multiple of it (upsampled)."""
    if size < IMAGE_SIZE or size % IMAGE_SIZE:
        raise ValueError(f"image size must be a multiple of {IMAGE_SIZE} (the padded Fashion-MNIST image), got {size}.")


def to_model_images(images: np.ndarray | torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """uint8 [N, 28, 28] -> float32 [N, 1, 32, 32] in [-1, 1], zero-padded (background is -1).

    A larger `size` (a multiple of 32) upsamples the padded image bilinearly to [N, 1, size, size]:
    more pixels, no more detail (`latents.latent_cache(image_size=64)`: more latent tokens per image)."""
    check_image_size(size)
    x = torch.as_tensor(np.asarray(images)).float().div(127.5).sub(1.0)
    if x.ndim != 3 or x.shape[-2:] != (28, 28):
        raise ValueError(f"Expected images of shape [N, 28, 28], got {tuple(x.shape)}.")
    x = torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0).unsqueeze(1)
    if size == IMAGE_SIZE:
        return x
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Model images in [-1, 1], [N, C, H, W] -> uint8 [N, C, H, W] (the inverse of the scaling)."""
    return images.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)


class FashionMNIST(Dataset):
    """(image [1, 32, 32] in [-1, 1], label) pairs; add `captions=True` for a caption per item.

    Captions come from `captions.caption_for`, seeded by (seed, index), so they are fixed per item
    for a given seed; `epoch` can be advanced to draw fresh captions every epoch.
    """

    def __init__(self, split: str = "train", root=None, captions: bool = False, seed: int = 0):
        images, labels = load_fashion_mnist(split, root)
        self.images = to_model_images(images)
        self.labels = torch.from_numpy(labels)
        self.captions, self.seed, self.epoch = captions, seed, 0

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        label = int(self.labels[i])
        if not self.captions:
            return self.images[i], label
        return self.images[i], label, caption_for(label, seed=(self.seed, self.epoch, i))

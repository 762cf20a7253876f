"""Notebook 00's exercises: the model's image format, and each class's mean image."""

from __future__ import annotations

import torch

from ..data.fashion_mnist import to_model_images
from . import exercise_check


def _raw(n: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8), torch.arange(n) % 10


@exercise_check
def check_to_model_images(answer) -> str | None:
    """answer(uint8 [N, 28, 28]) -> float [N, 1, 32, 32] in [-1, 1], padded by 2 pixels of background (-1)."""
    images, _ = _raw()
    want, got = to_model_images(images), torch.as_tensor(answer(images))
    if got.shape != want.shape:
        return f"expected shape {tuple(want.shape)}, got {tuple(got.shape)}."
    if not torch.allclose(got.float(), want, atol=1e-6):
        return "the values differ: scale 0..255 to -1..1, and pad with -1 (the background), not 0."
    return None


@exercise_check
def check_class_means(answer) -> str | None:
    """answer(images [N, 1, 32, 32], labels [N]) -> [10, 32, 32], each class's mean image."""
    images, labels = _raw()
    x = to_model_images(images)
    want = torch.stack([x[labels == k, 0].mean(0) for k in range(10)])
    got = torch.as_tensor(answer(x, labels))
    if got.shape != want.shape:
        return f"expected shape {tuple(want.shape)}, got {tuple(got.shape)}."
    if not torch.allclose(got.float(), want, atol=1e-5):
        return "the means differ: average the images of each class over the images, not the pixels."
    return None

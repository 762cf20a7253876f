"""Notebook 00's exercises: the model's image format, and each class's mean image."""

from __future__ import annotations

import torch

from ..data.fashion_mnist import to_model_images
from . import exercise_check


def _raw(n: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8), torch.arange(n) % 10


@exercise_check(refuses=[to_model_images])
def check_to_model_images(answer) -> str | None:
    """answer(uint8 [N, 28, 28]) -> float [N, 1, 32, 32] in [-1, 1], padded by 2 pixels of background (-1)."""
    images, _ = _raw()
    want = torch.full((len(images), 1, 32, 32), -1.0)  # the reference, written out: background everywhere,
    want[:, 0, 2:30, 2:30] = images.double() / 255 * 2 - 1  # the 28 x 28 image in the middle
    got = torch.as_tensor(answer(images))
    if got.shape != want.shape:
        return f"expected shape {tuple(want.shape)}, got {tuple(got.shape)}."
    if not torch.allclose(got.float(), want, atol=1e-6):
        inside = torch.allclose(got[:, 0, 2:30, 2:30].float(), want[:, 0, 2:30, 2:30], atol=1e-6)
        if inside:
            return "the image is right but the padding is not: pad with -1 (the background), not 0."
        return "the values differ: scale 0..255 to -1..1 (x / 127.5 - 1)."
    return None


@exercise_check(refuses=[])
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

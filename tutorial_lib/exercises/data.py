"""Notebook 00's exercises: the model's image format, and two of the attributes measured from pixels."""

from __future__ import annotations

import numpy as np
import torch

from ..data.attributes import measure
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


def _garments() -> np.ndarray:
    """uint8 [8, 28, 28]: blobs of different sizes and brightness on a black frame, with pixels at
    exactly the mask level (32, not garment) and just above it (33), and one empty picture."""
    g = np.random.default_rng(0)
    rows, cols = np.mgrid[:28, :28]
    out = np.zeros((8, 28, 28), np.uint8)
    for i in range(7):
        radius, centre = 3 + 1.5 * i, g.uniform(11, 17, size=2)
        inside = (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 < radius**2
        out[i][inside] = g.integers(20, 256, size=inside.sum())
    out[1, 0, :10] = 32  # on the mask level: background
    out[1, 27, :10] = 33  # just above it: garment
    out[3, :, 0] = 32
    return out  # out[7] stays empty


@exercise_check(refuses=[measure])
def check_brightness_and_size(answer) -> str | None:
    """answer(uint8 [N, 28, 28]) -> (brightness [N], size [N]): the mean intensity in [0, 1] of the
    garment's pixels (those > 32) and the fraction of the 28 x 28 frame they cover; 0 and 0 for an empty picture."""
    images = _garments()
    garment = [x > 32 for x in images]  # the reference, one picture at a time
    want_b = np.array([x[m].astype(np.float64).mean() / 255 if m.any() else 0.0 for x, m in zip(images, garment)])
    want_s = np.array([m.sum() / 784 for m in garment])
    got = answer(images)
    if not (isinstance(got, (tuple, list)) and len(got) == 2):
        return "return two arrays, (brightness, size), each with one value per image."
    b, s = (np.asarray(torch.as_tensor(v).detach().cpu(), dtype=np.float64) for v in got)
    if b.shape != want_b.shape or s.shape != want_s.shape:
        return f"expected two arrays of shape {want_b.shape}, got {b.shape} and {s.shape}."
    if np.isnan(b[-1]) or np.isnan(s[-1]):
        return "an empty picture (no pixel above 32) gave NaN: it measures 0 in both."
    if not np.allclose(s, want_s, atol=1e-6):
        if np.allclose(s, want_s * 784, atol=1e-3):
            return "size is a count of pixels: divide by the 784 pixels of the frame to get the fraction covered."
        if np.allclose(s, [(x >= 32).mean() for x in images], atol=1e-6):
            return "size counts pixels at exactly 32: the garment is the pixels strictly above 32 (> 32, not >= 32)."
        return f"size differs (image 0: expected {want_s[0]:.4f}, got {s[0]:.4f}): the fraction of the frame's pixels above 32."
    if not np.allclose(b, want_b, atol=1e-6):
        if np.allclose(b, [x.astype(np.float64).mean() / 255 for x in images], atol=1e-6):
            return "brightness is the mean over the whole frame: average over the garment's pixels only (those above 32)."
        if np.allclose(b, want_b * 255, atol=1e-3):
            return "brightness is in 0..255: divide by 255 to get the intensity in [0, 1]."
        return f"brightness differs (image 0: expected {want_b[0]:.4f}, got {b[0]:.4f}): the mean of x / 255 over the pixels above 32."
    return None

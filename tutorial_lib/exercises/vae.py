"""Notebook 02's exercises: sampling the posterior by reparameterization, and PSNR."""

from __future__ import annotations

import torch

from ..eval.reconstruction import psnr
from . import exercise_check


@exercise_check(refuses=[])
def check_reparameterize(answer) -> str | None:
    """answer(mean, logvar, noise) -> a sample of N(mean, exp(logvar)) built from the standard-normal `noise`."""
    g = torch.Generator().manual_seed(0)
    mean, logvar, noise = torch.randn(3, 2, 4, 8, 8, generator=g, dtype=torch.float64)
    want = mean + (0.5 * logvar).exp() * noise
    got = torch.as_tensor(answer(mean, logvar, noise))
    if got.shape != want.shape or not torch.allclose(got, want, atol=1e-9):
        return "not the sample: the standard deviation is exp(logvar / 2), and the noise is scaled, then shifted."
    if not torch.equal(torch.as_tensor(answer(mean, torch.full_like(logvar, -1e4), noise)), mean):
        return "with a vanishing variance the sample must be the mean itself."
    return None


@exercise_check(refuses=[])
def check_psnr(answer) -> str | None:
    """answer(x, x_hat), images in [-1, 1] -> PSNR in dB measured on pixels in [0, 1] (as the course's)."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 32, 32, generator=g) * 2 - 1
    for noise in (0.01, 0.1, 0.5):
        x_hat = (x + noise * torch.randn(x.shape, generator=g)).clamp(-1, 1)
        want, got = psnr(x, x_hat), float(answer(x, x_hat))
        if abs(got - want) > 1e-3:
            return f"noise {noise}: expected {want:.3f} dB, got {got:.3f}: map to [0, 1] first, then 10 log10(1 / MSE)."
    return None

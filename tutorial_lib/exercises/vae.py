"""Notebook 02's exercises: the KL term of a diagonal Gaussian posterior, and PSNR."""

from __future__ import annotations

import torch

from ..eval.reconstruction import psnr
from . import exercise_check


@exercise_check
def check_kl(answer) -> str | None:
    """answer(mean [B, C, h, w], logvar [B, C, h, w]) -> [B], KL(N(mean, exp(logvar)) || N(0, I)) per item."""
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(2, 3, 4, 8, 8, generator=g, dtype=torch.float64)
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    want = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).flatten(1).sum(1)
    got = torch.as_tensor(answer(mean, logvar))
    if got.shape != want.shape:
        return f"expected one value per item, shape {tuple(want.shape)}, got {tuple(got.shape)}."
    if not torch.allclose(got.double(), want, rtol=1e-6):
        return "the values differ: 0.5 * sum(mean^2 + var - 1 - logvar) over each item's latent."
    if not torch.allclose(torch.as_tensor(answer(torch.zeros(1, 4), torch.zeros(1, 4))).double(), torch.zeros(1, dtype=torch.float64)):
        return "KL(N(0, I) || N(0, I)) must be 0."
    return None


@exercise_check
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

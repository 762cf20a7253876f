"""Notebook 05's exercises: the Karras sigma grid, and Heun from Euler."""

from __future__ import annotations

import torch

from ..diffusion.edm import karras_sigmas
from ..diffusion.samplers import sample_edm_heun
from . import exercise_check


@exercise_check(refuses=[])
def check_karras_grid(answer) -> str | None:
    """answer(steps, sigma_min, sigma_max, rho) -> steps + 1 levels, ending in 0 (Karras et al., eq. 5)."""
    for steps, rho in [(18, 7.0), (5, 1.0), (10, 3.0)]:
        want = karras_sigmas(steps, 0.002, 80.0, rho)
        got = torch.as_tensor(answer(steps, 0.002, 80.0, rho), dtype=torch.float64)
        if got.shape != want.shape:
            return f"{steps} steps need {steps + 1} levels (the last one 0), got shape {tuple(got.shape)}."
        if not torch.allclose(got, want, rtol=1e-9):
            return f"rho {rho}: the levels differ; space sigma^(1/rho) evenly from sigma_max down to sigma_min."
    return None


@exercise_check(refuses=[])
def check_heun(answer) -> str | None:
    """answer(denoiser, x [B, ...] at sigmas[0], sigmas) -> x at 0: Heun's method in sigma (no churn),
    an Euler step onto sigma = 0."""
    sd = 0.5  # data N(0, sd^2): its exact denoiser is D(x, sigma) = x sd^2 / (sigma^2 + sd^2)

    def denoiser(x, sigma, cond=None):
        s = sigma.reshape(-1, *[1] * (x.ndim - 1)).to(x.dtype)
        return x * sd**2 / (s**2 + sd**2)

    g = torch.Generator().manual_seed(0)
    noise = torch.randn(8, 2, generator=g, dtype=torch.float64)
    sigmas = karras_sigmas(6, 0.002, 80.0)
    want = sample_edm_heun(denoiser, noise, sigmas)
    got = torch.as_tensor(answer(denoiser, noise * sigmas[0], sigmas))
    if not torch.allclose(got, want, atol=1e-8):
        return (f"differs by {(got - want).abs().max().item():.2g}: after the Euler step x_e, average the slopes "
                "(x - D(x, sigma)) / sigma at both ends; onto sigma = 0 take D itself.")
    return None

"""Samplers over a denoiser callable, in the spirit of k-diffusion: one signature for all,

    sampler(denoiser, noise, ts, cond=None, callback=None, ...) -> x0

where `denoiser(x_t, t, cond) -> x0_hat` and `ts` is a decreasing grid of noise levels in [0, 1]
(`schedules.time_grid`). The denoiser is never evaluated at t = 0: the last step returns x0_hat.
`callback(i, t, x, x0_hat)` sees every step, e.g. to draw a denoising strip.
"""

from __future__ import annotations

import torch

from .schedules import cosine_alpha_sigma


@torch.no_grad()
def sample_ddim(denoiser, noise: torch.Tensor, ts: torch.Tensor, cond=None, callback=None,
                eta: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """DDIM (Song, Meng & Ermon, 2021) for an x0-predicting denoiser; eta = 1 is ancestral DDPM.

    From x_t: x0_hat = D(x_t, t), eps_hat = (x_t - alpha_t x0_hat) / sigma_t, and with
        c = eta * sqrt(sigma_s^2 / sigma_t^2 * (1 - alpha_t^2 / alpha_s^2))
    the step to s < t is x_s = alpha_s x0_hat + sqrt(sigma_s^2 - c^2) eps_hat + c z, z ~ N(0, I).
    """
    x = noise
    for i in range(len(ts) - 1):
        t, s = ts[i], ts[i + 1]
        alpha_t, sigma_t = cosine_alpha_sigma(t)
        alpha_s, sigma_s = cosine_alpha_sigma(s)
        x0_hat = denoiser(x, t.expand(x.shape[0]).to(x.device), cond)
        if callback is not None:
            callback(i, t, x, x0_hat)
        if s <= 0:  # the final step lands on the estimate itself
            x = x0_hat
            break
        eps_hat = (x - alpha_t * x0_hat) / sigma_t
        c = eta * (sigma_s**2 / sigma_t**2 * (1 - alpha_t**2 / alpha_s**2)).clamp(min=0).sqrt()
        x = alpha_s * x0_hat + (sigma_s**2 - c**2).clamp(min=0).sqrt() * eps_hat
        if eta > 0:
            x = x + c * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x

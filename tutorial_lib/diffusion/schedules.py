"""Noise schedules over a continuous noise level t in [0, 1].

The forward process (Ho et al., 2020; Song et al., 2021) mixes data and noise:
    x_t = alpha(t) * x0 + sigma(t) * eps,    eps ~ N(0, I).
The cosine schedule (Nichol & Dhariwal, 2021, without their offset) is variance-preserving,
alpha = cos(pi t / 2), sigma = sin(pi t / 2), so alpha^2 + sigma^2 = 1, x_0 = data and x_1 = noise.
"""

from __future__ import annotations

import math

import torch


def cosine_alpha_sigma(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cos(0.5 * math.pi * t), torch.sin(0.5 * math.pi * t)


def add_noise(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = alpha(t) x0 + sigma(t) eps, with t [B] broadcast over the other dimensions."""
    alpha, sigma = cosine_alpha_sigma(t.view(-1, *([1] * (x0.ndim - 1))))
    return alpha * x0 + sigma * noise


def sample_beta(n: int, a: float, b: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """n noise levels t ~ Beta(a, b); Beta(1, 2.5) puts most training on low noise levels.

    torch's Beta sampler draws from the global RNG, so it runs on a fork of it seeded from
    `generator`: the same generator state gives the same t, and global state is untouched.
    """
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.distributions.Beta(float(a), float(b)).sample((n,))


def time_grid(steps: int, t_max: float = 1.0, t_min: float = 0.0) -> torch.Tensor:
    """steps + 1 noise levels from t_max down to t_min, evenly spaced: the sampler's grid."""
    if steps < 1:
        raise ValueError(f"Need at least 1 sampling step, got {steps}.")
    return torch.linspace(t_max, t_min, steps + 1)

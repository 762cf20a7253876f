"""The training objective's knobs: which noise levels to train on, which noise, how to weight them.

A training step draws t, eps and forms x_t = alpha x0 + sigma eps; the network's prediction is
compared with its target (parametrizations.prediction_target) under a weight per item:
    loss = mean_i  w(t_i) * |pred_i - target_i|^2 / (numel per item).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .parametrizations import coefficients
from .schedules import sample_beta, shift_timesteps

TIMESTEP_DISTRIBUTIONS = ("uniform", "beta", "logit_normal")


def sample_timesteps(n: int, distribution: str = "uniform", generator: torch.Generator | None = None, *,
                     beta: tuple[float, float] = (1.0, 2.5), logit_normal: tuple[float, float] = (0.0, 1.0),
                     shift: float = 1.0) -> torch.Tensor:
    """n training noise levels t in [0, 1]:
        uniform        t ~ U(0, 1)
        beta           t ~ Beta(a, b) (`schedules.sample_beta`); notebook 01 trains on Beta(1, 2.5)
        logit_normal   t = sigmoid(m + s n), n ~ N(0, 1) (Esser et al., 2024): most draws mid-way,
                       which Esser et al. find the hardest part, few at the near-trivial ends
    then, if shift != 1, biased towards noise (shift > 1) or data (shift < 1) by `shift_timesteps`.
    Drawn on the generator's device (the CPU without one), so a trainer whose generator lives on its
    GPU draws t there, with no copy and no sync.
    """
    device = None if generator is None else generator.device
    if distribution == "uniform":
        t = torch.rand(n, generator=generator, device=device)
    elif distribution == "beta":
        t = sample_beta(n, *beta, generator=generator)
    elif distribution == "logit_normal":
        mean, std = logit_normal
        t = torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=device))
    else:
        raise ValueError(f"Unknown timestep distribution {distribution!r}; choose from "
                         f"{', '.join(TIMESTEP_DISTRIBUTIONS)}.")
    return t if shift == 1 else shift_timesteps(t, shift)


def offset_noise(noise: torch.Tensor, strength: float,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """eps + strength * z with z ~ N(0, 1) per item and channel [B, C, 1, ...] (Guttenberg, 2023,
    "Diffusion with offset noise"). Plain eps barely touches an image's mean, so a model trained on
    it keeps every sample's mean near the data's; the shared offset lets it learn to move it."""
    if strength == 0:
        return noise
    shape = (*noise.shape[:2], *([1] * (noise.ndim - 2)))
    return noise + strength * torch.randn(shape, generator=generator, device=noise.device, dtype=noise.dtype)


def perturb_input(noise: torch.Tensor, gamma: float,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """The noise to form the *input* x_t with under input perturbation (Ning et al., 2023):
    eps + gamma * xi, xi ~ N(0, I), while the target keeps the unperturbed eps. Training on inputs
    a little off the forward process imitates the sampler's own errors (exposure bias)."""
    if gamma == 0:
        return noise
    xi = torch.randn(noise.shape, generator=generator, device=noise.device, dtype=noise.dtype)
    return noise + gamma * xi


def min_snr_weight(alpha: torch.Tensor, sigma: torch.Tensor, target: str, gamma: float = 5.0) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al., 2023) for a network trained on `target`.

    In x0 space the weight is min(SNR, gamma): SNR-weighting (the ELBO's) capped at gamma, so that
    the many easy low-noise levels do not dominate. At fixed x_t, an x0 error d moves a target
    a x0 + b eps by (a - b alpha / sigma) d, so its squared error is k |d|^2 with
        x0: k = 1,   eps: k = SNR,   v: k = (alpha^2 + sigma^2)(SNR + 1),   flow: k = (1 + sqrt(SNR))^2,
    and the target's own weight is min(SNR, gamma) / k. Guarded at both ends, all finite:
    SNR = inf (t = 0) gives gamma for x0 and 0 for the rest; SNR = 0 gives 0, except for eps,
    whose min(1, gamma / SNR) tends to 1 (where a plain division would give 0 / 0).
    """
    coefficients(target, alpha, sigma)
    snr = alpha**2 / sigma**2  # inf at sigma = 0
    clipped = snr.clamp(max=gamma)
    if target == "x0":
        return clipped
    if target == "eps":
        return (gamma / snr).clamp(max=1.0)  # = min(SNR, gamma) / SNR; gamma / 0 = inf -> 1
    if target == "v":
        return clipped / ((alpha**2 + sigma**2) * (snr + 1))
    return clipped / (1 + snr.sqrt()) ** 2


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error; with weight [B], the mean over items of weight * per-item MSE. With mask
    (broadcastable to pred, 1 = counted; e.g. `models.masking.keep_pixels`), each item's MSE is the
    mean over its masked-in elements only."""
    if weight is None and mask is None:
        return F.mse_loss(pred, target)
    if mask is None:
        per_item = (pred - target).pow(2).flatten(1).mean(1)
    else:
        mask = mask.to(pred.dtype).expand_as(pred)
        per_item = ((pred - target).pow(2) * mask).flatten(1).sum(1) / mask.flatten(1).sum(1)
    if weight is None:
        return per_item.mean()
    return (weight.reshape(-1) * per_item).mean()

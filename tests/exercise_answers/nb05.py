"""Notebook 05's exercises: the shortcut and a planted bug for each."""

import numpy as np
import torch

from tutorial_lib.diffusion.edm import edm_preconditioning, karras_sigmas
from tutorial_lib.diffusion.samplers import sample_edm_euler
from tutorial_lib.diffusion.toy import GaussianMixture
from tutorial_lib.exercises import edm
from tutorial_lib.train.ema import power_profile

from . import Exercise, solutions

NOTEBOOK = "05_edm"
_solved = solutions(NOTEBOOK)


def _edm_coefficients(alpha, sigma_t, sigma_data):  # the shortcut: Table 1 at sigma = sigma_t / alpha, rescaled
    c = edm_preconditioning(sigma_t / alpha, sigma_data)
    return c.c_skip / alpha, c.c_out, c.c_in / alpha


def _edm_unscaled(alpha, sigma_t, sigma_data):  # Table 1 at sigma = sigma_t / alpha, not rescaled for x = alpha x_sigma
    sigma = sigma_t / alpha
    total = sigma**2 + sigma_data**2
    return sigma_data**2 / total, sigma * sigma_data / total.sqrt(), 1 / total.sqrt()


def _order_with_the_library_denoiser(sampler, steps=(16, 32, 64, 128), sigma_data=0.5):
    gaussian = GaussianMixture([1.0], [[0.0, 0.0]], [sigma_data])
    noise = torch.randn(1000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errors = []
    for n in steps:
        sigmas = karras_sigmas(n)
        exact = sigmas[0] * noise * sigma_data / (sigmas[0] ** 2 + sigma_data**2).sqrt()
        errors.append((sampler(gaussian.denoiser, noise, sigmas) - exact).norm(dim=1).mean().item())
    return -np.polyfit(np.log(steps), np.log(errors), 1)[0]


def _order_wrong_denoiser(sampler, steps=(16, 32, 64, 128), sigma_data=0.5):  # sigma_data not squared in D
    noise = torch.randn(1000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errors = []
    for n in steps:
        sigmas = karras_sigmas(n)
        exact = sigmas[0] * noise * sigma_data / (sigmas[0] ** 2 + sigma_data**2).sqrt()
        x = sampler(lambda x, s, cond=None: x * sigma_data / (s.reshape(-1, 1) ** 2 + sigma_data**2), noise, sigmas)
        errors.append((x - exact).norm(dim=1).mean().item())
    return -np.polyfit(np.log(steps), np.log(errors), 1)[0]


def _sde_with_the_library_churn(denoiser, noise, sigmas, generator):  # churn at its most, Euler: refused
    return sample_edm_euler(denoiser, noise, sigmas, S_churn=1e9, generator=generator)


def _sde_exact_variance(denoiser, noise, sigmas, generator):  # noise std sqrt(sigma_i^2 - sigma_(i+1)^2), not sqrt(2 sigma_i h)
    return edm._reverse_sde_reference(denoiser, noise, sigmas, generator,
                                      noise_std=lambda sigma, h: (sigma**2 - (sigma - h) ** 2).sqrt())


def _fixed_ema_with_the_library_profiles(snapshot_steps, snapshot_gammas, t, decay):
    taus = np.arange(1, t + 1, dtype=np.float64)
    profiles = np.stack([power_profile(ti, g, taus) for ti, g in zip(snapshot_steps, snapshot_gammas)], axis=1)
    target = np.where(taus == 1, decay ** (t - 1), (1 - decay) * decay ** (t - taus))
    return np.linalg.lstsq(profiles, target, rcond=None)[0]


def _fixed_ema_oldest_first(snapshot_steps, snapshot_gammas, t, decay):  # weights the oldest step most
    taus = np.arange(1, t + 1, dtype=np.float64)
    profiles = np.stack([np.where(taus <= ti, (taus ** (g + 1) - (taus - 1) ** (g + 1)) / float(ti) ** (g + 1), 0.0)
                         for ti, g in zip(snapshot_steps, snapshot_gammas)], axis=1)
    return np.linalg.lstsq(profiles, (1 - decay) * decay ** (taus - 1), rcond=None)[0]


EXERCISES = [
    Exercise(edm.check_scaled_preconditioning, "scaled_preconditioning", shortcut=_edm_coefficients,
             bug=_edm_unscaled, hint="1 / alpha"),
    Exercise(edm.check_convergence_order, "measure_order", shortcut=_order_with_the_library_denoiser,
             bug=_order_wrong_denoiser, hint="x sigma_data^2 / (sigma^2 + sigma_data^2)", predicts=True),
    Exercise(edm.check_reverse_sde, "sample_reverse_sde", shortcut=_sde_with_the_library_churn,
             bug=_sde_exact_variance, hint="sqrt(2 sigma_i h)"),
    Exercise(edm.check_fixed_ema_from_snapshots, "fixed_ema_from_snapshots", shortcut=_fixed_ema_with_the_library_profiles,
             bug=_fixed_ema_oldest_first, hint="newest step most"),
]

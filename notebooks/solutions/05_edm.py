"""Worked solutions to notebook 05's exercises (run through their checks by tests/test_exercises.py)."""

import numpy as np
import torch

from tutorial_lib.diffusion.edm import karras_sigmas


def scaled_preconditioning(alpha, sigma_t, sigma_data):
    # x = alpha x0 + sigma_t n has variance alpha^2 sd^2 + sigma_t^2; Var[x0 - c_skip x] is
    # (1 - c_skip alpha)^2 sd^2 + c_skip^2 sigma_t^2, smallest at c_skip = alpha sd^2 / Var[x].
    var_x = alpha**2 * sigma_data**2 + sigma_t**2
    c_skip = alpha * sigma_data**2 / var_x
    c_out = sigma_t * sigma_data / var_x.sqrt()
    c_in = 1 / var_x.sqrt()
    return c_skip, c_out, c_in


def measure_order(sampler, steps=(16, 32, 64, 128), sigma_data=0.5):
    noise = torch.randn(1000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def denoiser(x, sigma, cond=None):  # E[x0 | x0 + sigma n] for x0 ~ N(0, sigma_data^2 I)
        s = sigma.reshape(-1, 1)
        return x * sigma_data**2 / (s**2 + sigma_data**2)

    errors = []
    for n in steps:
        sigmas = karras_sigmas(n)
        sigma_max = sigmas[0]
        exact = sigma_max * noise * sigma_data / (sigma_max**2 + sigma_data**2).sqrt()  # x(sigma) ∝ sqrt(sigma^2 + sd^2)
        errors.append((sampler(denoiser, noise, sigmas) - exact).norm(dim=1).mean().item())
    slope = np.polyfit(np.log(steps), np.log(errors), 1)[0]
    return -slope


def sample_reverse_sde(denoiser, noise, sigmas, generator):
    x = noise * sigmas[0]
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        x0_hat = denoiser(x, sigma.expand(len(x)))
        if sigma_next == 0:
            return x0_hat  # as the ODE samplers: the last step onto sigma = 0 is the denoiser's estimate
        h = sigma - sigma_next
        score = (x0_hat - x) / sigma**2
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        x = x + 2 * sigma * h * score + (2 * sigma * h).sqrt() * z  # dx = -2 sigma score dsigma + sqrt(2 sigma) dw
    return x


def fixed_ema_from_snapshots(snapshot_steps, snapshot_gammas, t, decay):
    taus = np.arange(1, t + 1, dtype=np.float64)
    profiles = np.stack([np.where(taus <= ti, (taus ** (g + 1) - (taus - 1) ** (g + 1)) / float(ti) ** (g + 1), 0.0)
                         for ti, g in zip(snapshot_steps, snapshot_gammas)], axis=1)  # [taus, snapshots]
    target = np.where(taus == 1, decay ** (t - 1), (1 - decay) * decay ** (t - taus))
    return np.linalg.lstsq(profiles, target, rcond=None)[0]

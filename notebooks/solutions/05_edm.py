"""Worked solutions to notebook 05's exercises (run through their checks by tests/test_exercises.py)."""

import torch


def karras_grid(steps, sigma_min, sigma_max, rho):
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return torch.cat([(hi + ramp * (lo - hi)) ** rho, torch.zeros(1, dtype=torch.float64)])


def heun_from_euler(denoiser, x, sigmas):
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        x0_hat = denoiser(x, sigma.expand(len(x)))
        if sigma_next == 0:
            return x0_hat
        d = (x - x0_hat) / sigma
        x_euler = x + (sigma_next - sigma) * d
        d_next = (x_euler - denoiser(x_euler, sigma_next.expand(len(x)))) / sigma_next
        x = x + (sigma_next - sigma) * (d + d_next) / 2
    return x

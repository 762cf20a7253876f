"""Worked solutions to notebook 04's exercises (run through their checks by tests/test_exercises.py)."""

import math

import torch


def flow_to_vp(u, x_t, t):
    x0, eps = x_t - t * u, x_t + (1 - t) * u  # the two unknowns, from x_t = (1 - t) x0 + t eps and u = eps - x0
    s = (2 / math.pi) * torch.atan(t / (1 - t))  # the same SNR: tan(pi s / 2) = sigma / alpha = t / (1 - t)
    alpha, sigma = torch.cos(math.pi * s / 2), torch.sin(math.pi * s / 2)
    x_s = x_t / ((1 - t) ** 2 + t**2).sqrt()  # = alpha x0 + sigma eps
    return x_s, alpha * eps - sigma * x0, s


def zero_terminal_snr_rescale(alpha_bar):
    a = alpha_bar.sqrt()
    a = (a - a[-1]) * a[0] / (a[0] - a[-1])  # shift: last is 0; scale: first unchanged
    return a**2


def min_snr_weights(target, alpha, sigma, gamma):
    snr = alpha**2 / sigma**2
    k = {"x0": torch.ones_like(snr), "eps": snr, "v": (alpha**2 + sigma**2) * (snr + 1),
         "flow": (1 + snr.sqrt()) ** 2}[target]  # what the plain loss weighs an x0 error by
    return snr.clamp(max=gamma) / k

"""Notebook 04's exercises: the shortcut and a planted bug for each."""

import math

import torch

from tutorial_lib.diffusion.losses import min_snr_weight
from tutorial_lib.diffusion.parametrizations import convert
from tutorial_lib.diffusion.schedules import COSINE, FLOW, rescale_zero_terminal_snr
from tutorial_lib.exercises import targets

from . import Exercise

NOTEBOOK = "04_targets_schedules_samplers"


def _library_flow_to_vp(u, x_t, t):
    x0 = convert(u, "flow", "x0", x_t, *FLOW.alpha_sigma(t))
    s = (2 / math.pi) * torch.atan(t / (1 - t))
    x_s = x_t / ((1 - t) ** 2 + t**2).sqrt()
    alpha, sigma = COSINE.alpha_sigma(s)
    return x_s, convert(x0, "x0", "v", x_s, alpha, sigma), s


def _unscaled(u, x_t, t):  # keeps x_t as it is: the flow path is not variance preserving
    x0, eps = x_t - t * u, x_t + (1 - t) * u
    s = (2 / math.pi) * torch.atan(t / (1 - t))
    alpha, sigma = torch.cos(math.pi * s / 2), torch.sin(math.pi * s / 2)
    return x_t, alpha * eps - sigma * x0, s


def _rescale_alpha_bar(alpha_bar):  # shifts and scales alpha_bar, not its square root
    return (alpha_bar - alpha_bar[-1]) * alpha_bar[0] / (alpha_bar[0] - alpha_bar[-1])


def _library_rescale(alpha_bar):
    return rescale_zero_terminal_snr(torch.cat([torch.ones(1, dtype=alpha_bar.dtype), alpha_bar]))[1:]


def _v_by_snr(target, alpha, sigma, gamma):  # v's plain loss taken to weigh x0 errors by SNR, as eps's
    snr = alpha**2 / sigma**2
    k = {"x0": torch.ones_like(snr), "eps": snr, "v": snr, "flow": (1 + snr.sqrt()) ** 2}[target]
    return snr.clamp(max=gamma) / k


EXERCISES = [
    Exercise(targets.check_flow_to_vp, "flow_to_vp", shortcut=_library_flow_to_vp, bug=_unscaled,
             hint="sqrt((1 - t)² + t²)"),
    Exercise(targets.check_zero_terminal_snr, "zero_terminal_snr_rescale", shortcut=_library_rescale,
             bug=_rescale_alpha_bar, hint="not alpha_bar itself"),
    Exercise(targets.check_min_snr_weights, "min_snr_weights", shortcut=lambda target, a, s, g: min_snr_weight(a, s, target, g),
             bug=_v_by_snr, hint="SNR + 1", predicts=True),
]

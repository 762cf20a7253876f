"""Notebook 03b's exercises: the shortcut and a planted bug for each."""

import torch

from tutorial_lib.diffusion.flow_matching import marginal_velocity, sample_flow_sde
from tutorial_lib.diffusion.parametrizations import x0_denoiser
from tutorial_lib.diffusion.samplers import sample_flow_euler
from tutorial_lib.diffusion.schedules import FLOW
from tutorial_lib.exercises import flow2d

from . import Exercise

NOTEBOOK = "03b_flow_and_score_2d"


def _point_mass_variance(x, t, data, weights, s):  # responsibilities with t^2, the variance of a point mass
    v = (1 - t) ** 2 * s**2 + t**2
    c = x[:, None] - (1 - t) * data
    p = (weights.log() - (c**2).sum(-1) / (2 * t**2)).softmax(-1)
    return (p[..., None] * ((t - (1 - t) * s**2) / v * c - data)).sum(1)


def _dt_noise(velocity, x, ts, g, generator):  # noise g h z instead of g sqrt(h) z
    for t, s in zip(ts[:-1], ts[1:]):
        h = t - s
        u = velocity(x, t.expand(x.shape[0]))
        score = -(x + (1 - t) * u) / t
        x = x + h * (-u + g(t) ** 2 / 2 * score) + g(t) * h * torch.randn(x.shape, generator=generator, dtype=x.dtype)
    return x


def _euler_end_velocity(velocity, x1, x0_exact, steps):  # evaluates u at the end of each step, s, not at t
    ts = torch.linspace(1, 0, steps + 1)
    x = x1
    for t, s in zip(ts[:-1], ts[1:]):
        x = x + (s - t) * velocity(x, s)
    return (x - x0_exact).norm(dim=-1).mean().item()


def _euler_shortcut(velocity, x1, x0_exact, steps):
    model = lambda x, t, cond=None: velocity(x, t)  # noqa: E731  the flow velocity as a network
    x = sample_flow_euler(x0_denoiser(model, "flow", FLOW), x1, torch.linspace(1, 0, steps + 1, dtype=torch.float64))
    return (x - x0_exact).norm(dim=-1).mean().item()


EXERCISES = [
    Exercise(flow2d.check_smoothed_marginal_velocity, "smoothed_marginal_velocity",
             shortcut=lambda x, t, data, weights, s: marginal_velocity(x, t, data, weights),
             bug=_point_mass_variance, hint="variance (1 - t)^2 s^2 + t^2"),
    Exercise(flow2d.check_reverse_sde, "reverse_sde",
             shortcut=lambda velocity, x, ts, g, generator: sample_flow_sde(velocity, x, ts, g, generator),
             bug=_dt_noise, hint="sqrt(dt)"),
    Exercise(flow2d.check_euler_error, "euler_error", shortcut=_euler_shortcut, bug=_euler_end_velocity,
             hint="at the start of each step", predicts=True),
]

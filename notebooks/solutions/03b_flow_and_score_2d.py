"""Worked solutions to notebook 03b's exercises (run through their checks by tests/test_exercises.py)."""

import torch


def weighted_marginal_velocity(x, t, data, weights):
    logits = weights.log() - ((x[:, None] - (1 - t) * data) ** 2).sum(-1) / (2 * t**2)  # [B, N]
    p = logits.softmax(-1)  # p(x0 = x_i | x_t = x)
    return (p[..., None] * (x[:, None] - data)).sum(1) / t  # E[(x - x0) / t | x_t = x]


def reverse_sde(velocity, x, ts, g, generator):
    for t, s in zip(ts[:-1], ts[1:]):
        h = t - s
        u = velocity(x, t.expand(x.shape[0]))
        score = -(x + (1 - t) * u) / t
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        x = x + h * (-u + g(t) ** 2 / 2 * score) + g(t) * h.sqrt() * z
    return x


def euler_error(velocity, x1, x0_exact, steps):
    ts = torch.linspace(1, 0, steps + 1)
    x = x1
    for t, s in zip(ts[:-1], ts[1:]):
        x = x + (s - t) * velocity(x, t)
    return (x - x0_exact).norm(dim=-1).mean().item()

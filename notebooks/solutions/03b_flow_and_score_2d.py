"""Worked solutions to notebook 03b's exercises (run through their checks by tests/test_exercises.py)."""

import torch


def smoothed_marginal_velocity(x, t, data, weights, s):
    v = (1 - t) ** 2 * s**2 + t**2  # x_t given component i: N((1 - t) x_i, v I)
    c = x[:, None] - (1 - t) * data  # x - (1 - t) x_i, [B, N, 2]
    p = (weights.log() - (c**2).sum(-1) / (2 * v)).softmax(-1)  # p(component i | x_t = x), [B, N]
    u_i = (t - (1 - t) * s**2) / v * c - data  # E[eps - x0 | x_t = x, i], [B, N, 2]
    return (p[..., None] * u_i).sum(1)


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

"""Exact fields of a finite data set on the flow path, the score from the velocity, the reverse SDE."""

import math

import torch

from tutorial_lib.diffusion.flow_matching import (marginal_velocity, posterior_weights, sample_flow_sde,
                                                  score_from_velocity)
from tutorial_lib.diffusion.parametrizations import convert
from tutorial_lib.diffusion.samplers import sample_flow_euler
from tutorial_lib.diffusion.schedules import time_grid
from tutorial_lib.diffusion.toy import GaussianMixture

DATA = torch.tensor([[1.0, 0.0], [-1.0, 0.5], [0.0, -1.5]], dtype=torch.float64)


def test_the_marginal_field_is_a_mixture_denoiser_in_other_coordinates():
    """x_t / (1 - t) = x0 + sigma n with sigma = t / (1 - t): toy.py's mixture of (almost) point masses
    gives E[x0 | x_t], and u = (x_t - E[x0 | x_t]) / t."""
    weights = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    mixture = GaussianMixture(weights, DATA, torch.full((3,), 1e-6))
    x = torch.randn(50, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for t in (0.95, 0.6, 0.3, 0.1):
        x0_mean = mixture.denoiser(x / (1 - t), t / (1 - t))
        assert torch.allclose(marginal_velocity(x, t, DATA, weights), (x - x0_mean) / t, atol=1e-8)
        assert torch.allclose(posterior_weights(x, t, DATA, weights).sum(1), torch.ones(50, dtype=torch.float64))


def test_one_point_gives_the_conditional_field_and_t_one_the_mean():
    x = torch.randn(10, 2, dtype=torch.float64)
    assert torch.allclose(marginal_velocity(x, 0.4, DATA[:1]), (x - DATA[0]) / 0.4)
    assert torch.allclose(marginal_velocity(x, 1.0, DATA), x - DATA.mean(0))
    t = torch.rand(10, dtype=torch.float64) * 0.9 + 0.05  # one level per point
    rows = torch.stack([marginal_velocity(x[i:i + 1], t[i].item(), DATA)[0] for i in range(10)])
    assert torch.allclose(marginal_velocity(x, t, DATA), rows)


def test_the_score_from_the_velocity_is_the_gradient_of_the_log_density():
    mixture = GaussianMixture(torch.ones(3), DATA, torch.full((3,), 1e-6))
    x = torch.randn(20, 2, dtype=torch.float64)
    for t in (0.9, 0.5, 0.2):
        xs = x.clone().requires_grad_()  # log p_t(x) = log p_sigma(x / (1 - t)) - D log(1 - t)
        mixture.log_prob(xs / (1 - t), t / (1 - t)).sum().backward()
        score = score_from_velocity(marginal_velocity(x, t, DATA), x, t)
        assert torch.allclose(score, xs.grad, atol=1e-8)
        eps = convert(marginal_velocity(x, t, DATA), "flow", "eps", x, 1 - t, t)
        assert torch.allclose(score, -eps / t)


def test_the_sde_without_noise_is_flow_euler_and_with_noise_keeps_the_marginals():
    field = lambda x, t: marginal_velocity(x, t, DATA)  # noqa: E731
    noise = torch.randn(16, 2, dtype=torch.float64)
    ts = time_grid(30, dtype=torch.float64)
    ode = sample_flow_sde(field, noise, ts, g=lambda t: 0 * t)
    denoiser = lambda x, t, cond=None: x - t[:, None] * field(x, t)  # noqa: E731  x0_hat = x - t u
    assert torch.allclose(ode, sample_flow_euler(denoiser, noise, ts), atol=1e-10)
    m, s = torch.tensor([1.0, -0.5], dtype=torch.float64), 0.5  # Gaussian data N(m, s^2 I): exact fields

    def gauss(x, t):
        t = t[:, None]
        return (t - (1 - t) * s**2) / ((1 - t) ** 2 * s**2 + t**2) * (x - (1 - t) * m) - m

    n = 4000
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(n, 2, generator=g, dtype=torch.float64)
    out = sample_flow_sde(gauss, noise, time_grid(100, dtype=torch.float64), generator=g)
    assert (out.mean(0) - m).abs().max() < 4 * s / math.sqrt(n) + 0.01
    assert (out.std(0) - s).abs().max() < 4 * s / math.sqrt(2 * n) + 0.01
    frames = []
    sample_flow_sde(gauss, noise, ts, callback=lambda i, t, x: frames.append(i))
    assert frames == list(range(30))

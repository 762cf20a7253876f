"""Schedules, the DDIM sampler and classifier-free guidance, checked against exact answers.

For Gaussian data x0 ~ N(m, s^2) (per dimension) the optimal x0-denoiser is known in closed form,
    E[x0 | x_t] = m + alpha s^2 / (alpha^2 s^2 + sigma^2) (x_t - alpha m),
so a correct sampler fed with it must return samples with mean m and std s: any sign or scale
error in the update shows up as a wrong mean or std.
"""

from __future__ import annotations

import pytest
import torch

from tutorial_lib.diffusion.guidance import cfg_denoiser
from tutorial_lib.diffusion.samplers import sample_ddim
from tutorial_lib.diffusion.schedules import add_noise, cosine_alpha_sigma, sample_beta, time_grid

M = torch.tensor([1.5, -0.5, 2.0, 0.0])
S = torch.tensor([0.5, 1.0, 2.0, 0.7])


def gaussian_denoiser(x, t, cond=None):
    alpha, sigma = cosine_alpha_sigma(t[:, None])
    return M + alpha * S**2 / (alpha**2 * S**2 + sigma**2) * (x - alpha * M)


# ----------------------------------------------------------------------------- schedules
def test_schedule_is_variance_preserving():
    t = torch.linspace(0, 1, 101)
    alpha, sigma = cosine_alpha_sigma(t)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones(101))
    assert (alpha[1:] <= alpha[:-1]).all() and (sigma[1:] >= sigma[:-1]).all()


def test_add_noise_endpoints():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    assert torch.equal(add_noise(x0, torch.zeros(4), noise), x0)
    torch.testing.assert_close(add_noise(x0, torch.ones(4), noise), noise, atol=1e-6, rtol=0)


def test_add_noise_broadcasts_per_item():
    x0, noise = torch.ones(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)
    xt = add_noise(x0, torch.tensor([0.0, 0.5]), noise)
    assert torch.equal(xt[0], x0[0])
    torch.testing.assert_close(xt[1], torch.full((3, 4, 4), 2**-0.5))


def test_sample_beta_is_deterministic_for_a_generator_state():
    a = sample_beta(100, 1.0, 2.5, torch.Generator().manual_seed(3))
    b = sample_beta(100, 1.0, 2.5, torch.Generator().manual_seed(3))
    c = sample_beta(100, 1.0, 2.5, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (100,) and ((a >= 0) & (a <= 1)).all()


def test_sample_beta_advances_the_generator_and_leaves_global_rng_alone():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first, second = sample_beta(10, 2.0, 2.0, g), sample_beta(10, 2.0, 2.0, g)
    assert not torch.equal(first, second)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("a, b", [(1.0, 2.5), (2.0, 2.0), (5.0, 1.0)])
def test_sample_beta_mean(a, b):
    t = sample_beta(20_000, a, b, torch.Generator().manual_seed(0))
    mean = a / (a + b)
    std = (a * b / ((a + b) ** 2 * (a + b + 1))) ** 0.5
    assert t.mean().item() == pytest.approx(mean, abs=5 * std / 20_000**0.5)


def test_time_grid():
    ts = time_grid(4)
    torch.testing.assert_close(ts, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    assert time_grid(1).tolist() == [1.0, 0.0]
    for bad in (0, -3):
        with pytest.raises(ValueError, match="at least 1"):
            time_grid(bad)


# ----------------------------------------------------------------------------- sampler
def test_exact_denoiser_returns_its_x0():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    out = sample_ddim(lambda x, t, cond: x0, noise, time_grid(10))
    torch.testing.assert_close(out, x0)
    out = sample_ddim(lambda x, t, cond: x0, noise, time_grid(10), eta=1.0, generator=g)
    torch.testing.assert_close(out, x0)


def test_sampler_never_evaluates_t_zero_and_calls_back_every_step():
    seen, calls = [], []

    def denoiser(x, t, cond):
        assert t.shape == (x.shape[0],) and cond == "c"
        seen.append(float(t[0]))
        return torch.zeros_like(x)

    sample_ddim(denoiser, torch.randn(2, 3), time_grid(5), cond="c",
                callback=lambda i, t, x, x0: calls.append((i, float(t))))
    assert seen == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2]) and min(seen) > 0
    assert [i for i, _ in calls] == [0, 1, 2, 3, 4]


def test_ddim_is_deterministic_with_eta_zero():
    noise = torch.randn(100, 4, generator=torch.Generator().manual_seed(0))
    a = sample_ddim(gaussian_denoiser, noise, time_grid(10))
    b = sample_ddim(gaussian_denoiser, noise.clone(), time_grid(10))
    assert torch.equal(a, b)


def test_ddim_with_optimal_denoiser_recovers_gaussian_data():
    noise = torch.randn(20_000, 4, generator=torch.Generator().manual_seed(0))
    x = sample_ddim(gaussian_denoiser, noise, time_grid(50))
    torch.testing.assert_close(x.mean(0), M, atol=0.05 * S.min().item(), rtol=0.02)
    torch.testing.assert_close(x.std(0), S, rtol=0.05, atol=0)


def test_ancestral_sampling_with_optimal_denoiser_recovers_gaussian_data():
    """eta = 1 (DDPM): each step must add exactly the posterior noise of q(x_s | x_t, x0),
    variance sigma_s^2 / sigma_t^2 * (1 - alpha_t^2 / alpha_s^2); too much noise inflates the std."""
    noise = torch.randn(20_000, 4, generator=torch.Generator().manual_seed(0))
    x = sample_ddim(gaussian_denoiser, noise, time_grid(100), eta=1.0,
                    generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(x.mean(0), M, atol=0.05 * S.min().item(), rtol=0.02)
    torch.testing.assert_close(x.std(0), S, rtol=0.06, atol=0)


def test_ancestral_sampling_is_seeded():
    noise = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    run = lambda seed: sample_ddim(gaussian_denoiser, noise, time_grid(10), eta=1.0,  # noqa: E731
                                   generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(1), run(1)) and not torch.equal(run(1), run(2))


# ----------------------------------------------------------------------------- guidance
def _conditional_denoiser():
    """A denoiser whose prediction depends on x, t and a per-item conditioning tensor."""
    calls = []

    def denoiser(x, t, cond):
        calls.append(len(x))
        return 0.5 * x + t[:, None] * cond

    return denoiser, calls


@pytest.fixture
def guidance_inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 4, generator=g), torch.rand(3, generator=g), torch.randn(3, 4, generator=g), \
        torch.randn(3, 4, generator=g)


def test_guidance_scale_one_is_the_conditional_prediction(guidance_inputs):
    x, t, cond, null = guidance_inputs
    denoiser, calls = _conditional_denoiser()
    guided = cfg_denoiser(denoiser, 1.0, lambda a, b: torch.cat([a, b]))
    torch.testing.assert_close(guided(x, t, (cond, null)), denoiser(x, t, cond))
    assert calls[0] == 3  # no wasted unconditional pass


def test_guidance_scale_zero_is_the_unconditional_prediction(guidance_inputs):
    x, t, cond, null = guidance_inputs
    denoiser, calls = _conditional_denoiser()
    guided = cfg_denoiser(denoiser, 0.0, lambda a, b: torch.cat([a, b]))
    torch.testing.assert_close(guided(x, t, (cond, null)), denoiser(x, t, null))
    assert calls[0] == 6  # both branches in one batch of 2B


def test_guidance_extrapolates(guidance_inputs):
    x, t, cond, null = guidance_inputs
    denoiser, _ = _conditional_denoiser()
    guided = cfg_denoiser(denoiser, 3.0, lambda a, b: torch.cat([a, b]))
    c, u = denoiser(x, t, cond), denoiser(x, t, null)
    torch.testing.assert_close(guided(x, t, (cond, null)), u + 3.0 * (c - u))

"""x0 / eps / v / flow predictions: every conversion against the truth, round trips, and where they
are undefined (from x0 at sigma = 0, from eps at alpha = 0)."""

from __future__ import annotations

import itertools

import pytest
import torch

from tutorial_lib.diffusion.parametrizations import (PREDICTIONS, convert, prediction_target, to_x0_eps,
                                                     well_defined, x0_denoiser)
from tutorial_lib.diffusion.schedules import COSINE, FLOW, get_schedule

ZTSNR = get_schedule("scaled_linear", zero_terminal_snr=True)
# Both ends exactly: flow and zero-terminal-SNR have alpha(1) = 0; cosine's cos(pi / 2) is not 0.
LEVELS = [(FLOW, t) for t in (0.0, 0.001, 0.3, 0.999, 1.0)] + \
         [(ZTSNR, t) for t in (0.0, 0.0004, 0.5, 0.9995, 1.0)] + [(COSINE, t) for t in (0.0, 0.5)]
DEFINED = {"x0": lambda a, s: s > 0, "eps": lambda a, s: a > 0,  # converting *from* them
           "v": lambda a, s: True, "flow": lambda a, s: True}


def _draw(schedule, t):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    alpha, sigma = schedule.alpha_sigma(torch.tensor(t, dtype=torch.float64))
    return x0, eps, alpha * x0 + sigma * eps, alpha, sigma


@pytest.mark.parametrize("schedule, t", LEVELS, ids=[f"{s.name}-{t}" for s, t in LEVELS])
def test_every_conversion_matches_the_truth_or_raises(schedule, t):
    x0, eps, x_t, alpha, sigma = _draw(schedule, t)
    for source, target in itertools.product(PREDICTIONS, repeat=2):
        pred = prediction_target(source, x0, eps, alpha, sigma)
        if source != target and not DEFINED[source](alpha, sigma):
            with pytest.raises(ValueError, match=f"from {source}"):
                convert(pred, source, target, x_t, alpha, sigma)
            continue
        torch.testing.assert_close(convert(pred, source, target, x_t, alpha, sigma),
                                   prediction_target(target, x0, eps, alpha, sigma), atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("schedule, t", LEVELS, ids=[f"{s.name}-{t}" for s, t in LEVELS])
def test_there_and_back_is_the_identity_where_defined(schedule, t):
    x0, eps, x_t, alpha, sigma = _draw(schedule, t)
    for source, target in itertools.permutations(PREDICTIONS, 2):
        if DEFINED[source](alpha, sigma) and DEFINED[target](alpha, sigma):
            pred = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
            there = convert(pred, source, target, x_t, alpha, sigma)
            back = convert(there, target, source, x_t, alpha, sigma)
            torch.testing.assert_close(back, pred, atol=1e-9, rtol=1e-9)


def test_closed_forms():
    """Salimans & Ho on VP: x0 = alpha x_t - sigma v; flow path: x0 = x_t - t u, eps = x_t + (1 - t) u."""
    x0, eps, x_t, alpha, sigma = _draw(COSINE, 0.3)
    v = prediction_target("v", x0, eps, alpha, sigma)
    torch.testing.assert_close(alpha * x_t - sigma * v, x0)
    torch.testing.assert_close(sigma * x_t + alpha * v, eps)
    x0, eps, x_t, alpha, sigma = _draw(FLOW, 0.3)
    u = prediction_target("flow", x0, eps, alpha, sigma)
    torch.testing.assert_close(to_x0_eps(u, "flow", x_t, alpha, sigma), (x_t - 0.3 * u, x_t + 0.7 * u))


def test_v_and_flow_are_velocities():
    """v = d x / d phi on cosine (alpha = cos phi); u = d x / dt on the flow path."""
    x0, eps, _, _, _ = _draw(COSINE, 0.0)
    h = 1e-6
    for schedule, t, kind, dt_dvar in ((COSINE, 0.4, "v", 2 / torch.pi), (FLOW, 0.4, "flow", 1.0)):
        ts = torch.tensor([t - h, t, t + h], dtype=torch.float64)
        alpha, sigma = schedule.alpha_sigma(ts)
        xs = alpha[:, None, None] * x0 + sigma[:, None, None] * eps
        velocity = (xs[2] - xs[0]) / (2 * h) * dt_dvar
        torch.testing.assert_close(velocity, prediction_target(kind, x0, eps, alpha[1], sigma[1]),
                                   atol=1e-6, rtol=0)


def test_x0_denoiser_wraps_a_network_of_any_prediction():
    x0, eps, _, _, _ = _draw(COSINE, 0.0)
    t = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    x_t = COSINE.add_noise(x0, t, eps)
    for kind in PREDICTIONS:
        def network(x, t, cond, kind=kind):  # a perfect network: it knows x0 and eps
            return prediction_target(kind, x0, eps, *COSINE.alpha_sigma_like(t, x))

        torch.testing.assert_close(x0_denoiser(network, kind, COSINE)(x_t, t, None), x0)
    assert x0_denoiser(network, "x0", COSINE) is network


def test_unknown_prediction():
    x = torch.zeros(2)
    for call in (lambda: convert(x, "score", "x0", x, 0.5, 0.5),
                 lambda: convert(x, "x0", "score", x, 0.5, 0.5),
                 lambda: x0_denoiser(None, "epsilon", COSINE)):
        with pytest.raises(ValueError, match="Unknown prediction"):
            call()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_snr_zero_up_to_rounding_counts_as_zero(dtype):
    """cos(pi / 2) is -4e-8 in float32 and 6e-17 in float64: eps is as undefined there as at an exact
    0, and x0 at sin(0); the other conversions, and eps a little below t = 1, stay defined."""
    end, start = COSINE.alpha_sigma(torch.tensor(1.0, dtype=dtype)), COSINE.alpha_sigma(torch.tensor(0.0, dtype=dtype))
    assert not well_defined("eps", *end) and not well_defined("x0", *start)
    assert all(well_defined(k, *end) for k in ("x0", "v", "flow"))
    assert well_defined("eps", *COSINE.alpha_sigma(torch.tensor(0.99, dtype=dtype)))
    x = torch.randn(2, 3, dtype=dtype)
    with pytest.raises(ValueError, match="from eps"):
        convert(x, "eps", "x0", x, *end)

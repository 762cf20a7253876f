"""Named schedules: identities, the zero-terminal-SNR rescale, grids, and diffusers' beta tables."""

from __future__ import annotations

import pytest
import torch

from tutorial_lib.diffusion.schedules import (COSINE, FLOW, add_noise, cosine_alpha_sigma, get_schedule,
                                              shift_timesteps, time_grid)

T = torch.linspace(0, 1, 2001, dtype=torch.float64)
BETA_NAMES = ("linear", "scaled_linear")
VP = [COSINE] + [get_schedule(n, zero_terminal_snr=z) for n in BETA_NAMES for z in (False, True)]


@pytest.mark.parametrize("schedule", VP + [FLOW], ids=lambda s: s.name)
def test_identities(schedule):
    alpha, sigma = schedule.alpha_sigma(T)
    total = alpha**2 + sigma**2 if schedule.variance_preserving else alpha + sigma  # flow: 1 - t + t
    torch.testing.assert_close(total, torch.ones_like(T))
    assert alpha[0] == 1 and sigma[0] == 0
    snr, log_snr = schedule.snr(T), schedule.log_snr(T)
    assert snr[0] == float("inf") and log_snr[0] == float("inf")
    assert (snr[1:] < snr[:-1]).all()  # the SNR falls strictly as t grows
    torch.testing.assert_close(log_snr[1:-1], snr[1:-1].log())


def test_cosine_is_the_legacy_schedule_to_the_bit():
    t = torch.rand(1000, generator=torch.Generator().manual_seed(0))
    for ours, legacy in zip(COSINE.alpha_sigma(t), cosine_alpha_sigma(t)):
        assert torch.equal(ours, legacy)
    x0, noise = torch.randn(2, 1000, 3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(add_noise(x0, t, noise), COSINE.add_noise(x0, t, noise))


@pytest.mark.parametrize("name", BETA_NAMES)
def test_zero_terminal_snr(name):
    """Lin et al. (2023): SNR(1) = 0 exactly, SNR at the first trained level (t = 1 / N) and at the
    data (t = 0, infinite) kept."""
    plain, rescaled = get_schedule(name), get_schedule(name, zero_terminal_snr=True)
    assert plain.snr(torch.tensor(1.0)) > 0
    assert rescaled.snr(torch.tensor(1.0)) == 0 and rescaled.log_snr(torch.tensor(1.0)) == float("-inf")
    first = torch.tensor(1 / 1000, dtype=torch.float64)
    torch.testing.assert_close(rescaled.snr(first), plain.snr(first), rtol=1e-12, atol=0)
    assert rescaled.snr(torch.tensor(0.0)) == float("inf")


@pytest.mark.parametrize("name, zero_terminal_snr", [(n, z) for n in BETA_NAMES for z in (False, True)])
def test_beta_schedules_match_diffusers(name, zero_terminal_snr):
    """diffusers' timestep n is our t = (n + 1) / N. Its table is float32 (cumprod of 1000 float32
    factors): rtol 1e-5 relative, atol 1e-7 for the near-0 entries."""
    diffusers = pytest.importorskip("diffusers")
    betas = {"beta_start": 0.00085, "beta_end": 0.012} if name == "scaled_linear" else {}  # else DDPM's
    theirs = diffusers.DDPMScheduler(beta_schedule=name, rescale_betas_zero_snr=zero_terminal_snr, **betas)
    levels = torch.arange(1, 1001, dtype=torch.float64) / 1000
    alpha, _ = get_schedule(name, zero_terminal_snr).alpha_sigma(levels)
    torch.testing.assert_close(alpha**2, theirs.alphas_cumprod.double(), rtol=1e-5, atol=1e-7)


def test_discrete_levels_interpolate():
    schedule = get_schedule("scaled_linear")
    snr = schedule.snr(torch.tensor([0.5, 0.5005, 0.501], dtype=torch.float64))
    assert snr[0] > snr[1] > snr[2]
    for bad in (-0.1, 1.1):
        with pytest.raises(ValueError, match=r"in \[0, 1\]"):
            schedule.alpha_sigma(torch.tensor([bad]))


def test_grids():
    schedule = get_schedule("scaled_linear")
    ts = schedule.grid(3)
    assert ts.dtype == torch.float64 and ts.tolist() == [1.0, 0.667, 0.333, 0.0]  # diffusers' "trailing"
    assert torch.equal(COSINE.grid(4, dtype=torch.float32), time_grid(4))
    assert schedule.grid(1000)[-2] == 0.001
    with pytest.raises(ValueError, match="do not fit"):
        schedule.grid(1001)
    for bad in ((4, 1.0, 1.0), (4, 1.5, 0.0), (4, 0.5, -0.1)):
        with pytest.raises(ValueError, match="t_min < t_max"):
            time_grid(*bad)


def test_get_schedule_errors():
    with pytest.raises(ValueError, match="Unknown schedule 'squaredcos'"):
        get_schedule("squaredcos")
    for name in ("cosine", "flow"):
        with pytest.raises(ValueError, match="already ends at SNR 0"):
            get_schedule(name, zero_terminal_snr=True)
    assert get_schedule("cosine") is COSINE and get_schedule("flow") is FLOW


def test_shift_timesteps():
    """Fixes the ends, moves the rest towards noise for shift > 1, and divides the flow SNR by shift^2."""
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    shifted = shift_timesteps(t, 3.0)
    assert shifted[0] == 0 and shifted[-1] == 1 and (shifted[1:-1] > t[1:-1]).all()
    torch.testing.assert_close(FLOW.snr(shifted[1:-1]), FLOW.snr(t[1:-1]) / 9)
    torch.testing.assert_close(shift_timesteps(shifted, 1 / 3), t)
    with pytest.raises(ValueError, match="positive"):
        shift_timesteps(t, 0.0)

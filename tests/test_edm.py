"""EDM (diffusion/edm.py, the sigma-space samplers in samplers.py, diffusion/toy.py): against the
paper's identities, exact denoisers, k-diffusion and diffusers.

The target that is not Gaussian is a 2-D Gaussian mixture (toy.GaussianMixture), whose ideal
denoiser E[x0 | x_sigma] is exact: fed it, a sampler's only error is its own discretisation.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from tutorial_lib.diffusion import samplers
from tutorial_lib.diffusion.edm import (EDMPrecond, edm_loss, edm_loss_weight, edm_preconditioning, edm_target,
                                        karras_sigmas, measure_sigma_data, sample_log_normal_sigmas,
                                        sigma_denoiser, sigma_of_t, t_of_sigma, time_denoiser)
from tutorial_lib.diffusion.losses import sample_timesteps
from tutorial_lib.diffusion.parametrizations import prediction_target, x0_denoiser
from tutorial_lib.diffusion.samplers import (SAMPLERS, SIGMA_SAMPLERS, sample_ddim, sample_edm_euler,
                                             sample_edm_heun)
from tutorial_lib.diffusion.schedules import (COSINE, FLOW, Schedule, cosine_alpha_sigma, flow_alpha_sigma,
                                              get_schedule)
from tutorial_lib.diffusion.toy import GaussianMixture
from tutorial_lib.models.layers import timestep_embedding

MIX = GaussianMixture([0.5, 0.3, 0.2], [[-2.0, 0.0], [1.5, 1.5], [1.0, -2.0]],
                      [[0.5, 0.5], [0.3, 0.3], [0.6, 0.25]])
SCALED_LINEAR = get_schedule("scaled_linear")
SCHEDULES = [COSINE, FLOW, get_schedule("linear"), SCALED_LINEAR, get_schedule("linear", zero_terminal_snr=True)]
SCHEDULE_IDS = ["cosine", "flow", "linear", "scaled_linear", "linear-ztsnr"]
CHURN = {"S_churn": 40.0, "S_tmin": 0.05, "S_tmax": 50.0, "S_noise": 1.003}  # the paper's ImageNet-64 setting


def normal(n, d=2, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def run_vp(name, schedule, sigmas, noise, denoiser=MIX.denoiser):
    """A t-space sampler on the t grid of `sigmas`, from the same start x_t = alpha_t sigma_0 noise, on
    an EDM denoiser through `time_denoiser`."""
    ts = t_of_sigma(schedule, sigmas)
    alpha, _ = schedule.alpha_sigma(ts[0])
    return SAMPLERS[name](time_denoiser(denoiser, schedule), alpha * sigmas[0] * noise, ts, schedule=schedule)


# ----------------------------------------------------------------------------- sigma <-> t
def test_sigma_of_t():
    """sigma = sigma_t / alpha_t: tan(pi t / 2) on cosine, t / (1 - t) on flow, inf at SNR 0 (also
    where float rounds cos(pi / 2) to 6e-17), 0 at t = 0."""
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    torch.testing.assert_close(sigma_of_t(COSINE, t[:-1]), torch.tan(math.pi * t[:-1] / 2))
    torch.testing.assert_close(sigma_of_t(FLOW, t[:-1]), t[:-1] / (1 - t[:-1]))
    for schedule in (COSINE, FLOW, SCHEDULES[-1]):
        assert sigma_of_t(schedule, 1.0) == math.inf and sigma_of_t(schedule, 0.0) == 0
    assert sigma_of_t(SCALED_LINEAR, 1.0).item() == pytest.approx(14.6146, abs=1e-4)  # diffusers' sigma_max


@pytest.mark.parametrize("schedule", SCHEDULES, ids=SCHEDULE_IDS)
def test_t_of_sigma_inverts_sigma_of_t(schedule):
    """Both ways round (closed forms on cosine and flow, bisection on the beta schedules), with 0 -> 0
    and, where the SNR reaches 0, inf -> 1. sigma -> t -> sigma to 1e-9 relative from sigma = 1e-3:
    a beta schedule's sigma_t = sqrt(1 - alpha_bar) itself carries float64's 1e-16 / sigma^2
    (measured 4e-11 there; the closed forms 1.5e-13); t -> sigma -> t to 1e-12 (measured 5e-16)."""
    largest = sigma_of_t(schedule, 1.0).clamp(max=1e3).item()
    sigmas = torch.logspace(-3, math.log10(largest), 200, dtype=torch.float64)
    torch.testing.assert_close(sigma_of_t(schedule, t_of_sigma(schedule, sigmas)), sigmas, rtol=1e-9, atol=0)
    t = torch.linspace(0.001, 0.999, 200, dtype=torch.float64)
    torch.testing.assert_close(t_of_sigma(schedule, sigma_of_t(schedule, t)), t, rtol=0, atol=1e-12)
    assert t_of_sigma(schedule, 0.0) == 0
    if math.isinf(sigma_of_t(schedule, 1.0)):
        assert t_of_sigma(schedule, math.inf) == 1


def test_bisection_agrees_with_the_closed_forms():
    """The same paths under other names take the bisection: they agree with tan and t / (1 - t)."""
    sigmas = torch.cat([torch.zeros(1), torch.logspace(-3, 3, 100), torch.full((1,), math.inf)]).double()
    for twin, closed in ((Schedule("cosine-bisected", cosine_alpha_sigma), COSINE),
                         (Schedule("flow-bisected", flow_alpha_sigma, False), FLOW)):
        torch.testing.assert_close(t_of_sigma(twin, sigmas), t_of_sigma(closed, sigmas), rtol=0, atol=1e-15)


def test_sigma_t_errors():
    for bad in (-0.1, math.nan):
        with pytest.raises(ValueError, match=">= 0"):
            t_of_sigma(COSINE, torch.tensor([1.0, bad]))
    with pytest.raises(ValueError, match=r"beyond the scaled_linear schedule's largest noise level .* 14.61"):
        t_of_sigma(SCALED_LINEAR, 80.0)
    for bad in (-0.1, 1.1, math.nan):
        with pytest.raises(ValueError, match=r"in \[0, 1\]"):
            sigma_of_t(COSINE, bad)


# ----------------------------------------------------------------------------- the adapters
@pytest.mark.parametrize("schedule", SCHEDULES, ids=SCHEDULE_IDS)
def test_t_space_samplers_drive_an_edm_denoiser(schedule):
    """`time_denoiser`: DDIM (eta = 0) on the matching t grid is Euler's method in sigma (x_t / alpha_t
    steps exactly as x does), and the t-space Heun is EDM's Heun. Measured: within 1e-13 over 10 and
    50 steps of the mixture in float64; asserted to 1e-10."""
    noise = normal(200)
    sigma_max = min(80.0, sigma_of_t(schedule, 1.0).item())  # 14.6 on scaled_linear
    for steps in (10, 50):
        sigmas = karras_sigmas(steps, sigma_max=sigma_max)
        for vp, edm in (("ddim", sample_edm_euler), ("heun", sample_edm_heun)):
            torch.testing.assert_close(run_vp(vp, schedule, sigmas, noise), edm(MIX.denoiser, noise, sigmas),
                                       rtol=0, atol=1e-10)


M, S = torch.tensor([1.5, -0.5], dtype=torch.float64), torch.tensor([0.5, 2.0], dtype=torch.float64)


def gaussian_v_model(x_t, t, cond=None):
    """The exact v-prediction for x0 ~ N(M, S^2) on the cosine schedule, as a network would give it."""
    alpha, sigma = COSINE.alpha_sigma_like(t, x_t)
    x0 = M + alpha * S**2 / (alpha**2 * S**2 + sigma**2) * (x_t - alpha * M)
    return prediction_target("v", x0, (x_t - alpha * x0) / sigma, alpha, sigma)


def test_edm_samplers_drive_a_t_space_model():
    """`sigma_denoiser`: a v-model on the cosine schedule (through parametrizations.x0_denoiser) under
    EDM's Euler and Heun on a Karras grid equals DDIM and the t-space Heun on the matching t grid.
    Measured within 2e-14 in float64; asserted to 1e-10."""
    noise, sigmas = normal(200), karras_sigmas(12)
    d_t = x0_denoiser(gaussian_v_model, "v", COSINE)
    ts = t_of_sigma(COSINE, sigmas)
    start = COSINE.alpha_sigma(ts[0])[0] * sigmas[0] * noise
    for vp, edm in (("ddim", sample_edm_euler), ("heun", sample_edm_heun)):
        torch.testing.assert_close(edm(sigma_denoiser(d_t, COSINE), noise, sigmas),
                                   SAMPLERS[vp](d_t, start, ts), rtol=0, atol=1e-10)


def test_adapters_are_inverse():
    """sigma_denoiser(time_denoiser(D)) is D again, on every schedule; the denoisers see float64 levels."""
    x, sigma = normal(5), torch.tensor([0.01, 0.3, 1.0, 7.0, 14.0], dtype=torch.float64)
    for schedule in SCHEDULES:
        round_trip = sigma_denoiser(time_denoiser(MIX.denoiser, schedule), schedule)
        torch.testing.assert_close(round_trip(x, sigma), MIX.denoiser(x, sigma), rtol=1e-10, atol=1e-12)


def test_time_denoiser_refuses_snr_zero():
    with pytest.raises(ValueError, match="cannot run at SNR 0"):
        time_denoiser(MIX.denoiser, COSINE)(normal(2), torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="cannot run at SNR 0"):
        sample_ddim(time_denoiser(MIX.denoiser, COSINE), normal(2), COSINE.grid(4))


# ----------------------------------------------------------------------------- the Karras grid
def test_karras_grid():
    """Eq. 5: N levels from sigma_max to sigma_min evenly spaced in sigma^(1 / rho), then 0; rho = 1 is
    linear in sigma."""
    sigmas = karras_sigmas(18)
    assert sigmas.dtype == torch.float64 and len(sigmas) == 19 and sigmas[-1] == 0
    ends = torch.tensor([80.0, 0.002], dtype=torch.float64)
    torch.testing.assert_close(sigmas[[0, -2]], ends, rtol=1e-14, atol=0)
    assert (sigmas[1:] < sigmas[:-1]).all()
    root = sigmas[:-1] ** (1 / 7)
    torch.testing.assert_close(root.diff(), root.diff()[:1].expand(17))
    linear = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(karras_sigmas(4, 1.0, 4.0, rho=1.0), linear)
    assert karras_sigmas(1).tolist() == [80.0, 0.0]


def test_karras_grid_errors():
    for kwargs, match in (({"rho": 0.0}, "rho must be positive"), ({"rho": -7.0}, "rho must be positive"),
                          ({"sigma_min": 80.0}, "sigma_min < sigma_max"),
                          ({"sigma_min": 100.0}, "sigma_min < sigma_max"), ({"sigma_min": 0.0}, "0 < sigma_min"),
                          ({"sigma_max": math.inf}, "sigma_max < inf"), ({"sigma_min": math.nan}, "0 < sigma_min")):
        with pytest.raises(ValueError, match=match):
            karras_sigmas(10, **kwargs)
    with pytest.raises(ValueError, match="at least 1"):
        karras_sigmas(0)


# ----------------------------------------------------------------------------- preconditioning and loss
SIGMAS = torch.logspace(-3, 2, 11, dtype=torch.float64)  # 0.001 to 100


def test_coefficients():
    """Table 1 as written, lambda = 1 / c_out^2, and D returns x0 exactly when F hits F_target."""
    sd = 0.7
    c = edm_preconditioning(SIGMAS, sd)
    torch.testing.assert_close(c.c_skip, sd**2 / (SIGMAS**2 + sd**2))
    torch.testing.assert_close(c.c_out, SIGMAS * sd / (sd**2 + SIGMAS**2).sqrt())
    torch.testing.assert_close(c.c_in, 1 / (SIGMAS**2 + sd**2).sqrt())
    torch.testing.assert_close(c.c_noise, SIGMAS.log() / 4)
    torch.testing.assert_close(edm_loss_weight(SIGMAS, sd) * c.c_out**2, torch.ones_like(SIGMAS))
    x0, n = normal(11, seed=1), normal(11, seed=2)
    s = SIGMAS[:, None]
    x = x0 + s * n
    target = edm_target(x0, n, s, sd)
    torch.testing.assert_close(target, (x0 - c.c_skip[:, None] * x) / c.c_out[:, None])  # the definition
    torch.testing.assert_close(c.c_skip[:, None] * x + c.c_out[:, None] * target, x0)


@pytest.mark.parametrize("sigma_data", [0.5, 1.3])
def test_effective_target_has_unit_variance_at_every_sigma(sigma_data):
    """For x0 ~ N(0, sd^2), F_target = (x0 - c_skip x) / c_out has variance 1 at each of 11 sigmas
    from 0.001 to 100 (200,000 draws: standard error 0.003; within 0.015 asserted), and so an
    untrained F = 0 has loss lambda |c_skip x - x0|^2 = 1 everywhere. The network's input c_in x
    has unit variance too."""
    g = torch.Generator().manual_seed(0)
    x0 = sigma_data * torch.randn(200_000, generator=g, dtype=torch.float64)
    for sigma in SIGMAS:
        n = torch.randn(200_000, generator=g, dtype=torch.float64)
        c = edm_preconditioning(sigma, sigma_data)
        x = x0 + sigma * n
        assert ((x0 - c.c_skip * x) / c.c_out).var().item() == pytest.approx(1, abs=0.015)
        untrained_loss = edm_loss_weight(sigma, sigma_data) * (c.c_skip * x - x0).pow(2).mean()
        assert untrained_loss.item() == pytest.approx(1, abs=0.015)
        assert (c.c_in * x).var().item() == pytest.approx(1, abs=0.015)


def test_sigma_data_of_a_mixture_gives_unit_second_moment():
    """For data that is neither Gaussian nor of zero mean, the measured sigma_data (the RMS) still
    gives F_target a second moment of 1 at every sigma: the preconditioning's derivation needs
    E[x0^2] = sd^2, not a Gaussian."""
    g = torch.Generator().manual_seed(3)
    x0 = MIX.sample(100_000, g)
    sd = measure_sigma_data(x0)
    for sigma in SIGMAS:
        target = edm_target(x0, torch.randn(x0.shape, generator=g, dtype=torch.float64), sigma, sd)
        assert target.pow(2).mean().item() == pytest.approx(1, abs=0.015)


def test_stable_target_in_low_precision():
    """The definition (x0 - c_skip x) / c_out subtracts nearly equal numbers at small sigma and
    divides the rounding by c_out ~ sigma; `edm_target` does not. Against float64, at sigma = 1e-4 in
    float32: 2e-3 against 3e-7; at sigma = 0.01 in bfloat16: 0.9 against 0.014 (a target of unit std)."""
    x0, n = normal(1000, seed=4), normal(1000, seed=5)
    for dtype, sigma, naive_above, stable_below in ((torch.float32, 1e-4, 1e-3, 1e-6),
                                                    (torch.bfloat16, 1e-2, 0.3, 0.03)):
        exact = edm_target(x0, n, sigma, 0.5)
        c = edm_preconditioning(torch.tensor(sigma, dtype=dtype), 0.5)
        naive = (x0.to(dtype) - c.c_skip * (x0.to(dtype) + sigma * n.to(dtype))) / c.c_out
        assert (naive.double() - exact).abs().max() > naive_above
        assert (edm_target(x0.to(dtype), n.to(dtype), sigma, 0.5).double() - exact).abs().max() < stable_below


class Recorder(nn.Module):
    """A stand-in network: returns a fixed function of its input, records what it was given."""
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.3))
        self.seen = []

    def forward(self, x, noise_level, cond):
        self.seen.append((x, noise_level, cond))
        return self.scale * x + noise_level[:, None, None, None]


def test_edm_precond_wraps_a_network():
    """The network sees c_in x in x's dtype and c_noise = ln(sigma) / 4 (at least float32), and
    D = c_skip x + c_out F comes back in x's dtype; sigma is one level per item."""
    net = Recorder()
    precond = EDMPrecond(net, 0.8)
    x = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.01, 1.0, 50.0], dtype=torch.float64)
    out = precond(x, sigma, "cond")
    seen_x, seen_level, cond = net.seen[-1]
    c = edm_preconditioning(sigma[:, None, None, None], 0.8)
    assert seen_x.dtype == torch.float32 and seen_level.dtype == torch.float32 and cond == "cond"
    torch.testing.assert_close(seen_x, (c.c_in * x).float())
    torch.testing.assert_close(seen_level, (sigma.log() / 4).float())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, (c.c_skip * x + c.c_out * net(seen_x, seen_level, None)).float())
    assert "sigma_data=0.8" in repr(precond)
    precond(x.half(), sigma, None)
    assert net.seen[-1][0].dtype == torch.float16 and net.seen[-1][1].dtype == torch.float32
    with pytest.raises(ValueError, match=r"one noise level per item, shape \(3,\)"):
        precond(x, sigma[:1])


def test_the_dits_embedding_resolves_c_noise():
    """models.layers.timestep_embedding embeds 1000 t: fed c_noise, sigmas 0.53% apart (2000 levels
    over [0.002, 80]) are farther apart than DDPM's neighbouring steps t = 0.5, 0.501 (the embedding's
    distance depends on the difference only). Fed sigma itself, the small sigmas would blur together."""
    sigmas = torch.logspace(math.log10(0.002), math.log10(80), 2000, dtype=torch.float64)
    ddpm_step = timestep_embedding(torch.tensor([0.5, 0.501]), 256).diff(dim=0).norm()

    def neighbours(levels):
        return timestep_embedding(levels, 256).diff(dim=0).norm(dim=1)

    assert neighbours(edm_preconditioning(sigmas, 1.0).c_noise).min() > ddpm_step
    assert neighbours(sigmas).min() < 0.1 * ddpm_step


def test_tiny_transformer_under_edm():
    """The notebook-01 transformer as F: preconditioned, sampled by EDM Heun in float32 (float64
    sigma), and trained one step by the EDM loss with finite gradients."""
    from tutorial_lib.models.tiny_transformer import TinyTransformer, TinyTransformerConfig
    from tutorial_lib.text.base import TextEmbedding

    torch.manual_seed(0)
    net = TinyTransformer(TinyTransformerConfig(latent_channels=4, latent_size=8, dim=32, depth=1, heads=2,
                                                text_dim=16))
    precond = EDMPrecond(net, 1.1)
    text = TextEmbedding(torch.randn(2, 3, 16), torch.ones(2, 3, dtype=torch.bool))
    g = torch.Generator().manual_seed(1)
    out = sample_edm_heun(precond, torch.randn(2, 4, 8, 8, generator=g), karras_sigmas(3), text)
    assert out.dtype == torch.float32 and out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
    loss = edm_loss(precond, torch.randn(2, 4, 8, 8, generator=g), text, g)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


def test_edm_loss_is_the_weighted_denoising_error():
    """edm_loss (in F's space, unweighted) = mean over items of lambda(sigma) |D - x0|^2 / numel, on the
    same sigmas and noise (the same generator seed), to 1e-12 in float64."""
    precond = EDMPrecond(Recorder().double(), 0.6)
    x0 = normal(24, seed=7).reshape(6, 2, 2, 2) * 0.6
    sigma = torch.logspace(-2, 1.5, 6, dtype=torch.float64)
    loss = edm_loss(precond, x0, None, torch.Generator().manual_seed(3), sigma=sigma)
    n = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    s = sigma[:, None, None, None]
    per_item = (precond(x0 + s * n, sigma) - x0).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(loss, (edm_loss_weight(sigma, 0.6) * per_item).mean(), rtol=1e-12, atol=0)
    drawn = [edm_loss(precond, x0, None, torch.Generator().manual_seed(4)) for _ in range(2)]
    assert drawn[0] == drawn[1]


def test_log_normal_sigmas():
    """ln sigma ~ N(-1.2, 1.2^2), seeded; on the flow path it is exactly logit-normal t with shift k
    and P_mean = m + ln k (the same draws: rounding of float32's t / (1 - t) only)."""
    ln_sigma = sample_log_normal_sigmas(100_000, torch.Generator().manual_seed(0)).log()
    assert ln_sigma.mean().item() == pytest.approx(-1.2, abs=0.02)
    assert ln_sigma.std().item() == pytest.approx(1.2, abs=0.02)
    t = sample_timesteps(1000, "logit_normal", torch.Generator().manual_seed(1), logit_normal=(0.3, 0.8), shift=3.0)
    sigma = sample_log_normal_sigmas(1000, torch.Generator().manual_seed(1), P_mean=0.3 + math.log(3), P_std=0.8)
    torch.testing.assert_close(sigma_of_t(FLOW, t), sigma.double(), rtol=1e-4, atol=0)
    with pytest.raises(ValueError, match="P_std"):
        sample_log_normal_sigmas(4, P_std=-1.0)


def test_measure_sigma_data(tmp_path):
    """The RMS, chunked in float64, from a tensor or a memory-mapped array (as LatentCache.latents);
    for zero-mean data it is the std."""
    latents = 0.9 * torch.randn(1000, 4, 3, 3, generator=torch.Generator().manual_seed(0)) + 0.2
    expected = latents.double().pow(2).mean().sqrt().item()
    assert measure_sigma_data(latents, chunk=64) == pytest.approx(expected, rel=1e-12)
    np.save(tmp_path / "z.npy", latents.numpy())
    memory_mapped = np.load(tmp_path / "z.npy", mmap_mode="r")
    assert measure_sigma_data(memory_mapped, chunk=300) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx((latents.std().item() ** 2 + latents.mean().item() ** 2) ** 0.5, rel=1e-3)
    for bad in (torch.zeros(3, 2), torch.empty(0, 2), torch.tensor([[1.0, math.nan]])):
        with pytest.raises(ValueError, match="Cannot measure sigma_data"):
            measure_sigma_data(bad)


def test_sigma_data_must_be_positive():
    for bad in (0.0, -0.5, math.inf, math.nan):
        with pytest.raises(ValueError, match="sigma_data.*must be positive and finite"):
            EDMPrecond(nn.Identity(), bad)
        with pytest.raises(ValueError, match="sigma_data.*must be positive and finite"):
            edm_preconditioning(SIGMAS, bad)


# ----------------------------------------------------------------------------- the sigma-space samplers
@pytest.mark.parametrize("name, calls", [("edm_euler", 5), ("edm_heun", 9)])
def test_sigma_sampler_contract(name, calls):
    """The denoiser sees x in the noise's dtype and sigma [B] in float64, never sigma = 0 (Heun: 2N - 1
    evaluations); the first is at x = sigma_max noise; every step calls back; the result is in the
    noise's dtype."""
    seen, steps = [], []

    def denoiser(x, sigma, cond):
        assert x.dtype == torch.float32 and sigma.dtype == torch.float64 and sigma.shape == (3,) and cond == "c"
        seen.append((x.clone(), float(sigma[0])))
        return MIX.denoiser(x, sigma)

    noise = normal(3).float()
    out = SIGMA_SAMPLERS[name](denoiser, noise, karras_sigmas(5), "c", lambda i, s, x, x0: steps.append(i))
    assert len(seen) == calls and min(s for _, s in seen) > 0 and steps == [0, 1, 2, 3, 4]
    torch.testing.assert_close(seen[0][0], 80 * noise)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("sampler", SIGMA_SAMPLERS.values())
def test_churn_is_seeded_and_off_by_default(sampler):
    """S_churn = 0 (Algorithm 1) draws nothing; with churn, the same seed gives the same samples."""
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    sampler(MIX.denoiser, normal(10), karras_sigmas(8), generator=g)
    assert torch.equal(g.get_state(), state)

    def churned(seed):
        return sampler(MIX.denoiser, normal(10), karras_sigmas(8), generator=torch.Generator().manual_seed(seed),
                       **CHURN)

    assert torch.equal(churned(1), churned(1)) and not torch.equal(churned(1), churned(2))


@pytest.mark.parametrize("sampler", SIGMA_SAMPLERS.values())
def test_bad_sigma_grids_and_churn(sampler):
    for sigmas, match in ((torch.tensor([1.0, 2.0, 0.0]), "decrease strictly"),
                          (torch.tensor([2.0, 1.0, 1.0]), "decrease strictly"),
                          (torch.tensor([math.inf, 1.0, 0.0]), "finite"),
                          (torch.tensor([1.0, math.nan]), "finite"),
                          (torch.tensor([1.0, -0.5]), ">= 0"), (torch.tensor([1.0]), "at least 2"),
                          (torch.ones(2, 2), "1-D")):
        with pytest.raises(ValueError, match=match):
            sampler(MIX.denoiser, normal(2), sigmas)
    for kwargs, match in (({"S_churn": -1.0}, "S_churn must be >= 0"),
                          ({"S_noise": 0.0}, "S_noise must be positive"),
                          ({"S_noise": -1.0}, "S_noise must be positive"),
                          ({"S_tmin": 2.0, "S_tmax": 1.0}, "S_tmin <= S_tmax"), ({"S_tmin": -1.0}, "0 <= S_tmin")):
        with pytest.raises(ValueError, match=match):
            sampler(MIX.denoiser, normal(2), karras_sigmas(4), **kwargs)


@pytest.mark.cuda
@pytest.mark.parametrize("name", SIGMA_SAMPLERS)
def test_churned_samplers_on_cuda(name):
    """A CPU generator drives CUDA latents with the CPU's draws: the same chain as on the CPU (float64
    state and noise on both). The mixture's denoiser runs on the CPU, the sampler's state on the GPU."""
    def denoiser(x, sigma, cond=None):
        assert sigma.device == x.device
        return MIX.denoiser(x.cpu(), sigma.cpu()).to(x.device)

    def run(noise):
        return SIGMA_SAMPLERS[name](denoiser, noise, karras_sigmas(10), generator=torch.Generator().manual_seed(1),
                                    **CHURN)

    on_gpu = run(normal(50).cuda())
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), run(normal(50)))


# Every deterministic sampler, with the order it promises: EDM's own, and the t-space ones on the
# cosine schedule through `time_denoiser` (flow Euler on the flow path).
ORDERS = {"edm_euler": 1, "edm_heun": 2, "ddim": 1, "heun": 2, "dpmpp_2m": 2, "flow_euler": 1}


def sample_deterministic(name, noise, sigmas):
    if name in SIGMA_SAMPLERS:
        return SIGMA_SAMPLERS[name](MIX.denoiser, noise, sigmas)
    return run_vp(name, FLOW if name == "flow_euler" else COSINE, sigmas, noise)


@pytest.fixture(scope="module")
def reference():
    """The mixture's probability-flow map, to about 1e-7: EDM Heun on 1024 Karras steps."""
    noise = normal(256, seed=11)
    return noise, sample_edm_heun(MIX.denoiser, noise, karras_sigmas(1024))


@pytest.mark.parametrize("name", ORDERS)
def test_deterministic_samplers_converge_at_their_order(name, reference):
    """The median distance of 256 samples to the reference map at 16, 32, 64, 128 and 256 Karras steps
    (sigma in [0.002, 80], rho = 7) falls as N^-order: the fitted log-log slope is within 0.25 of
    -order. Measured: -1.03 for EDM Euler, DDIM and flow Euler (DDIM and flow Euler are EDM Euler's
    steps exactly), -2.16 for both Heuns, -2.24 for DPM-Solver++(2M); over 6 seeds of the noise,
    -1.02 to -1.03 and -2.16 to -2.17 for EDM's. The median, not the mean: a sample near the
    boundary between two modes may end in the other one at coarse steps, and a few such O(1) errors
    make the RMS's slope wander (-0.4 to -1.2 for Euler over those seeds)."""
    noise, exact = reference
    steps = [16, 32, 64, 128, 256]
    errors = [(sample_deterministic(name, noise, karras_sigmas(n)) - exact).norm(dim=1).median().item()
              for n in steps]
    slope = np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert abs(slope + ORDERS[name]) < 0.25, (errors, slope)


@pytest.mark.parametrize("kwargs", [{}, CHURN], ids=["deterministic", "churn"])
def test_heun_recovers_the_mixture(kwargs):
    """20,000 samples of EDM Heun in 32 steps from N(0, 80^2): the mixture's mean and covariance
    within 4 standard errors (0.012 and 0.03), 0.05 and 0.12 entrywise; measured 0.03 and 0.04
    deterministic, 0.02 and 0.08 churned. (Euler with churn is visibly biased at 32 steps, 0.3 in
    the covariance, as Karras et al. found: churn wants Heun.)"""
    x = sample_edm_heun(MIX.denoiser, normal(20_000, seed=12), karras_sigmas(32),
                        generator=torch.Generator().manual_seed(13), **kwargs)
    truth = MIX.sample(400_000, torch.Generator().manual_seed(14))
    torch.testing.assert_close(x.mean(0), truth.mean(0), rtol=0, atol=0.05)
    torch.testing.assert_close(x.T.cov(), truth.T.cov(), rtol=0, atol=0.12)


def test_mixture():
    """D(x, 0) = x; for one component D is the Gaussian posterior mean; log_prob normalises."""
    x = normal(7)
    torch.testing.assert_close(MIX.denoiser(x, 0.0), x)
    one = GaussianMixture([1.0], [[1.0, -1.0]], [0.5])
    sigma = torch.full((7,), 2.0, dtype=torch.float64)
    torch.testing.assert_close(one.denoiser(x, sigma), one.means[0] + 0.25 / 4.25 * (x - one.means[0]))
    grid = torch.stack(torch.meshgrid(*[torch.linspace(-8, 8, 401, dtype=torch.float64)] * 2, indexing="ij"), -1)
    mass = MIX.log_prob(grid.reshape(-1, 2), 0.5).exp().sum() * (16 / 400) ** 2
    assert mass.item() == pytest.approx(1, abs=1e-3)
    for args, match in ((([1.0], [1.0], [1.0]), "means"), (([1.0, 1.0], [[0.0], [1.0]], [1.0]), "stds"),
                        (([1.0], [[0.0, 0.0]], [[1.0, 1.0, 1.0]]), "stds"), (([1.0], [[0.0]], [0.0]), "positive")):
        with pytest.raises(ValueError, match=match):
            GaussianMixture(*args)


# ----------------------------------------------------------------------------- k-diffusion
@pytest.fixture(scope="module")
def k_sampling():
    """k_diffusion.sampling without k_diffusion/__init__.py, which imports the whole training stack
    (wandb, clip, clean-fid, kornia, ...): a bare package of another name over the same folder, so
    that sampling.py's `from . import utils` resolves. scripts/setup.sh dev installs k-diffusion with
    --no-deps and pyproject's dev extra the few modules sampling.py imports (torchsde, torchdiffeq)."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        pytest.skip("k-diffusion is not installed (scripts/setup.sh dev: pip install --no-deps k-diffusion)")
    package = types.ModuleType("_k_diffusion_bare")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules[package.__name__] = package
    try:
        yield importlib.import_module("_k_diffusion_bare.sampling")
    except ImportError as err:
        pytest.skip(f"k_diffusion.sampling does not import ({err}); scripts/setup.sh dev installs what it needs")
    finally:
        for name in [n for n in sys.modules if n.split(".")[0] == package.__name__]:
            del sys.modules[name]


def test_karras_grid_matches_k_diffusion(k_sampling):
    """get_sigmas_karras computes in the default dtype: under float64 it equals ours (measured:
    identical; float32's differs by 6e-7 relative)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        for n, lo, hi, rho in ((18, 0.002, 80.0, 7.0), (5, 0.03, 14.6, 3.0), (1, 0.1, 1.0, 7.0)):
            torch.testing.assert_close(k_sampling.get_sigmas_karras(n, lo, hi, rho), karras_sigmas(n, lo, hi, rho),
                                       rtol=1e-15, atol=0)
    finally:
        torch.set_default_dtype(default)


@pytest.mark.parametrize("name", SIGMA_SAMPLERS)
@pytest.mark.parametrize("churn", [{}, CHURN], ids=["deterministic", "churn"])
def test_samplers_match_k_diffusion(k_sampling, monkeypatch, name, churn):
    """k-diffusion's sample_euler / sample_heun on the same denoiser (the mixture's), start and grid
    (10 Karras steps). Its churn noise is torch.randn_like, drawn at every step; ours comes from the
    generator, only at steps with gamma > 0. So our draws are recorded (through samplers._randn) and
    torch.randn_like is patched, during k-diffusion's run, to hand out the recorded draw at each
    churned step (zeros, unused, at the others). Measured: within 1e-14 in float64; asserted 1e-10."""
    drawn = []
    real_randn = samplers._randn
    monkeypatch.setattr(samplers, "_randn", lambda x, g: drawn.append(real_randn(x, g)) or drawn[-1])
    noise, sigmas = normal(300, seed=21), karras_sigmas(10)
    ours = SIGMA_SAMPLERS[name](MIX.denoiser, noise, sigmas, generator=torch.Generator().manual_seed(22), **churn)

    churned = [bool(churn) and churn["S_tmin"] <= s <= churn["S_tmax"] for s in sigmas[:-1].tolist()]
    assert sum(churned) == len(drawn)
    per_step = iter([drawn.pop(0) if c else torch.zeros_like(noise) for c in churned])
    monkeypatch.setattr(torch, "randn_like", lambda x: next(per_step))
    k_sampler = {"edm_euler": k_sampling.sample_euler, "edm_heun": k_sampling.sample_heun}[name]
    theirs = k_sampler(lambda x, sigma: MIX.denoiser(x, sigma), noise * sigmas[0], sigmas, disable=True,
                       **{k.lower(): v for k, v in churn.items()})
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-10)


# ----------------------------------------------------------------------------- diffusers
def test_heun_matches_diffusers_karras_heun():
    """HeunDiscreteScheduler(use_karras_sigmas=True) on Stable Diffusion's betas is EDM's Heun on a
    Karras grid (rho = 7) between that schedule's own sigma(t = 1 / 1000) and sigma(1), ending with
    an Euler step onto 0. Its grid equals karras_sigmas(10, ...) to the precision of its float32
    alphas_cumprod (1.3e-5 relative measured, 3e-5 asserted); stepped on its own levels with the
    mixture's exact eps, it matches our Heun to 1e-9 (measured; 1e-7 asserted: the float32 step
    sizes, its arithmetic being float64 on float64 samples).
    Documented difference: diffusers tells its model a timestep interpolated linearly in log sigma
    between trained steps; `t_of_sigma` inverts our schedule's alpha_bar, linear in t there. The two
    agree at trained steps and within 0.013 of a step between them (n = 1000 t - 1; 0.03 asserted)."""
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.HeunDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                                use_karras_sigmas=True, prediction_type="epsilon")
    scheduler.set_timesteps(10)
    levels = torch.cat([scheduler.sigmas[:1], scheduler.sigmas[1::2]]).double()  # Heun repeats each level
    sigma_range = sigma_of_t(SCALED_LINEAR, torch.tensor([0.001, 1.0]))
    ours = karras_sigmas(10, *sigma_range.tolist())
    torch.testing.assert_close(levels, ours, rtol=3e-5, atol=0)
    timesteps = scheduler.timesteps[::2].double()  # one per level
    # From the second level on: diffusers' sigma_max (of its float32 table) is 1e-5 above ours.
    steps = 1000 * t_of_sigma(SCALED_LINEAR, levels[1:-1]) - 1
    torch.testing.assert_close(steps, timesteps[1:], rtol=0, atol=0.03)

    noise = normal(64, seed=31)
    x = noise * scheduler.init_noise_sigma.double()
    for timestep in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, timestep)  # x / sqrt(sigma^2 + 1): its VP input
        sigma = scheduler.sigmas[scheduler.step_index].double()
        eps = (x - MIX.denoiser(x, sigma)) / sigma  # what an exact eps-model says at x_in
        assert torch.allclose(x_in * (1 + sigma**2) ** 0.5, x)
        x = scheduler.step(eps, timestep, x).prev_sample
    torch.testing.assert_close(sample_edm_heun(MIX.denoiser, noise, levels), x, rtol=0, atol=1e-7)

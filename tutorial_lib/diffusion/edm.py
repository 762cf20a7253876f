"""EDM: Karras, Aittala, Aila & Laine (2022), "Elucidating the Design Space of Diffusion-Based
Generative Models" (arXiv 2206.00364), written from the paper.

The sigma formulation (their Sec. 2). Data plus Gaussian noise of std sigma,
    x = x0 + sigma n,    n ~ N(0, I),
from sigma = 0 (the data) up to a sigma_max where x is about pure noise (80 in the paper). Every
schedule of schedules.py is this process, scaled: x_t = alpha_t x0 + sigma_t eps = alpha_t (x0 +
(sigma_t / alpha_t) eps), so
    sigma = sigma_t / alpha_t,    x_t = alpha_t x_sigma        (the paper's sigma(t) and s(t) = alpha_t)
and SNR = 1 / sigma^2. sigma is the coordinate all schedules share: `sigma_of_t` and `t_of_sigma`
map a level both ways, `sigma_denoiser` runs a VP or flow model's x0-denoiser D(x_t, t) under the
sigma-space samplers (samplers.SIGMA_SAMPLERS), `time_denoiser` an EDM denoiser D(x, sigma) under the
t-space ones (samplers.SAMPLERS). x0 is the same in both coordinates: a denoiser's output needs no
conversion, only its input is scaled by alpha_t.

Preconditioning (Sec. 5, Table 1). The network F is wrapped so that its input and its training
target have unit variance at every sigma, for data of std sigma_data:
    D(x, sigma) = c_skip x + c_out F(c_in x, c_noise),
    c_skip = sd^2 / (sigma^2 + sd^2),  c_out = sigma sd / sqrt(sigma^2 + sd^2),
    c_in = 1 / sqrt(sigma^2 + sd^2),   c_noise = ln(sigma) / 4                     (sd = sigma_data)
(`edm_preconditioning`, `EDMPrecond`). Training draws ln sigma ~ N(P_mean, P_std^2) and weights
    lambda(sigma) |D - x0|^2,    lambda = (sigma^2 + sd^2) / (sigma sd)^2 = 1 / c_out^2,
which is |F - F_target|^2 with unit weight, F_target = (x0 - c_skip x) / c_out (`edm_loss`).

Sampling on the grid of eq. 5 (`karras_sigmas`), with samplers.sample_edm_euler / sample_edm_heun.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from .losses import weighted_mse
from .samplers import _randn
from .schedules import Schedule


def _per_item(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """One value per item v [B] shaped [B, 1, ...] to broadcast over x [B, ...]."""
    return v.reshape(-1, *([1] * (x.ndim - 1)))


# ----------------------------------------------------------------------------- sigma <-> t
def sigma_of_t(schedule: Schedule, t) -> torch.Tensor:
    """sigma = sigma_t / alpha_t of levels t in [0, 1] on `schedule`, in float64: 0 at t = 0, inf
    where the SNR is 0 (alpha_t = 0 up to rounding, as float's cos(pi / 2))."""
    t = torch.as_tensor(t, dtype=torch.float64)
    if (t < 0).any() or (t > 1).any() or t.isnan().any():
        raise ValueError("Noise levels t must lie in [0, 1].")
    alpha, sigma = schedule.alpha_sigma(t)
    no_signal = alpha.abs() <= torch.finfo(torch.float64).eps * (alpha.abs() + sigma.abs())
    return torch.where(no_signal, math.inf, sigma / alpha)


def _bisect_t(schedule: Schedule, sigma: torch.Tensor) -> torch.Tensor:
    """The t in [0, 1] with sigma_t / alpha_t = sigma, by bisection: sigma_t / alpha_t increases
    strictly in t (the SNR falls), compared as sigma_t > sigma alpha_t so that alpha_t = 0 needs no
    division. 64 halvings leave an interval of 2^-64, below float64's resolution of t."""
    lo, hi = torch.zeros_like(sigma), torch.ones_like(sigma)
    for _ in range(64):
        mid = (lo + hi) / 2
        alpha, sigma_t = schedule.alpha_sigma(mid)
        above = sigma_t > sigma * alpha
        lo, hi = torch.where(above, lo, mid), torch.where(above, mid, hi)
    return torch.where(sigma == 0, 0.0, (lo + hi) / 2)


# Inverses of sigma_of_t in closed form: cosine sigma = tan(pi t / 2), flow sigma = t / (1 - t).
_CLOSED_FORM_T = {"cosine": lambda s: torch.atan(s) / (math.pi / 2),
                  "flow": lambda s: torch.reciprocal(1 + torch.reciprocal(s))}  # s / (1 + s), 1 at inf


def t_of_sigma(schedule: Schedule, sigma) -> torch.Tensor:
    """The level t on `schedule` of noise level sigma (inverse of `sigma_of_t`), in float64: in
    closed form on the cosine and flow schedules, by bisection on any other (the beta schedules).
    sigma = 0 gives t = 0; sigma must not exceed the schedule's largest level sigma_of_t(1) (inf on
    schedules that end at SNR 0, 14.6 on Stable Diffusion's scaled-linear betas; a sigma above it
    by rounding only maps to t = 1)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    if (sigma < 0).any() or sigma.isnan().any():
        raise ValueError("Noise levels sigma must be >= 0 (0 is the data).")
    largest = sigma_of_t(schedule, torch.ones((), device=sigma.device))
    if (sigma > largest * (1 + 1e-12)).any():  # beyond rounding (karras_sigmas' sigma_max^(1/rho)^rho)
        raise ValueError(f"sigma = {sigma.max().item():.4g} is beyond the {schedule.name} schedule's "
                         f"largest noise level sigma(t = 1) = {largest.item():.4g}; start the sigma grid "
                         f"below it, e.g. karras_sigmas(steps, sigma_max={largest.item():.4g}).")
    invert = _CLOSED_FORM_T.get(schedule.name)
    return invert(sigma) if invert is not None else _bisect_t(schedule, sigma)


def sigma_denoiser(denoiser, schedule: Schedule):
    """An EDM denoiser D(x, sigma [B], cond) -> x0_hat from a t-space one `denoiser(x_t, t [B],
    cond)` on `schedule` (e.g. `parametrizations.x0_denoiser` of a v or flow network): the network
    sees t = t_of_sigma(sigma) and x_t = alpha_t x, as in training; t is float64. So the sigma-space
    samplers drive any VP or flow model, on a sigma grid up to the schedule's largest level."""
    def denoise(x: torch.Tensor, sigma: torch.Tensor, cond=None) -> torch.Tensor:
        t = t_of_sigma(schedule, sigma)
        alpha, _ = schedule.alpha_sigma_like(t, x)
        return denoiser((alpha * x).to(x.dtype), t, cond).to(x.dtype)

    return denoise


def time_denoiser(denoiser, schedule: Schedule):
    """A t-space denoiser D(x_t, t [B], cond) -> x0_hat on `schedule` from an EDM one `denoiser(x,
    sigma [B], cond)` (e.g. `EDMPrecond`): it sees sigma = sigma_of_t(t) (float64) and x = x_t /
    alpha_t. So the samplers of samplers.SAMPLERS drive an EDM model, on a t grid that starts below
    SNR 0 (where sigma is infinite), e.g. t_of_sigma(schedule, karras_sigmas(steps))."""
    def denoise(x_t: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        sigma = sigma_of_t(schedule, t)
        if torch.isinf(sigma).any():
            raise ValueError(f"An EDM denoiser cannot run at SNR 0 (t = {t.max().item():.4g} on the "
                             f"{schedule.name} schedule, sigma = inf): start the t grid below it, e.g. "
                             "t_of_sigma(schedule, karras_sigmas(steps)).")
        alpha, _ = schedule.alpha_sigma_like(t.to(torch.float64), x_t)
        return denoiser((x_t / alpha).to(x_t.dtype), sigma, cond).to(x_t.dtype)

    return denoise


# ----------------------------------------------------------------------------- the Karras grid
def karras_sigmas(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0,
                  rho: float = 7.0) -> torch.Tensor:
    """The sampling grid of Karras et al. (2022), eq. 5: N = `steps` levels evenly spaced in
    sigma^(1 / rho) from sigma_max down to sigma_min, then 0,
        sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,  i < N,
        sigma_N = 0,
    N + 1 levels in float64 (k-diffusion's get_sigmas_karras). rho = 1 spaces them evenly in sigma,
    large rho evenly in log sigma. The paper's rho = 7 puts more of them near sigma_min than rho = 3,
    which would about equalise the error per step: errors at small sigma show most in the samples.
    Their range is sigma in [0.002, 80], for data of std 0.5."""
    if steps < 1:
        raise ValueError(f"Need at least 1 sampling step, got {steps}.")
    if not rho > 0:
        raise ValueError(f"rho must be positive, got {rho}.")
    if not 0 < sigma_min < sigma_max < math.inf:
        raise ValueError(f"Need 0 < sigma_min < sigma_max < inf, got sigma_min={sigma_min}, "
                         f"sigma_max={sigma_max}.")
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


# ----------------------------------------------------------------------------- preconditioning
class Preconditioning(NamedTuple):
    """The coefficients of Table 1 (`edm_preconditioning`)."""
    c_skip: torch.Tensor
    c_out: torch.Tensor
    c_in: torch.Tensor
    c_noise: torch.Tensor


def _check_sigma_data(sigma_data: float):
    if not 0 < sigma_data < math.inf:
        raise ValueError(f"sigma_data, the data's standard deviation, must be positive and finite, got "
                         f"{sigma_data}; measure it from the training latents with measure_sigma_data.")


def edm_preconditioning(sigma: torch.Tensor, sigma_data: float) -> Preconditioning:
    """Karras et al. (2022), Table 1, for noise levels sigma > 0 (any shape), in sigma's dtype:
        c_skip = sd^2 / (sigma^2 + sd^2)         the share of x passed straight through
        c_out = sigma sd / sqrt(sigma^2 + sd^2)  the scale of the network's output
        c_in = 1 / sqrt(sigma^2 + sd^2)          makes the input c_in x of unit variance
        c_noise = ln(sigma) / 4                  the noise level the network is told
    (sd = sigma_data). c_skip and c_out are chosen so that F's target (x0 - c_skip x) / c_out has
    unit variance and as little of it as possible is left to F (derived in their appendix)."""
    _check_sigma_data(sigma_data)
    total = sigma**2 + sigma_data**2
    return Preconditioning(sigma_data**2 / total, sigma * sigma_data / total.sqrt(), total.rsqrt(),
                           sigma.log() / 4)


def edm_loss_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2, the weight of |D - x0|^2 (Karras et al., 2022,
    Sec. 5): exactly 1 / c_out^2, so that in F's space every level weighs the same."""
    _check_sigma_data(sigma_data)
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def edm_target(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """What F must output for D to return x0 from x = x0 + sigma n (sigma broadcast over x0):
        F_target = (x0 - c_skip x) / c_out = (sigma x0 - sd^2 n) / (sd sqrt(sigma^2 + sd^2)),
    computed in the second form: the first subtracts two nearly equal terms at small sigma (c_skip
    -> 1) and divides the rounding by c_out -> 0. Its variance is 1 for data of std sd: (sigma^2 sd^2
    + sd^4) / (sd^2 (sigma^2 + sd^2)). At sd = 1 it is -v, the v-prediction (Salimans & Ho, 2022)
    on the VP schedule with the same SNR."""
    _check_sigma_data(sigma_data)
    return (sigma * x0 - sigma_data**2 * noise) / (sigma_data * (sigma**2 + sigma_data**2) ** 0.5)


class EDMPrecond(nn.Module):
    """D(x, sigma, cond) = c_skip x + c_out F(c_in x, c_noise, cond) around any network
    `net(x [B, C, H, W], noise_level [B], cond)` (Karras et al., 2022, Sec. 5 and Table 1).

    The network is told c_noise = ln(sigma) / 4 itself as its noise level. The DiT and the tiny
    transformer embed their level t as sinusoids of 1000 t (`models.layers.timestep_embedding`,
    built for t in [0, 1], DDPM's steps 0..1000): given c_noise they embed 250 ln sigma, from -1554
    to 1095 over the paper's sampling range sigma in [0.002, 80] (-1200 to 600 over 3 std of the
    training draws; negative is fine, a cos and sin pair tells any two angles apart). That is a span
    like DDPM's and as finely resolved: sigmas 0.4% apart are 1 apart, as neighbouring DDPM steps
    are, and the slowest sinusoid (frequency 1e-4) turns 0.27 rad over the range, so no two levels
    alias. Feeding sigma instead would put every sigma below 0.01 within 10 of 0 on a scale that
    reaches 80,000 at sigma_max. A network that embeds DDPM's step numbers 0..999 as they are
    (diffusers' UNets) would want 1000 c_noise.

    `sigma_data` is the data's std, measured (`measure_sigma_data`), not assumed. sigma must be
    > 0, one per item; it is not checked for values here, which would stop the GPU for the host
    (the samplers never call a denoiser at sigma = 0). The coefficients are computed in sigma's
    dtype (at least float32), the network sees x's dtype, D comes back in x's dtype.
    """

    def __init__(self, net: nn.Module, sigma_data: float):
        super().__init__()
        _check_sigma_data(sigma_data)
        self.net = net
        self.sigma_data = float(sigma_data)

    def network_output(self, x: torch.Tensor, sigma: torch.Tensor, cond=None,
                       **net_kwargs) -> tuple[torch.Tensor, Preconditioning]:
        """F(c_in x, c_noise, cond, **net_kwargs) [B, C, H, W] and the coefficients, each [B, 1, 1, 1]."""
        if sigma.shape != (x.shape[0],):
            raise ValueError(f"sigma must hold one noise level per item, shape ({x.shape[0]},), "
                             f"got {tuple(sigma.shape)}.")
        c = edm_preconditioning(_per_item(sigma.to(torch.promote_types(sigma.dtype, torch.float32)), x),
                                self.sigma_data)
        noise_level = c.c_noise.reshape(-1).to(torch.promote_types(x.dtype, torch.float32))  # [B]
        return self.net((c.c_in * x).to(x.dtype), noise_level, cond, **net_kwargs), c

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond=None) -> torch.Tensor:
        """x [B, C, H, W] at noise levels sigma [B] -> D(x, sigma) [B, C, H, W], the x0 estimate."""
        out, c = self.network_output(x, sigma, cond)
        return (c.c_skip * x + c.c_out * out).to(x.dtype)

    def extra_repr(self) -> str:
        return f"sigma_data={self.sigma_data:.4g}"


def measure_sigma_data(latents, chunk: int = 4096) -> float:
    """sigma_data of training data [N, ...] (a tensor or a numpy array, e.g. the memory-mapped
    `LatentCache.latents("train")`): the root mean square sqrt(E[x^2]), summed in float64 over chunks
    of `chunk` items. That is the std for zero-mean data, and it is what the preconditioning's
    derivation uses: F_target's second moment is 1 when E[x0^2] = sd^2, whatever the mean. A latent
    cache's meta.json records the same as train_mean and train_std: sqrt(mean^2 + std^2)."""
    total, count = 0.0, 0
    for start in range(0, len(latents), chunk):
        part = latents[start:start + chunk]
        part = part.double() if torch.is_tensor(part) else torch.from_numpy(np.asarray(part, np.float64))
        total += part.square().sum().item()
        count += part.numel()
    if count == 0 or not math.isfinite(total) or total == 0:
        raise ValueError(f"Cannot measure sigma_data from {count} values with sum of squares {total}: "
                         "the latents are empty, all zero or not finite.")
    return math.sqrt(total / count)


# ----------------------------------------------------------------------------- training
def sample_log_normal_sigmas(n: int, generator: torch.Generator | None = None, *, P_mean: float = -1.2,
                             P_std: float = 1.2) -> torch.Tensor:
    """n training noise levels, ln sigma ~ N(P_mean, P_std^2) (Karras et al., 2022, Sec. 5; drawn
    on the generator's device, like `losses.sample_timesteps`): most training where the loss can
    still be reduced, little at sigmas so small or so large that D is trivial or hopeless.

    How `losses.sample_timesteps` maps to sigma: on the flow path sigma = t / (1 - t), so
    ln sigma = logit t, and logit-normal t with (m, s) and a shift k is exactly this log-normal with
    P_mean = m + ln k, P_std = s (Esser et al.'s (0, 1) centres on sigma = 1, EDM's on 0.30). On
    the cosine schedule sigma = tan(pi t / 2), so uniform t is a half-Cauchy sigma (median 1)."""
    if not 0 <= P_std < math.inf or not math.isfinite(P_mean):
        raise ValueError(f"Need a finite P_mean and 0 <= P_std < inf, got P_mean={P_mean}, P_std={P_std}.")
    device = "cpu" if generator is None else generator.device
    return (P_mean + P_std * torch.randn(n, generator=generator, device=device)).exp()


def edm_loss(precond: EDMPrecond, x0: torch.Tensor, cond=None, generator: torch.Generator | None = None, *,
             P_mean: float = -1.2, P_std: float = 1.2, sigma: torch.Tensor | None = None,
             noise: torch.Tensor | None = None, input_noise: torch.Tensor | None = None,
             net_kwargs: dict | None = None, loss_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The EDM training loss for data x0 [B, ...] (Karras et al., 2022, Sec. 5), in its two forms:
        E[lambda(sigma) |D(x0 + sigma n, sigma) - x0|^2] = E[|F(c_in x, c_noise) - F_target|^2],
    with ln sigma ~ N(P_mean, P_std^2) (or the given `sigma` [B]) and n ~ N(0, I) drawn from
    `generator` (or the given `noise`, e.g. with `losses.offset_noise`). lambda c_out^2 = 1, so it is
    computed in F's space, unweighted, against the stable `edm_target`: no division by c_out -> 0.
    An untrained F = 0 scores 1 (F_target's variance). `input_noise` forms the input
    x = x0 + sigma input_noise in place of n while the target keeps n: input perturbation (Ning et
    al., 2023; `losses.perturb_input`). `net_kwargs` go to the network (e.g. a DiT's `keep`) and
    `loss_mask` restricts the mean to the pixels it marks (`losses.weighted_mse`)."""
    if sigma is None:
        sigma = sample_log_normal_sigmas(x0.shape[0], generator, P_mean=P_mean, P_std=P_std)
    sigma = sigma.to(x0.device)
    noise = _randn(x0, generator) if noise is None else noise
    input_noise = noise if input_noise is None else input_noise
    s = _per_item(sigma, x0)
    out, _ = precond.network_output(x0 + s * input_noise, sigma, cond, **(net_kwargs or {}))
    target = edm_target(x0, noise, s, precond.sigma_data)
    return weighted_mse(out.to(target.dtype), target, mask=loss_mask)

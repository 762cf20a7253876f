"""Samplers over a denoiser callable, in the spirit of k-diffusion: one signature for all,

    sample_x(denoiser, noise, ts, cond=None, callback=None, *, schedule=COSINE, ...) -> x0

where `denoiser(x_t, t, cond) -> x0_hat` with t [B] (`parametrizations.x0_denoiser` makes one of
an eps-, v- or flow-predicting network, `guidance.cfg_denoiser` guides one), `noise` is x at ts[0],
and `ts` is a strictly decreasing grid of noise levels in [0, 1] on `schedule` (`time_grid`,
`Schedule.grid`). The denoiser is never evaluated at t = 0: the step onto t = 0 returns x0_hat.
`callback(i, t, x, x0_hat)` sees every step, e.g. to draw a denoising strip.

Every update is written in x itself, not in k-diffusion's variables z = x / alpha and
s = sigma / alpha (the noise level of x / alpha): those are infinite at SNR 0 (t = 1 on the cosine,
flow and zero-terminal-SNR schedules), where the x form stays finite. Coefficients are computed in
the grid's dtype (`Schedule.grid` gives float64), the state is kept in the noise's dtype.

The step all of them build on is DDIM's (Song, Meng & Ermon, 2021) from t to s < t,
    x_s = alpha_s x0_hat + sigma_s eps_hat,    eps_hat = (x_t - alpha_t x0_hat) / sigma_t.

Samplers in sigma-space (Karras et al., 2022; `SIGMA_SAMPLERS`) have the same signature over a grid
of EDM noise levels instead, x = x0 + sigma n (edm.py):

    sample_edm_x(denoiser, noise, sigmas, cond=None, callback=None, *, S_churn=0, ...) -> x0

where `denoiser(x, sigma, cond) -> x0_hat` with sigma [B] (float64; x in the noise's dtype; an
`edm.EDMPrecond`, or `edm.sigma_denoiser` of a t-space one), `noise` is standard normal and the
sampler scales it to the first level, x = sigmas[0] noise ~ N(0, sigma_0^2 I), as their algorithms
start (so one seed's noise serves every sampler), and `sigmas` is a finite, strictly decreasing
grid (`edm.karras_sigmas`). The state is kept in float64, as EDM's own code keeps it: steps add
small updates to an x of std up to 80. The result comes back in the noise's dtype.
`callback(i, sigma, x, x0_hat)` sees every step's first evaluation, at the level it was made.
"""

from __future__ import annotations

import math
from functools import partial

import torch

from .parametrizations import well_defined
from .schedules import COSINE, FLOW, Schedule


def _check_grid(ts: torch.Tensor):
    if ts.ndim != 1 or len(ts) < 2:
        raise ValueError(f"The grid of noise levels must be 1-D with at least 2 levels, "
                         f"got shape {tuple(ts.shape)}.")
    if not (ts[1:] < ts[:-1]).all():
        raise ValueError("The grid of noise levels must decrease strictly, from noise to data, "
                         "e.g. time_grid(steps).")
    if ts[-1] < 0 or ts[0] > 1:
        raise ValueError(f"Noise levels must lie in [0, 1], got {ts[0].item()} down to {ts[-1].item()}.")


def _evaluate(denoiser, x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
    return denoiser(x, t.expand(x.shape[0]).to(x.device), cond)


@torch.no_grad()
def _integrate(denoiser, noise: torch.Tensor, ts: torch.Tensor, cond, callback, step) -> torch.Tensor:
    """The loop all samplers share: x0_hat = D(x, t), the callback, then `step(x, x0_hat, t, s)` to
    the next level, or x0_hat itself when that level is s = 0."""
    _check_grid(ts)
    x = noise
    for i in range(len(ts) - 1):
        t, s = ts[i], ts[i + 1]
        x0_hat = _evaluate(denoiser, x, t, cond)
        if callback is not None:
            callback(i, t, x, x0_hat)
        x = x0_hat if s == 0 else step(x, x0_hat, t, s)
    return x


def _randn(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """z ~ N(0, I) like x, drawn on the generator's device and moved to x's: a CPU generator drives
    CUDA latents (torch draws with a generator on its own device only), and a seed gives the same
    draws wherever x lives."""
    device = x.device if generator is None else generator.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def _no_signal(alpha, sigma) -> bool:
    """SNR 0 up to rounding, so that s = sigma / alpha is (numerically) infinite: the level where
    x_t says nothing about x0, as for an eps prediction (`parametrizations.well_defined`)."""
    return not well_defined("eps", alpha, sigma)


def _transition_var(alpha_t, sigma_t, alpha_s, sigma_s):
    """sigma_{t|s}^2 = sigma_t^2 - (alpha_t / alpha_s)^2 sigma_s^2, the variance of q(x_t | x_s)."""
    return (sigma_t**2 - (alpha_t / alpha_s) ** 2 * sigma_s**2).clamp(min=0)


def ddim_step(x, x0_hat, t, s, schedule: Schedule, eta: float = 0.0, generator=None) -> torch.Tensor:
    """DDIM (Song et al., 2021, eq. 12) from t to s: with the posterior std of q(x_s | x_t, x0),
        c = eta * sigma_{t|s} sigma_s / sigma_t,
    x_s = alpha_s x0_hat + sqrt(sigma_s^2 - c^2) eps_hat + c z, z ~ N(0, I)."""
    (alpha_t, sigma_t), (alpha_s, sigma_s) = schedule.alpha_sigma(t), schedule.alpha_sigma(s)
    eps_hat = (x - alpha_t * x0_hat) / sigma_t
    c = eta * (_transition_var(alpha_t, sigma_t, alpha_s, sigma_s) * sigma_s**2 / sigma_t**2).sqrt()
    x = alpha_s * x0_hat + (sigma_s**2 - c**2).clamp(min=0).sqrt() * eps_hat
    return x + c * _randn(x, generator) if eta > 0 else x


def ddpm_step(x, x0_hat, t, s, schedule: Schedule, generator=None) -> torch.Tensor:
    """A draw from the posterior q(x_s | x_t, x0 = x0_hat) (Ho et al., 2020, eqs. 6-7, for any
    s < t as in Kingma et al., 2021): with alpha_{t|s} = alpha_t / alpha_s,
        mean = alpha_{t|s} sigma_s^2 / sigma_t^2 x_t + alpha_s sigma_{t|s}^2 / sigma_t^2 x0_hat,
        var = sigma_{t|s}^2 sigma_s^2 / sigma_t^2."""
    (alpha_t, sigma_t), (alpha_s, sigma_s) = schedule.alpha_sigma(t), schedule.alpha_sigma(s)
    var_ts = _transition_var(alpha_t, sigma_t, alpha_s, sigma_s)
    mean = alpha_t / alpha_s * sigma_s**2 / sigma_t**2 * x + alpha_s * var_ts / sigma_t**2 * x0_hat
    return mean + (var_ts * sigma_s**2 / sigma_t**2).sqrt() * _randn(x, generator)


def sample_ddpm(denoiser, noise, ts, cond=None, callback=None, *, schedule: Schedule = COSINE,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Ancestral sampling (Ho et al., 2020): each step draws x_s from q(x_s | x_t, x0_hat). The same
    chain as DDIM with eta = 1, written as the posterior's mean and variance."""
    return _integrate(denoiser, noise, ts, cond, callback,
                      partial(ddpm_step, schedule=schedule, generator=generator))


def sample_ddim(denoiser, noise, ts, cond=None, callback=None, *, schedule: Schedule = COSINE,
                eta: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """DDIM (Song, Meng & Ermon, 2021): deterministic at eta = 0, ancestral DDPM at eta = 1."""
    return _integrate(denoiser, noise, ts, cond, callback,
                      partial(ddim_step, schedule=schedule, eta=eta, generator=generator))


def sample_euler(denoiser, noise, ts, cond=None, callback=None, *,
                 schedule: Schedule = COSINE) -> torch.Tensor:
    """Euler's method on the probability-flow ODE (Song et al., 2021; Karras et al., 2022, Alg. 1
    without the correction). In z = x / alpha, s = sigma / alpha the ODE is dz/ds = (z - D) / s, and
    an Euler step z_s = z_t + (s_s - s_t) (z_t - D) / s_t, times alpha_s, is
        x_s = (sigma_s / sigma_t) x_t + (alpha_s - alpha_t sigma_s / sigma_t) x0_hat,
    the DDIM step with eta = 0 (as Karras et al., 2022 note): it is computed as that."""
    return _integrate(denoiser, noise, ts, cond, callback, partial(ddim_step, schedule=schedule))


def sample_heun(denoiser, noise, ts, cond=None, callback=None, *,
                schedule: Schedule = COSINE) -> torch.Tensor:
    """Heun's method on the probability-flow ODE (Karras et al., 2022, Alg. 1): an Euler step to
    x_e, then the average of the slopes d = (z - D) / s at both ends,
        z_s = z_t + (s_s - s_t) (d_t + d_e) / 2,    d_e = (z_e - D(x_e, s)) / s_s.
    Since d_e - d_t = (D(x_t, t) - D(x_e, s)) / s_s, in x this is
        x_s = x_e + alpha_s (s_t / s_s - 1) (D(x_e, s) - D(x_t, t)) / 2.
    Two evaluations a step, except where that is undefined: onto s = 0 (as in Karras et al.) and
    from SNR 0 (s_t infinite) the step is Euler's. Start from a moderate s_t = sigma / alpha:
    the correction is scaled by s_t / s_s (Karras et al. start at 80). The callback sees each
    step's first evaluation."""
    def step(x, x0_hat, t, s):
        x_euler = ddim_step(x, x0_hat, t, s, schedule)
        (alpha_t, sigma_t), (alpha_s, sigma_s) = schedule.alpha_sigma(t), schedule.alpha_sigma(s)
        if _no_signal(alpha_t, sigma_t):
            return x_euler
        ratio = sigma_t * alpha_s / (alpha_t * sigma_s)  # s_t / s_s > 1
        return x_euler + alpha_s * (ratio - 1) * (_evaluate(denoiser, x_euler, s, cond) - x0_hat) / 2

    return _integrate(denoiser, noise, ts, cond, callback, step)


def sample_dpmpp_2m(denoiser, noise, ts, cond=None, callback=None, *,
                    schedule: Schedule = COSINE) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al., 2022, Alg. 2): a multistep 2nd-order solver in the half log-SNR
    lambda = log(alpha / sigma). With h = lambda_s - lambda_t, the 1st-order update
        x_s = (sigma_s / sigma_t) x_t - alpha_s (e^{-h} - 1) D
    is the DDIM step with x0_hat = D; the 2nd order takes D from the last two estimates,
        D = x0_hat + (x0_hat - x0_prev) / (2 r),    r = h_prev / h.
    The first step is 1st order (no history), as is the last onto t = 0 (x0_hat itself), and so is
    the one after a step from SNR 0, where h_prev is infinite (and lambda, where the SNR is only
    numerically 0, e.g. float32's cos(pi / 2) = -4e-8, would depend on the dtype)."""
    previous = None  # (x0_hat, h) of the step before, if it has a finite h

    def step(x, x0_hat, t, s):
        nonlocal previous
        h = (schedule.log_snr(s) - schedule.log_snr(t)) / 2
        d = x0_hat
        if previous is not None:
            x0_prev, h_prev = previous
            d = x0_hat + h / (2 * h_prev) * (x0_hat - x0_prev)
        previous = None if _no_signal(*schedule.alpha_sigma(t)) else (x0_hat, h)
        return ddim_step(x, d, t, s, schedule)

    return _integrate(denoiser, noise, ts, cond, callback, step)


def sample_flow_euler(denoiser, noise, ts, cond=None, callback=None, *,
                      schedule: Schedule = FLOW) -> torch.Tensor:
    """Euler's method on the rectified-flow ODE dx/dt = u (Liu et al., 2022; Lipman et al., 2022) on
    the flow path x_t = (1 - t) x0 + t eps, where u = eps - x0 and so x_t - x0 = t u:
        u_hat = (x_t - x0_hat) / t,    x_s = x_t + (s - t) u_hat.
    (Algebraically the DDIM step on this path.) Only for `schedules.FLOW`."""
    if schedule.name != "flow":
        raise ValueError(f"The flow Euler sampler integrates the flow path alpha = 1 - t, sigma = t; "
                         f"got the {schedule.name} schedule (use sample_euler there).")

    def step(x, x0_hat, t, s):
        return x + (s - t) * (x - x0_hat) / t

    return _integrate(denoiser, noise, ts, cond, callback, step)


SAMPLERS = {"ddpm": sample_ddpm, "ddim": sample_ddim, "euler": sample_euler, "heun": sample_heun,
            "dpmpp_2m": sample_dpmpp_2m, "flow_euler": sample_flow_euler}


# ----------------------------------------------------------------------------- sigma space
def _check_sigmas(sigmas: torch.Tensor):
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError(f"The grid of noise levels must be 1-D with at least 2 levels, "
                         f"got shape {tuple(sigmas.shape)}.")
    if not torch.isfinite(sigmas).all():
        raise ValueError("Noise levels sigma must be finite: start at a finite sigma_max, e.g. "
                         "edm.karras_sigmas(steps) (80).")
    if not (sigmas[1:] < sigmas[:-1]).all():
        raise ValueError("The grid of noise levels must decrease strictly, from noise to data, "
                         "e.g. edm.karras_sigmas(steps).")
    if sigmas[-1] < 0:
        raise ValueError(f"Noise levels sigma must be >= 0, got {sigmas[-1].item()}.")


def check_churn(S_churn: float, S_tmin: float, S_tmax: float, S_noise: float):
    """Clear errors for churn settings (Karras et al., 2022, Algorithm 2) that `_integrate_sigmas` cannot use."""
    if not S_churn >= 0:
        raise ValueError(f"S_churn must be >= 0 (0: no churn, Algorithm 1), got {S_churn}.")
    if not S_noise > 0:
        raise ValueError(f"S_noise must be positive (1: unit-variance churn noise), got {S_noise}.")
    if not 0 <= S_tmin <= S_tmax:
        raise ValueError(f"Need 0 <= S_tmin <= S_tmax, the range of sigma that is churned, got "
                         f"S_tmin={S_tmin}, S_tmax={S_tmax}.")


def _evaluate_sigma(denoiser, x: torch.Tensor, sigma: torch.Tensor, cond, dtype: torch.dtype) -> torch.Tensor:
    """D(x, sigma) on the float64 state x: the denoiser sees x in `dtype`, sigma [B] in float64."""
    return denoiser(x.to(dtype), sigma.expand(x.shape[0]).to(x.device), cond).to(torch.float64)


@torch.no_grad()
def _integrate_sigmas(denoiser, noise: torch.Tensor, sigmas: torch.Tensor, cond, callback, step, *,
                      S_churn: float, S_tmin: float, S_tmax: float, S_noise: float,
                      generator: torch.Generator | None) -> torch.Tensor:
    """Karras et al. (2022), Algorithm 2, with its step to the next level left to `step(x, x0_hat,
    sigma, sigma_next)`: N = len(sigmas) - 1 steps from x = sigmas[0] noise; each first churns, for
    sigma_i in [S_tmin, S_tmax], with gamma = min(S_churn / N, sqrt(2) - 1),
        sigma_hat = (1 + gamma) sigma_i,    x_hat = x + sqrt(sigma_hat^2 - sigma_i^2) eps,
    eps ~ N(0, S_noise^2 I) (drawn like `noise`, from `generator`, only where gamma > 0), then steps
    from (x_hat, sigma_hat) with x0_hat = D(x_hat, sigma_hat); onto sigma = 0 the step is x0_hat."""
    _check_sigmas(sigmas)
    check_churn(S_churn, S_tmin, S_tmax, S_noise)
    sigmas = sigmas.detach().to("cpu", torch.float64)
    n = len(sigmas) - 1
    gamma_max = min(S_churn / n, math.sqrt(2) - 1)
    x = noise.to(torch.float64) * sigmas[0]  # x_0 ~ N(0, sigma_0^2 I)
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        gamma = gamma_max if S_tmin <= sigma <= S_tmax else 0.0
        sigma_hat = sigma * (1 + gamma)
        if gamma > 0:
            x = x + S_noise * (sigma_hat**2 - sigma**2).sqrt() * _randn(noise, generator)
        x0_hat = _evaluate_sigma(denoiser, x, sigma_hat, cond, noise.dtype)
        if callback is not None:
            callback(i, sigma_hat, x.to(noise.dtype), x0_hat.to(noise.dtype))
        x = x0_hat if sigma_next == 0 else step(x, x0_hat, sigma_hat, sigma_next)
    return x.to(noise.dtype)


def edm_euler_step(x, x0_hat, sigma, sigma_next):
    """Euler's method on the probability-flow ODE in sigma, dx/dsigma = (x - D(x, sigma)) / sigma
    (Karras et al., 2022, Sec. 3 with their sigma(t) = t, s(t) = 1): x + (sigma_next - sigma) d."""
    return x + (sigma_next - sigma) * (x - x0_hat) / sigma


def sample_edm_euler(denoiser, noise, sigmas, cond=None, callback=None, *, S_churn: float = 0.0,
                     S_tmin: float = 0.0, S_tmax: float = math.inf, S_noise: float = 1.0,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Euler steps in sigma (Karras et al., 2022, Algorithm 2 without Heun's correction): one
    evaluation a step, first order. With S_churn = 0 it is deterministic and the same
    as DDIM (eta = 0) on any schedule's matching t grid; with S_churn > 0, churned as
    `_integrate_sigmas` describes."""
    return _integrate_sigmas(denoiser, noise, sigmas, cond, callback, edm_euler_step, S_churn=S_churn,
                             S_tmin=S_tmin, S_tmax=S_tmax, S_noise=S_noise, generator=generator)


def sample_edm_heun(denoiser, noise, sigmas, cond=None, callback=None, *, S_churn: float = 0.0,
                    S_tmin: float = 0.0, S_tmax: float = math.inf, S_noise: float = 1.0,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Heun's method in sigma: Karras et al. (2022), Algorithm 1 at S_churn = 0 (deterministic,
    second order), Algorithm 2 with S_churn > 0 (their ImageNet-64 setting: S_churn = 40,
    S_tmin = 0.05, S_tmax = 50, S_noise = 1.003). From the Euler step x_e at sigma_next, the
    average of the slopes d = (x - D) / sigma at both ends:
        x_next = x_hat + (sigma_next - sigma_hat) (d(x_hat, sigma_hat) + d(x_e, sigma_next)) / 2.
    Two evaluations a step, except the last onto sigma = 0 (d is undefined there): 2N - 1 in all."""
    def step(x, x0_hat, sigma, sigma_next):
        x_euler = edm_euler_step(x, x0_hat, sigma, sigma_next)
        d_next = (x_euler - _evaluate_sigma(denoiser, x_euler, sigma_next, cond, noise.dtype)) / sigma_next
        return x + (sigma_next - sigma) * ((x - x0_hat) / sigma + d_next) / 2

    return _integrate_sigmas(denoiser, noise, sigmas, cond, callback, step, S_churn=S_churn,
                             S_tmin=S_tmin, S_tmax=S_tmax, S_noise=S_noise, generator=generator)


SIGMA_SAMPLERS = {"edm_euler": sample_edm_euler, "edm_heun": sample_edm_heun}


# ----------------------------------------------------------------------------- which samplers step which model
def samplers_for(schedule: Schedule) -> tuple[str, ...]:
    """The samplers that step a model on `schedule`, whatever it predicts: the t-space ones that step
    the schedule, then both sigma-space ones.

    Every t-space update above except flow Euler's is written in the schedule's own (alpha, sigma),
    VP or not (DDIM, DDPM's posterior, the probability-flow ODE in z = x / alpha, lambda =
    log(alpha / sigma)), so they step any schedule, the flow path included; flow Euler's
    u_hat = (x_t - x0_hat) / t is the velocity of the flow path alone. What the network predicts
    does not matter: `parametrizations.x0_denoiser` turns x0, eps, v or flow into x0_hat on any
    schedule (only where an eps prediction starts at SNR 0 must sampling start below t = 1, see
    `pipeline.start_level`), and `edm.time_denoiser` runs an EDM model in t, on the t grid of a sigma
    grid (which starts below SNR 0). The sigma-space samplers step any model in sigma = sigma_t /
    alpha_t: a VP or flow one through `edm.sigma_denoiser`, on a sigma grid no higher than the
    schedule reaches."""
    return (*(name for name in SAMPLERS if name != "flow_euler" or schedule.name == "flow"), *SIGMA_SAMPLERS)


def default_sampler(schedule: Schedule, prediction: str | None = None) -> str:
    """What a model that predicts `prediction` on `schedule` samples with unless told otherwise: an
    EDM model (prediction "edm") with EDM's Heun (Karras et al., 2022, Algorithm 1); any other with
    flow Euler on the flow path (rectified flow's own sampler) and DDIM on every other schedule,
    whatever it predicts (a flow-predicting model on the cosine schedule samples with DDIM; see
    `samplers_for`)."""
    if prediction == "edm":
        return "edm_heun"
    return "flow_euler" if schedule.name == "flow" else "ddim"

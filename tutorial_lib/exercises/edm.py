"""Notebook 05's exercises: EDM's preconditioning on any schedule, a sampler's convergence order
measured against the exact ODE solution of Gaussian data, the reverse SDE by Euler-Maruyama, and a
fixed-decay EMA rebuilt from power-function snapshots."""

from __future__ import annotations

import math

import numpy as np
import torch

from ..diffusion.edm import EDMPrecond, edm_preconditioning, edm_target, karras_sigmas
from ..diffusion.samplers import edm_euler_step, sample_ddpm, sample_edm_euler, sample_edm_heun
from ..diffusion.toy import GaussianMixture
from ..train.ema import fit_power_profiles, power_profile, reconstruct_emas, sigma_rel_to_gamma
from . import exercise_check


def _close(got, want, rtol=1e-5) -> bool:
    got = torch.as_tensor(got, dtype=torch.float64)
    return got.shape == want.shape and torch.allclose(got, want, rtol=rtol, atol=rtol * want.abs().max().item())


@exercise_check(refuses=[edm_preconditioning, edm_target, (EDMPrecond, "forward")])
def check_scaled_preconditioning(answer) -> str | None:
    """answer(alpha, sigma_t, sigma_data) -> (c_skip, c_out, c_in) for x = alpha x0 + sigma_t n: F's input
    c_in x and target (x0 - c_skip x) / c_out of unit variance, c_out as small as possible."""
    t = torch.tensor([0.001, 0.05, 0.3, 0.5, 0.8, 0.99], dtype=torch.float64)
    paths = {"scaled (alpha = 0.5)": (torch.full((6,), 0.5, dtype=torch.float64),
                                      torch.tensor([1e-4, 0.01, 0.1, 0.5, 1.0, 10.0], dtype=torch.float64)),
             "flow": (1 - t, t), "cosine": (torch.cos(math.pi / 2 * t), torch.sin(math.pi / 2 * t)),
             "EDM (alpha = 1)": (torch.ones(6, dtype=torch.float64), torch.tensor([0.002, 0.1, 0.5, 1.0, 10.0, 80.0]).double())}
    for name, (alpha, sigma_t) in paths.items():
        for sd in (0.5, 0.9994, 2.0):
            got = answer(alpha.clone(), sigma_t.clone(), sd)
            if not isinstance(got, (tuple, list)) or len(got) != 3:
                return "return the three coefficients (c_skip, c_out, c_in), one tensor each."
            c_skip, c_out, c_in = (torch.as_tensor(c, dtype=torch.float64) for c in got)
            var_x = alpha**2 * sd**2 + sigma_t**2  # Var[x] for data of std sd
            where = f"on the {name} path with sigma_data = {sd:g}"
            if not _close(c_skip[:1] * alpha[:1], torch.ones(1, dtype=torch.float64), rtol=1e-3):
                return (f"{where}, D(x) = c_skip x + c_out F does not return x0 = x / alpha as sigma_t -> 0: c_skip "
                        "must tend to 1 / alpha (EDM's c_skip with sigma = sigma_t / alpha lacks the factor 1 / alpha).")
            if not _close(c_in**2 * var_x, torch.ones_like(t)):
                return (f"{where}, c_in x does not have unit variance: Var[x] = alpha^2 sigma_data^2 + sigma_t^2, "
                        "so c_in = 1 / sqrt(alpha^2 sigma_data^2 + sigma_t^2) (the data part of x is scaled by alpha).")
            var_target = ((1 - c_skip * alpha) ** 2 * sd**2 + c_skip**2 * sigma_t**2) / c_out**2
            if not _close(var_target, torch.ones_like(t)):
                return (f"{where}, F's target (x0 - c_skip x) / c_out does not have unit variance: c_out^2 must be "
                        "Var[x0 - c_skip x] = (1 - c_skip alpha)^2 sigma_data^2 + c_skip^2 sigma_t^2.")
            want_skip = alpha * sd**2 / var_x  # the c_skip that minimises Var[x0 - c_skip x], so c_out
            if not _close(c_skip, want_skip):
                return (f"{where}, c_out is not as small as it can be: choose c_skip to minimise "
                        "Var[x0 - c_skip x] = (1 - c_skip alpha)^2 sigma_data^2 + c_skip^2 sigma_t^2 (set its "
                        "derivative in c_skip to 0), then c_out^2 is that minimum.")
            if not _close(c_out, sigma_t * sd / var_x.sqrt()):
                return f"{where}, c_out differs from sqrt(Var[x0 - c_skip x]) at the best c_skip."
    return None


def _gaussian_end(noise, sigma_max, sd):
    """The probability-flow ODE's end x(0) for data N(0, sd^2 I) from x(sigma_max) = sigma_max noise: on
    Gaussian data dx/dsigma = x sigma / (sigma^2 + sd^2), so x(sigma) is x(sigma_max) sqrt((sigma^2 + sd^2) /
    (sigma_max^2 + sd^2))."""
    return noise * sigma_max * sd / math.sqrt(sigma_max**2 + sd**2)


def _reference_order(sampler, steps, sd) -> float:
    noise = torch.randn(1000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def denoiser(x, sigma, cond=None):  # E[x0 | x] for x0 ~ N(0, sd^2 I), x = x0 + sigma n
        s = sigma.reshape(-1, *[1] * (x.ndim - 1)).to(x.dtype)
        return x * sd**2 / (s**2 + sd**2)

    errors = []
    for n in steps:
        sigmas = karras_sigmas(n)
        x = sampler(denoiser, noise, sigmas)
        errors.append((x - _gaussian_end(noise, sigmas[0].item(), sd)).norm(dim=1).mean().item())
    return -np.polyfit(np.log(steps), np.log(errors), 1)[0]


def _third_order(denoiser, noise, sigmas, cond=None):
    """A stand-in sampler for data of std 0.5 whose error is 0.3 N^-3 of the exact end (N = len(sigmas) - 1):
    order 3 exactly, whatever the sampler being measured."""
    return _gaussian_end(noise, sigmas[0].item(), 0.5) * (1 + 0.3 * (len(sigmas) - 1) ** -3.0)


@exercise_check(refuses=[(GaussianMixture, "denoiser"), (GaussianMixture, "log_prob")])
def check_convergence_order(answer, my_prediction=None) -> str | None:
    """answer(sampler, steps=(16, 32, 64, 128), sigma_data=0.5) -> the measured order: minus the slope of
    log(mean distance to the exact ODE end) against log(steps), on 1,000 draws of 2-D Gaussian data."""
    cases = [("edm_euler", sample_edm_euler, {}), ("edm_heun", sample_edm_heun, {}),
             ("edm_heun with sigma_data = 1", sample_edm_heun, {"sigma_data": 1.0}),
             ("a stand-in sampler of order exactly 3", _third_order, {"steps": (8, 16, 32)})]
    measured = {}
    for name, sampler, kwargs in cases:
        got = float(answer(sampler, **kwargs))
        want = _reference_order(sampler, kwargs.get("steps", (16, 32, 64, 128)), kwargs.get("sigma_data", 0.5))
        if not math.isfinite(got) or abs(got - want) > 0.01:
            return (f"for {name} you measured order {got:.3f}, the reference {want:.3f}. Check the exact denoiser "
                    "D(x, sigma) = x sigma_data^2 / (sigma^2 + sigma_data^2), the exact end x(0) = x(sigma_max) "
                    "sigma_data / sqrt(sigma_max^2 + sigma_data^2) with x(sigma_max) = sigma_max n, and the sign: the "
                    "order is minus the slope of log(error) against log(steps).")
        measured[name] = got
    if my_prediction:
        for name, value in my_prediction.items():
            if name in measured:
                print(f"{name}: you predicted order {value}, measured {measured[name]:.2f}")
    return None


def _fixed_ema_target(t: int, decay: float, taus: np.ndarray) -> np.ndarray:
    """The weight of theta(tau) in theta_hat(t) for theta_hat(1) = theta(1), theta_hat <- decay theta_hat +
    (1 - decay) theta: decay^(t - 1) at tau = 1, (1 - decay) decay^(t - tau) after."""
    return np.where(taus == 1, decay ** (t - 1), (1 - decay) * decay ** (t - taus))


def _snapshot_profiles(steps, gammas, taus) -> np.ndarray:
    """[taus, snapshots]: (tau^(g+1) - (tau-1)^(g+1)) / t_i^(g+1) up to each snapshot's step t_i, 0 after."""
    cols = [np.where(taus <= t, (taus ** (g + 1) - (taus - 1) ** (g + 1)) / float(t) ** (g + 1), 0.0)
            for t, g in zip(steps, gammas)]
    return np.stack(cols, axis=1)


@exercise_check(refuses=[power_profile, fit_power_profiles, reconstruct_emas])
def check_fixed_ema_from_snapshots(answer) -> str | None:
    """answer(snapshot_steps, snapshot_gammas, t, decay) -> coefficients [snapshots]: the least-squares
    combination of the snapshots' power-function profiles nearest the fixed-decay EMA's profile at step t."""
    cases = [(100, 1000, 0.99), (100, 1000, 0.995), (250, 7000, 0.999), (50, 600, 0.98)]
    for every, t, decay in cases:
        steps = [s for s in range(every, t + 1, every) for _ in (0.05, 0.10)]
        gammas = [sigma_rel_to_gamma(r) for _ in range(every, t + 1, every) for r in (0.05, 0.10)]
        taus = np.arange(1, t + 1, dtype=np.float64)
        profiles = _snapshot_profiles(steps, gammas, taus)
        target = _fixed_ema_target(t, decay, taus)
        want = profiles @ np.linalg.lstsq(profiles, target, rcond=None)[0]
        x = np.asarray(answer(list(steps), list(gammas), t, decay), dtype=np.float64).reshape(-1)
        if x.shape != (len(steps),):
            return f"return one coefficient per snapshot ({len(steps)} here), got shape {x.shape}."
        got = profiles @ x
        if not np.linalg.norm(got - want) <= 1e-6 * np.linalg.norm(target):
            where = f"decay {decay:g} at step {t:,} (snapshots every {every})"
            return (f"{where}: your combination's profile misses the least-squares fit by "
                    f"{np.linalg.norm(got - want) / np.linalg.norm(target):.2g} of the target's norm. Check that the "
                    "target weights the newest step most, (1 - decay) decay^(t - tau) (decay^(t - 1) at tau = 1), and "
                    "that a snapshot taken at step t_i has profile (tau^(gamma+1) - (tau-1)^(gamma+1)) / t_i^(gamma+1) "
                    "for tau <= t_i and 0 after; sum over tau = 1..t.")
    return None


def _reverse_sde_reference(denoiser, noise, sigmas, generator, noise_std=lambda sigma, h: (2 * sigma * h).sqrt()):
    """Euler-Maruyama from sigmas[0] down; each step adds noise of std noise_std(sigma, h), h the step in sigma:
    sqrt(2 sigma h) from the SDE's diffusion sqrt(2 sigma) (another std is a mistake the tests plant)."""
    x = noise * sigmas[0]
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        x0_hat = denoiser(x, sigma.expand(len(x)))
        if sigma_next == 0:
            return x0_hat
        h = sigma - sigma_next
        x = x + 2 * h / sigma * (x0_hat - x) + noise_std(sigma, h) * torch.randn(x.shape, generator=generator, dtype=x.dtype)
    return x


@exercise_check(refuses=[sample_edm_euler, sample_edm_heun, sample_ddpm, edm_euler_step])
def check_reverse_sde(answer) -> str | None:
    """answer(denoiser, noise, sigmas, generator) -> samples at sigma = 0: Euler-Maruyama on the reverse SDE
    dx = -2 sigma score dsigma + sqrt(2 sigma) dw, score = (D - x) / sigma^2, from x = sigmas[0] noise."""
    mixture = GaussianMixture([0.5, 0.3, 0.2], [[-2.0, 0.0], [1.5, 1.5], [1.0, -2.0]], [0.5, 0.3, 0.6])
    for steps, sigma_max, seed in [(8, 80.0, 0), (32, 80.0, 1), (5, 2.0, 2)]:
        noise = torch.randn(256, 2, generator=torch.Generator().manual_seed(100 + seed), dtype=torch.float64)
        sigmas = karras_sigmas(steps, sigma_max=sigma_max)
        want = _reverse_sde_reference(mixture.denoiser, noise, sigmas, torch.Generator().manual_seed(seed))
        got = answer(mixture.denoiser, noise, sigmas, torch.Generator().manual_seed(seed))
        got = torch.as_tensor(got, dtype=torch.float64)
        if got.shape != want.shape:
            return f"return the samples, shape {tuple(want.shape)}, got {tuple(got.shape)}."
        if not torch.allclose(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item()):
            return (f"{steps} steps from sigma_max = {sigma_max:g}: the samples differ from the reference by up to "
                    f"{(got - want).abs().max().item():.2g}. A step from sigma_i to sigma_(i+1), h = sigma_i - sigma_(i+1), "
                    "is x + 2 (h / sigma_i) (D(x, sigma_i) - x) + sqrt(2 sigma_i h) z: the drift is twice the ODE's, the "
                    "noise std is sqrt(2 sigma_i h) (g^2 = d(sigma^2)/dsigma = 2 sigma), one z per step drawn as "
                    "torch.randn(x.shape, generator=generator, dtype=x.dtype) after the denoiser call, and the last step "
                    "onto sigma = 0 returns D(x, sigma_(N-1)) with no noise.")
    return None

"""Notebook 03b's exercises: the marginal field of a smoothed, weighted point set, the reverse SDE by
Euler-Maruyama, and how the Euler ODE's error falls with the number of steps.

The references below are written out on their own (float64), on a Gaussian toy whose fields and
flow map are known in closed form: data N(m, s^2 I) on the path x_t = (1 - t) x0 + t eps has
    x_t ~ N((1 - t) m, v_t I),    v_t = (1 - t)^2 s^2 + t^2,
    u_t(x) = (t - (1 - t) s^2) / v_t (x - (1 - t) m) - m,    score_t(x) = -(x - (1 - t) m) / v_t,
and the ODE carries x_1 to x_0 = m + s x_1 exactly.
"""

from __future__ import annotations

import math

import torch

from ..diffusion.flow_matching import marginal_velocity, posterior_weights, sample_flow_sde
from ..diffusion.samplers import sample_flow_euler
from . import exercise_check

M, S = torch.tensor([1.0, -0.5], dtype=torch.float64), 0.5  # the Gaussian toy's mean and std


def gaussian_velocity(x: torch.Tensor, t) -> torch.Tensor:
    """The toy's exact u_t(x) (module docstring), in x's dtype; t a number or [B]."""
    t = torch.as_tensor(t, dtype=torch.float64).reshape(-1, 1)
    v = (1 - t) ** 2 * S**2 + t**2
    return ((t - (1 - t) * S**2) / v * (x.double() - (1 - t) * M) - M).to(x.dtype)


def _noise(n: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


# ----------------------------------------------------------------------------- 1: a smoothed point set's field
def _reference_field(x, t, data, w, s, variance=None, use_weights=True):
    """u_t(x) for data sum_i w_i N(x_i, s^2 I): component i puts x_t at N((1 - t) x_i, v I), v = (1 - t)^2 s^2 + t^2,
    with E[eps - x0 | x_t, i] = (t - (1 - t) s^2) / v (x - (1 - t) x_i) - x_i; responsibilities from
    w_i N(x; (1 - t) x_i, v I)
    (float64, normalised by the largest term). `variance` overrides v in the responsibilities (a planted bug's)."""
    x, data = x.double(), data.double()
    v = (1 - t) ** 2 * s**2 + t**2
    c = x[:, None, :] - (1 - t) * data[None]  # [B, N, D]
    log_p = -(c**2).sum(-1) / (2 * (v if variance is None else variance)) + (w.double().log() if use_weights else 0)
    p = torch.exp(log_p - log_p.max(1, keepdim=True).values)
    p = p / p.sum(1, keepdim=True)
    u_i = (t - (1 - t) * s**2) / v * c - data[None]  # each component's own field, [B, N, D]
    return (p[..., None] * u_i).sum(1)


@exercise_check(refuses=[marginal_velocity, posterior_weights])
def check_smoothed_marginal_velocity(answer) -> str | None:
    """answer(x [B, 2], t: float, data [N, 2], weights [N], s: float) -> u_t(x) [B, 2], the marginal velocity
    of the data distribution sum_i w_i N(data_i, s^2 I) (weights positive, summing to 1; s >= 0)."""
    g = torch.Generator().manual_seed(3)
    data = torch.randn(7, 2, generator=g) * 1.5
    w = torch.rand(7, generator=g) + 0.05
    w = w / w.sum()
    x = torch.randn(64, 2, generator=g) * 1.5
    for s in (0.0, 0.3, 1.0):
        for t in (0.9, 0.5, 0.2, 0.05):
            want = _reference_field(x, t, data, w, s)
            got = torch.as_tensor(answer(x.clone(), t, data.clone(), w.clone(), s))
            if got.shape != want.shape:
                return f"at t = {t}, s = {s}: expected shape {tuple(want.shape)}, got {tuple(got.shape)}."
            scale = want.abs().max().item()
            close = lambda ref: torch.allclose(got.double(), ref, rtol=1e-4, atol=1e-5 * scale)  # noqa: E731
            if close(want):
                continue
            if close(_reference_field(x, t, data, w, s, use_weights=False)):
                return (f"at t = {t}, s = {s} your field is the unweighted one: the posterior over components is "
                        "proportional to w_i times the Gaussian, so add log w_i to the softmax's logits.")
            if close(_reference_field(x, t, data, w, s, variance=t**2)):
                return (f"at t = {t}, s = {s}: the responsibilities use the variance t^2 of a point mass; "
                        "component i puts x_t at N((1 - t) x_i, v I) with the variance (1 - t)^2 s^2 + t^2.")
            hint = ("each component's field is E[eps - x0 | x_t, i] = (t - (1 - t) s^2) / v (x - (1 - t) x_i) - x_i, "
                    "with v = (1 - t)^2 s^2 + t^2 (at s = 0 it is (x - x_i) / t)")
            error = (got.double() - want).abs().max().item()
            return (f"at t = {t}, s = {s} the field differs (max error {error:.3g}): {hint}; check the centre "
                    "(1 - t) x_i of each Gaussian." if s else
                    f"at t = {t} with s = 0 (the notebook's point set, with weights) the field differs "
                    f"(max error {error:.3g}): {hint}.")
    return None


# ----------------------------------------------------------------------------- 2: the reverse SDE
def _reference_sde(x, ts, g, seed):
    """Euler-Maruyama, float64, the toy's exact velocity and score, noise drawn in float64 by seed."""
    gen = torch.Generator().manual_seed(seed)
    x = x.double()
    for t, s in zip(ts[:-1].tolist(), ts[1:].tolist()):
        h, v = t - s, (1 - t) ** 2 * S**2 + t**2
        u = gaussian_velocity(x, t)
        score = -(x - (1 - t) * M) / v
        gt = float(g(torch.tensor(t, dtype=torch.float64)))
        x = x + h * (-u + gt**2 / 2 * score) + gt * math.sqrt(h) * torch.randn(x.shape, generator=gen, dtype=x.dtype)
    return x


@exercise_check(refuses=[sample_flow_sde])
def check_reverse_sde(answer) -> str | None:
    """answer(velocity, x, ts, g, generator) -> x at ts[-1]: Euler-Maruyama on the reverse SDE,
    velocity(x, t [B]) -> u, g(t) -> the diffusion coefficient, noise z ~ N(0, I) drawn with generator."""
    ts = torch.linspace(1, 0, 101, dtype=torch.float64)
    x1 = _noise(8, 0)
    zero = lambda t: 0 * t  # noqa: E731  g = 0: the Euler ODE, deterministic
    got = torch.as_tensor(answer(gaussian_velocity, x1.clone(), ts, zero, torch.Generator().manual_seed(1)))
    want = _reference_sde(x1, ts, zero, 1)
    if got.shape != want.shape:
        return f"expected shape {tuple(want.shape)}, got {tuple(got.shape)}."
    if not torch.allclose(got.double(), want, rtol=1e-4, atol=1e-4):
        return ("with g = 0 the SDE is the ODE, x_s = x_t - h u_t(x_t) for h = t - s > 0 (time runs down from 1 to "
                f"0), but your end points differ by up to {(got.double() - want).abs().max().item():.3g}.")
    n = 4000
    for name, g in (("g(t) = sqrt(2 t)", lambda t: (2 * t).sqrt()), ("g(t) = 1", lambda t: 0 * t + 1)):
        x = answer(gaussian_velocity, _noise(n, 2), ts, g, torch.Generator().manual_seed(5))
        x = torch.as_tensor(x).double()
        mean, std = x.mean(0), x.std(0)
        ref = _reference_sde(_noise(n, 2), ts, g, 5)
        ref_mean, ref_std = ref.mean(0), ref.std(0)  # the same scheme's answer: within its own noise of (m, s)
        tol_mean, tol_std = 4 * S / math.sqrt(n) + 0.02, 4 * S / math.sqrt(2 * n) + 0.02
        bad_mean, bad_std = (mean - M).abs().max().item() > tol_mean, (std - S).abs().max().item() > tol_std
        if bad_mean or bad_std:
            return (f"with {name} your samples have mean {mean.numpy().round(3)} and std {std.numpy().round(3)}; "
                    f"the data's are {M.numpy()} and {S} (the reference scheme gets mean {ref_mean.numpy().round(3)}, "
                    f"std {ref_std.numpy().round(3)}). "
                    + ("Too narrow: the noise of one step is g(t) sqrt(h) z (sqrt(dt), not dt)." if (std < S).all() else
                       "Too wide or off-centre: the drift is -u + g^2 / 2 * score going down in time; check the sign "
                       "of the score term and that score = -(x + (1 - t) u) / t."))
    return None


# ----------------------------------------------------------------------------- 3: Euler's error
def _reference_euler_error(velocity, x1, x0_exact, steps):
    ts = torch.linspace(1, 0, steps + 1, dtype=torch.float64).tolist()
    x = x1.double()
    for t, s in zip(ts[:-1], ts[1:]):
        x = x + (s - t) * velocity(x, t)
    return (x - x0_exact.double()).norm(dim=-1).mean().item()


@exercise_check(refuses=[sample_flow_euler])
def check_euler_error(answer, prediction=None) -> str | None:
    """answer(velocity, x1 [B, 2], x0_exact [B, 2], steps) -> the mean distance |x_0 - x0_exact| of Euler's
    end points over `steps` equal steps from t = 1 to 0. Prints the measured error ratio next to the
    prediction for error(10 steps) / error(100 steps)."""
    x1 = _noise(500, 7)
    x0_exact = (M + S * x1.double()).float()  # the exact flow map of the toy
    got = {}
    for steps in (1, 3, 10, 30, 100):
        want = _reference_euler_error(gaussian_velocity, x1, x0_exact, steps)
        got[steps] = float(answer(gaussian_velocity, x1.clone(), x0_exact.clone(), steps))
        if not math.isclose(got[steps], want, rel_tol=1e-3, abs_tol=1e-6):
            return (f"with {steps} steps you measure {got[steps]:.4g}, the reference {want:.4g}. Take `steps` equal "
                    "steps h = 1 / steps from t = 1 to 0 and evaluate the velocity at the start of each step, "
                    "x <- x - h u_t(x); report the mean Euclidean distance (the norm over the 2 coordinates, then "
                    "the mean over points).")
    print(f"error(10 steps) / error(100 steps): your prediction {prediction}, measured {got[10] / got[100]:.2f}")
    return None

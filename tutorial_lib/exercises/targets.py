"""Notebook 04's exercises: a flow model read on the cosine schedule, the zero-terminal-SNR rescale,
and min-SNR weights for every target (with a prediction)."""

from __future__ import annotations

import math

import torch

from ..diffusion.losses import min_snr_weight
from ..diffusion.parametrizations import convert, prediction_target
from ..diffusion.schedules import rescale_zero_terminal_snr
from . import exercise_check


def _close(got, want, rtol=1e-5) -> bool:
    """float32-friendly: within rtol of the reference's scale."""
    got = torch.as_tensor(got).double()
    return got.shape == want.shape and bool(((got - want).abs() <= rtol * (1 + want.abs())).all())


@exercise_check(refuses=[convert, prediction_target])
def check_flow_to_vp(answer) -> str | None:
    """answer(u [B, ...], x_t [B, ...], t [B, 1, ...]) -> (x_s, v, s): the flow path's point x_t and velocity
    u read on the cosine schedule at the level s of the same SNR: x_s = cos(pi s / 2) x0 + sin(pi s / 2) eps
    and v = cos(pi s / 2) eps - sin(pi s / 2) x0."""
    g = torch.Generator().manual_seed(0)
    for shape in [(6, 1), (4, 4, 8, 8)]:
        x0, eps = torch.randn(2, *shape, generator=g, dtype=torch.float64)
        t = torch.rand(shape[0], *[1] * (len(shape) - 1), generator=g, dtype=torch.float64) * 0.96 + 0.02
        x_t, u = (1 - t) * x0 + t * eps, eps - x0
        s = (2 / math.pi) * torch.atan(t / (1 - t))  # tan(pi s / 2) = sigma / alpha, the same on both paths
        a, b = torch.cos(math.pi * s / 2), torch.sin(math.pi * s / 2)
        want = (s, a * x0 + b * eps, a * eps - b * x0)
        out = answer(u.float(), x_t.float(), t.float())
        if not isinstance(out, (tuple, list)) or len(out) != 3:
            return "return three things: (x_s, v, s)."
        x_s, v, s_got = out
        if torch.as_tensor(s_got).shape != t.shape:
            return f"s has shape {tuple(torch.as_tensor(s_got).shape)}: give it t's shape, {tuple(t.shape)}."
        if not _close(s_got, want[0]):
            if _close(s_got, t):
                return ("s = t is the same time, not the same SNR: on the flow path SNR = ((1 - t) / t)², on the "
                        "cosine schedule cot²(pi s / 2), so tan(pi s / 2) = t / (1 - t).")
            return "s is not the level of the same SNR: solve tan(pi s / 2) = t / (1 - t) for s."
        if not _close(x_s, want[1]):
            if _close(x_s, x_t):
                return ("x_s = x_t keeps the flow path's scale, (1 - t)² + t² < 1 in variance: divide x_t by "
                        "sqrt((1 - t)² + t²) to land on the variance-preserving path.")
            return "x_s differs: x_t / sqrt((1 - t)² + t²) has coefficients cos(pi s / 2), sin(pi s / 2)."
        if not _close(v, want[2]):
            return ("v differs: recover x0 = x_t - t u and eps = x_t + (1 - t) u first, then "
                    "v = cos(pi s / 2) eps - sin(pi s / 2) x0.")
    return None


def _lin_algorithm_1(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. (2023), Algorithm 1, as printed there (on betas), returning alpha_bar [N]."""
    alphas_bar_sqrt = torch.cumprod(1 - betas, 0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt -= last
    alphas_bar_sqrt *= first / (first - last)
    return alphas_bar_sqrt**2


@exercise_check(refuses=[rescale_zero_terminal_snr])
def check_zero_terminal_snr(answer) -> str | None:
    """answer(alpha_bar [N], decreasing, the trained levels k = 1..N) -> alpha_bar rescaled so that the last
    level has SNR exactly 0 and the first keeps its SNR."""
    tables = {"linear": torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64),
              "scaled-linear": torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2,
              "linear, 50 steps": torch.linspace(1e-3, 0.2, 50, dtype=torch.float64),
              "random, 20 steps": torch.rand(20, generator=torch.Generator().manual_seed(0), dtype=torch.float64).sort().values * 0.3}
    for name, betas in tables.items():
        alpha_bar = torch.cumprod(1 - betas, 0)
        want = _lin_algorithm_1(betas)
        got = torch.as_tensor(answer(alpha_bar.clone())).double()
        if got.shape != want.shape:
            return f"{name}: expected shape {tuple(want.shape)}, got {tuple(got.shape)}."
        if abs(got[-1].item()) > 1e-7:
            return f"{name}: the last alpha_bar is {got[-1].item():.2e}, not 0: shift so that the last sqrt(alpha_bar) is 0."
        if not _close(got[0], want[0]):
            return (f"{name}: the first level's alpha_bar moved ({alpha_bar[0].item():.6f} -> {got[0].item():.6f}): "
                    "scale after the shift so that the first sqrt(alpha_bar) is unchanged.")
        if not _close(got, want):
            return (f"{name}: the ends are right, the levels between are not: shift and scale sqrt(alpha_bar) "
                    "(the signal's amplitude), not alpha_bar itself, then square.")
    return None


def _weight_reference(target: str, alpha: torch.Tensor, sigma: torch.Tensor, gamma: float) -> torch.Tensor:
    """min(SNR, gamma) divided by what the target's plain loss weighs an x0 error by, from the gain of
    section 2: an output error delta moves x0_hat by sigma delta / det, det = alpha b - sigma a."""
    a, b = {"x0": (1.0, 0.0), "eps": (0.0, 1.0), "v": (-sigma, alpha), "flow": (-1.0, 1.0)}[target]
    det = alpha * b - sigma * a
    k = det**2 / sigma**2  # |d target|² per |d x0|²
    return (alpha**2 / sigma**2).clamp(max=gamma) / k


@exercise_check(refuses=[min_snr_weight])
def check_min_snr_weights(answer, prediction=None) -> str | None:
    """answer(target, alpha, sigma, gamma) -> the min-SNR-gamma loss weight [T] of a target ("x0", "eps", "v"
    on the cosine schedule, "flow" on the flow path) for levels strictly between 0 and 1. `prediction`:
    the learner's guess for the v weight at t = 0.25 on the cosine schedule, gamma = 5."""
    t = torch.linspace(0.02, 0.98, 49, dtype=torch.float64)
    cosine = (torch.cos(math.pi * t / 2), torch.sin(math.pi * t / 2))
    hints = {"x0": "an x0 error is its own: the weight is min(SNR, gamma).",
             "eps": "an eps error d moves x0_hat by sigma d / alpha, so plain eps-MSE weighs x0 errors by SNR: "
                    "divide min(SNR, gamma) by SNR.",
             "v": "v's plain loss weighs x0 errors by SNR + 1 on a variance-preserving schedule (section 3), "
                  "not by SNR: divide min(SNR, gamma) by SNR + 1.",
             "flow": "on the flow path x0_hat = x_t - t u, so plain u-MSE weighs x0 errors by 1 / t² = (1 + sqrt(SNR))²."}
    for gamma in (1.0, 5.0):
        for target in ("x0", "eps", "v", "flow"):
            alpha, sigma = (1 - t, t) if target == "flow" else cosine
            want = _weight_reference(target, alpha, sigma, gamma)
            got = answer(target, alpha.float(), sigma.float(), gamma)
            if not _close(got, want):
                return f"{target}, gamma {gamma:g}: the weights differ. {hints[target]}"
    quarter = torch.tensor([0.25], dtype=torch.float64)
    measured = float(torch.as_tensor(answer("v", torch.cos(math.pi * quarter / 2), torch.sin(math.pi * quarter / 2), 5.0)).item())
    print(f"v at t = 0.25, cosine schedule, gamma 5: your prediction {'(none given)' if prediction is None else prediction}, "
          f"your function {measured:.3f} (SNR there: {1 / math.tan(math.pi / 8) ** 2:.2f}).")
    return None

"""Notebook 04's exercises: flow velocity -> epsilon, and min-SNR weights for v."""

from __future__ import annotations

import torch

from ..diffusion.losses import min_snr_weight
from ..diffusion.parametrizations import convert
from ..diffusion.schedules import COSINE, FLOW
from . import exercise_check


@exercise_check(refuses=[])
def check_flow_to_eps(answer) -> str | None:
    """answer(u, x_t, t) -> eps, on the flow path x_t = (1 - t) x0 + t eps, u = eps - x0."""
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 4, 8, 8, generator=g, dtype=torch.float64)
    t = torch.rand(4, 1, 1, 1, generator=g, dtype=torch.float64) * 0.98 + 0.01
    x_t, u = (1 - t) * x0 + t * eps, eps - x0
    got = torch.as_tensor(answer(u, x_t, t))
    want = convert(u, "flow", "eps", x_t, *FLOW.alpha_sigma(t))
    if not torch.allclose(got, eps, atol=1e-9) or not torch.allclose(got, want, atol=1e-9):
        return "eps is not recovered: write x_t in terms of eps and u (x0 = eps - u) and solve for eps."
    return None


@exercise_check(refuses=[])
def check_min_snr_v(answer) -> str | None:
    """answer(alpha, sigma, gamma) -> the min-SNR-gamma weight of a v-prediction loss on a VP schedule."""
    t = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    alpha, sigma = COSINE.alpha_sigma(t)
    for gamma in (1.0, 5.0):
        want = min_snr_weight(alpha, sigma, "v", gamma)
        got = torch.as_tensor(answer(alpha, sigma, gamma))
        if not torch.allclose(got, want, atol=1e-9):
            return f"gamma {gamma}: the weights differ; v's plain loss weighs x0 errors by SNR + 1, min-SNR wants min(SNR, gamma)."
    return None

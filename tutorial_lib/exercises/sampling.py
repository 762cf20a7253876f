"""Notebook 01's exercises: a DDIM step and classifier-free guidance."""

from __future__ import annotations

import torch

from ..diffusion.samplers import ddim_step
from ..diffusion.schedules import COSINE
from . import exercise_check


@exercise_check(refuses=[])
def check_ddim_step(answer) -> str | None:
    """answer(x_t, x0_hat, alpha_t, sigma_t, alpha_s, sigma_s) -> x_s, deterministic DDIM (eta = 0)."""
    g = torch.Generator().manual_seed(0)
    x, x0_hat = torch.randn(2, 4, 4, 8, 8, generator=g, dtype=torch.float64)
    for t, s in [(0.9, 0.6), (0.5, 0.1), (0.2, 0.0)]:
        want = ddim_step(x, x0_hat, torch.tensor(t, dtype=torch.float64), torch.tensor(s, dtype=torch.float64), COSINE)
        (a_t, s_t), (a_s, s_s) = (COSINE.alpha_sigma(torch.tensor(v, dtype=torch.float64)) for v in (t, s))
        got = torch.as_tensor(answer(x, x0_hat, a_t, s_t, a_s, s_s))
        if not torch.allclose(got, want, atol=1e-9):
            return (f"from t = {t} to s = {s} the step differs by {(got - want).abs().max().item():.2g}: "
                    "eps_hat = (x_t - alpha_t x0_hat) / sigma_t, then x_s = alpha_s x0_hat + sigma_s eps_hat.")
    return None


@exercise_check(refuses=[])
def check_guidance(answer) -> str | None:
    """answer(conditional, unconditional, w) -> the guided prediction."""
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(2, 3, 4, 8, 8, generator=g)
    for w in (0.0, 1.0, 3.0, 7.5):
        want = uncond + w * (cond - uncond)
        got = torch.as_tensor(answer(cond, uncond, w))
        if not torch.allclose(got, want, atol=1e-5):
            return f"at w = {w} the result differs: w = 0 must give the unconditional prediction, w = 1 the conditional."
    return None

"""What the network predicts, x0, eps, v or the flow velocity, and how to convert between them.

Each parametrization is a linear combination of the data and the noise in x_t = alpha x0 + sigma eps,
    prediction = a * x0 + b * eps,    (a, b) depending on the noise level only:

    x0     (1, 0)            the data: a denoiser D(x_t, t) (Karras et al., 2022), notebook 01's model
    eps    (0, 1)            the noise (Ho et al., 2020)
    v      (-sigma, alpha)   v = alpha eps - sigma x0 (Salimans & Ho, 2022): on a VP schedule with
                             alpha = cos(phi), sigma = sin(phi), v = d x_t / d phi
    flow   (-1, 1)           u = eps - x0, the rectified-flow velocity (Liu et al., 2022; Lipman et
                             al., 2022): u = d x_t / dt on the flow path alpha = 1 - t, sigma = t

Conversion. With x_t known, a prediction gives two linear equations for the two unknowns:
    [alpha  sigma] [x0 ]   [x_t ]
    [  a      b  ] [eps] = [pred],     det = alpha b - sigma a,
so  x0 = (b x_t - sigma pred) / det,  eps = (alpha pred - a x_t) / det,  and any other target is
a' x0 + b' eps. Worked out:
    eps -> x0:   x0 = (x_t - sigma eps) / alpha
    x0 -> eps:   eps = (x_t - alpha x0) / sigma
    v -> x0:     x0 = (alpha x_t - sigma v) / (alpha^2 + sigma^2)    = alpha x_t - sigma v on VP
    v -> eps:    eps = (sigma x_t + alpha v) / (alpha^2 + sigma^2)   = sigma x_t + alpha v on VP
    flow -> x0:  x0 = (x_t - sigma u) / (alpha + sigma)              = x_t - t u on the flow path
    flow -> eps: eps = (x_t + alpha u) / (alpha + sigma)             = x_t + (1 - t) u there

Where it is defined: only where det != 0, so converting *from*
    x0   (det = -sigma) fails at sigma = 0 (t = 0): there x_t = x0 says nothing about eps;
    eps  (det = alpha)  fails at alpha = 0 (SNR 0: t = 1 on cosine, flow, zero-terminal-SNR
                        schedules): there x_t = eps says nothing about x0;
    v    (det = alpha^2 + sigma^2) and flow (det = alpha + sigma) never fail.
Those two cases raise (also where det is 0 up to rounding, as cos(pi / 2) in floating point).
Converting *to* any target is always defined once (x0, eps) are known.
"""

from __future__ import annotations

import torch

PREDICTIONS = ("x0", "eps", "v", "flow")
_UNDEFINED = {"x0": "an x0 prediction at sigma = 0 (t = 0) does not determine eps",
              "eps": "an eps prediction at alpha = 0 (SNR 0) does not determine x0"}


def coefficients(kind: str, alpha, sigma):
    """(a, b) such that the `kind` prediction is a x0 + b eps."""
    if kind == "x0":
        return 1.0, 0.0
    if kind == "eps":
        return 0.0, 1.0
    if kind == "v":
        return -sigma, alpha
    if kind == "flow":
        return -1.0, 1.0
    raise ValueError(f"Unknown prediction {kind!r}; choose from {', '.join(PREDICTIONS)}.")


def prediction_target(kind: str, x0: torch.Tensor, eps: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """What a `kind` network should output for data x0 and noise eps: a x0 + b eps."""
    a, b = coefficients(kind, alpha, sigma)
    return a * x0 + b * eps


def well_defined(kind: str, alpha, sigma) -> bool:
    """Whether a `kind` prediction determines (x0, eps) at every level given: det != 0 beyond
    rounding, |det| > eps_dtype (|alpha| + |sigma|)(|a| + |b|), so that float32's cos(pi / 2) =
    -4e-8, float64's 6e-17, count as the SNR 0 they stand for."""
    alpha, sigma = torch.as_tensor(alpha), torch.as_tensor(sigma)
    a, b = coefficients(kind, alpha, sigma)
    det = alpha * b - sigma * a
    dtype = det.dtype if det.is_floating_point() else torch.get_default_dtype()
    scale = (alpha.abs() + sigma.abs()) * (torch.as_tensor(a).abs() + torch.as_tensor(b).abs())
    return bool((det.abs() > torch.finfo(dtype).eps * scale).all())


def to_x0_eps(pred: torch.Tensor, kind: str, x_t: torch.Tensor, alpha,
              sigma) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) from a `kind` prediction at x_t: the 2 x 2 solve in the module docstring."""
    a, b = coefficients(kind, alpha, sigma)
    det = alpha * b - sigma * a
    if not well_defined(kind, alpha, sigma):
        raise ValueError(f"Cannot convert from {kind}: {_UNDEFINED[kind]}.")
    return (b * x_t - sigma * pred) / det, (alpha * pred - a * x_t) / det


def convert(pred: torch.Tensor, source: str, target: str, x_t: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """A `source` prediction at x_t as a `target` one; alpha, sigma broadcast over x_t."""
    coefficients(target, alpha, sigma)  # a clear error for an unknown target, before any work
    if source == target:
        return pred
    x0, eps = to_x0_eps(pred, source, x_t, alpha, sigma)
    return prediction_target(target, x0, eps, alpha, sigma)


def x0_denoiser(model, kind: str, schedule):
    """The samplers' denoiser D(x_t, t, cond) -> x0_hat from a network `model(x_t, t, cond)` that
    predicts `kind` on `schedule` (t [B], one level per item)."""
    coefficients(kind, 1.0, 0.0)
    if kind == "x0":
        return model

    def denoiser(x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        alpha, sigma = schedule.alpha_sigma_like(t, x)  # in t's dtype (float64 on a sampler's grid)
        return convert(model(x, t, cond), kind, "x0", x, alpha, sigma).to(x.dtype)

    return denoiser

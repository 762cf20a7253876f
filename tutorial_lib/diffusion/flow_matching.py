"""Flow matching on the linear path, with the exact fields of a finite data set (notebook 03b).

The path is the library's flow schedule (`schedules.FLOW`, the `flow` target of parametrizations.py):
t = 0 is the data, t = 1 the noise,
    x_t = (1 - t) x0 + t eps,    eps ~ N(0, I).
(MIT 6.S184's notes and Lipman et al. run time the other way, t = 0 noise; swap t -> 1 - t.)

Conditional velocity, one data point x0: d x_t / dt = eps - x0, and eps = (x_t - (1 - t) x0) / t, so
    u_t(x | x0) = (x - x0) / t.
Marginal velocity, the field that moves the whole distribution p_t (Lipman et al., 2022, Thm 1):
    u_t(x) = E[u_t(x | x0) | x_t = x] = (x - E[x0 | x_t = x]) / t.
For data {x_i} with weights w_i, x_t | x0 = x_i ~ N((1 - t) x_i, t^2 I), and the posterior is a softmax:
    p(x0 = x_i | x_t = x) = softmax_i(log w_i - |x - (1 - t) x_i|^2 / (2 t^2)).
Score (Tweedie): grad log p_t(x) = -E[eps | x_t = x] / t, and E[eps | x_t] = x + (1 - t) u_t(x)
(parametrizations.py's flow -> eps), so the score follows from the velocity:
    s_t(x) = -(x + (1 - t) u_t(x)) / t.
Flow matching: E |f(x_t, t) - (eps - x0)|^2 = E |f(x_t, t) - u_t(x_t)|^2 + E Var[eps - x0 | x_t], and
the last term does not depend on f, so regressing the conditional target learns the marginal field.
Reverse SDE: for any g(t) >= 0, the SDE run from t = 1 down to 0 (tau = 1 - t forward),
    dx = [-u_t(x) + g(t)^2 / 2 s_t(x)] dtau + g(t) dW,
has the marginals p_t of the ODE dx/dt = u_t (g = 0): the "SDE extension trick" of the MIT 6.S184 notes
(Holderrieth & Erives, 2025), stated there with time running from noise to data (their u is our -u).
"""

from __future__ import annotations

import torch


def posterior_weights(x: torch.Tensor, t, data: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """p(x0 = data_i | x_t = x) [B, N] for points x [B, D] at level t in (0, 1] (a number or [B]),
    data [N, D] with weights [N] (uniform if None); computed in float64."""
    x, data = x.double(), data.double()
    t = torch.as_tensor(t, dtype=torch.float64).reshape(-1, 1)  # [B or 1, 1]
    logits = -((x[:, None] - (1 - t[..., None]) * data) ** 2).sum(-1) / (2 * t**2)  # [B, N]
    if weights is not None:
        logits = logits + torch.as_tensor(weights, dtype=torch.float64).log()
    return logits.softmax(-1)


def marginal_velocity(x: torch.Tensor, t, data: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The exact u_t(x) = (x - E[x0 | x_t = x]) / t [B, D] of the data set, in x's dtype."""
    x0_mean = posterior_weights(x, t, data, weights) @ data.double()  # E[x0 | x_t = x], [B, D]
    t = torch.as_tensor(t, dtype=torch.float64).reshape(-1, 1)
    return ((x.double() - x0_mean) / t).to(x.dtype)


def score_from_velocity(u: torch.Tensor, x: torch.Tensor, t) -> torch.Tensor:
    """grad log p_t(x) = -(x + (1 - t) u) / t from the velocity u at x (t a number or [B])."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(-1, *([1] * (x.ndim - 1)))
    return -(x + (1 - t) * u) / t


def default_diffusion(t: torch.Tensor) -> torch.Tensor:
    """g(t) = sqrt(2 t): then g^2 / 2 s_t = -E[eps | x_t], finite down to t = 0, and no noise is
    added at the data end."""
    return (2 * t).sqrt()


@torch.no_grad()
def sample_flow_sde(velocity, noise: torch.Tensor, ts: torch.Tensor, g=default_diffusion,
                    generator: torch.Generator | None = None, callback=None) -> torch.Tensor:
    """Euler-Maruyama on the reverse SDE above, from x = noise at ts[0] down the strictly decreasing
    grid ts (e.g. `schedules.time_grid`), velocity(x, t [B]) -> u [B, D]; each step t -> s, h = t - s:
        x_s = x_t + h (-u + g(t)^2 / 2 s_t(x_t)) + g(t) sqrt(h) z,    z ~ N(0, I) (drawn with `generator`).
    g = lambda t: 0 * t gives the Euler ODE step. callback(i, t, x) sees the state before each step."""
    if ts.ndim != 1 or len(ts) < 2 or not (ts[1:] < ts[:-1]).all() or ts[-1] < 0 or ts[0] > 1:
        raise ValueError("ts must be a strictly decreasing grid in [0, 1] with at least 2 levels.")
    x = noise
    for i in range(len(ts) - 1):
        t, h = ts[i], ts[i] - ts[i + 1]
        if callback is not None:
            callback(i, t, x)
        u = velocity(x, t.expand(x.shape[0]).to(x))
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        x = x + h * (-u + g(t) ** 2 / 2 * score_from_velocity(u, x, t)) + g(t) * h.sqrt() * z
    return x

"""A non-Gaussian target whose ideal denoiser is known exactly: a Gaussian mixture.

    p(x0) = sum_k w_k N(x0; mu_k, diag(s_k^2))    in D dimensions.

Noised to level sigma (x = x0 + sigma n, edm.py), each component stays Gaussian,
N(mu_k, diag(s_k^2 + sigma^2)), so the marginal p_sigma is again a mixture, and the ideal denoiser
is the posterior mean E[x0 | x] (the minimiser of Karras et al.'s denoising loss, Sec. 2), a
responsibility-weighted mix of the components' own posterior means:
    D(x, sigma) = E[x0 | x] = sum_k r_k(x) (mu_k + s_k^2 / (s_k^2 + sigma^2) (x - mu_k)),
    r_k(x) = w_k N(x; mu_k, s_k^2 + sigma^2) / p_sigma(x).
Fed to any sampler, it isolates the sampler's own error from a network's (tests/test_edm.py), and
its densities can be plotted at every sigma.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class GaussianMixture:
    """Weights [K] (normalised to sum 1), means [K, D] and per-dimension stds [K, D] (or [K], one
    per component), all stored in float64."""
    weights: torch.Tensor
    means: torch.Tensor
    stds: torch.Tensor

    def __post_init__(self):
        weights, means, stds = (torch.as_tensor(v, dtype=torch.float64)
                                for v in (self.weights, self.means, self.stds))
        if weights.ndim != 1 or means.ndim != 2 or len(means) != len(weights):
            raise ValueError(f"Need weights [K] and means [K, D], got {tuple(weights.shape)} and "
                             f"{tuple(means.shape)}.")
        stds = stds[:, None] if stds.ndim == 1 else stds
        if stds.ndim != 2 or stds.shape[0] != len(weights) or stds.shape[1] not in (1, means.shape[1]):
            raise ValueError(f"Need stds [K] or [K, D] for K = {len(weights)}, got {tuple(stds.shape)}.")
        if not ((weights > 0).all() and (stds > 0).all() and torch.isfinite(means).all()):
            raise ValueError("Mixture weights and stds must be positive, and means finite.")
        object.__setattr__(self, "weights", weights / weights.sum())
        object.__setattr__(self, "means", means)
        object.__setattr__(self, "stds", stds.expand_as(means).clone())

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n draws x0 [n, D] (float64)."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        return self.means[k] + self.stds[k] * torch.randn(n, self.means.shape[1], generator=generator,
                                                           dtype=torch.float64)

    def _components(self, x: torch.Tensor, sigma) -> tuple[torch.Tensor, torch.Tensor]:
        """log w_k N(x; mu_k, s_k^2 + sigma^2) [B, K] and the noised variances [B or 1, K, D]."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1, 1, 1)  # [B or 1, 1, 1]
        var = self.stds**2 + sigma**2  # [B or 1, K, D]
        diff = x.double()[:, None] - self.means  # [B, K, D]
        log_normal = -0.5 * (diff**2 / var + var.log() + math.log(2 * math.pi)).sum(-1)  # [B, K]
        return self.weights.log() + log_normal, var

    def log_prob(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """log p_sigma(x) [B] of points x [B, D] at noise level sigma (a number or [B])."""
        return self._components(x, sigma)[0].logsumexp(-1)

    def denoiser(self, x: torch.Tensor, sigma, cond=None) -> torch.Tensor:
        """The exact D(x, sigma) = E[x0 | x] [B, D] (module docstring), in x's dtype; sigma = 0
        gives x itself."""
        log_joint, var = self._components(x, sigma)
        r = log_joint.softmax(-1)[..., None]  # [B, K, 1]
        posterior_means = self.means + self.stds**2 / var * (x.double()[:, None] - self.means)  # [B, K, D]
        return (r * posterior_means).sum(1).to(x.dtype)

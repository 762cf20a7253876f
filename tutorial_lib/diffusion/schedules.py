"""Noise schedules over a continuous noise level t in [0, 1].

The forward process (Ho et al., 2020; Song et al., 2021) mixes data and noise:
    x_t = alpha(t) * x0 + sigma(t) * eps,    eps ~ N(0, I),
with t = 0 the data (alpha = 1, sigma = 0). How much signal is left is the signal-to-noise ratio
    SNR(t) = alpha^2 / sigma^2,    log-SNR lambda(t) = log SNR(t)    (Kingma et al., 2021),
infinite at t = 0 and decreasing in t. A schedule is just the pair (alpha(t), sigma(t)):

    cosine          alpha = cos(pi t / 2), sigma = sin(pi t / 2)  (Nichol & Dhariwal, 2021, without
                    their offset); variance-preserving (VP): alpha^2 + sigma^2 = 1, SNR(1) = 0.
    flow            alpha = 1 - t, sigma = t: the straight path of rectified flow (Liu et al., 2022)
                    and flow matching (Lipman et al., 2022); not VP, SNR(1) = 0.
    linear          DDPM's discrete betas, 1e-4 to 0.02 over 1000 steps (Ho et al., 2020).
    scaled_linear   Stable Diffusion's: sqrt(beta) linear from sqrt(0.00085) to sqrt(0.012).

A discrete (beta) schedule has alpha_bar_k = prod_{i <= k} (1 - beta_i) = alpha^2 at its trained
levels t = k / N, k = 1..N, and alpha_bar = 1 at t = 0; in between alpha_bar is linear in t, so any
t in [0, 1] works for training and sampling. diffusers' timestep n is our t = (n + 1) / N. Beta
schedules keep SNR(1) > 0 (a little signal leaks into "pure noise"); the zero-terminal-SNR rescale
(Lin et al., 2023) fixes that.

`get_schedule(name)` gives a `Schedule`: alpha_sigma(t), snr, log_snr, add_noise and a sampling
grid. The cosine functions at the top (`cosine_alpha_sigma`, `add_noise`) are notebook 01's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache, partial
from typing import Callable

import torch


def cosine_alpha_sigma(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cos(0.5 * math.pi * t), torch.sin(0.5 * math.pi * t)


def add_noise(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = alpha(t) x0 + sigma(t) eps on the cosine schedule, with t [B] broadcast over the rest."""
    return COSINE.add_noise(x0, t, noise)


def sample_beta(n: int, a: float, b: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """n noise levels t ~ Beta(a, b); Beta(1, 2.5) puts most training on low noise levels.

    torch's Beta sampler draws from the global RNG, so it runs on a fork of it seeded from
    `generator`: the same generator state gives the same t, and global state is untouched. The draw
    is on the CPU and moved to the generator's device: from a GPU generator, reading the seed is a
    sync with the host (the one draw in training that makes one).
    """
    device = None if generator is None else generator.device
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=device))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.distributions.Beta(float(a), float(b)).sample((n,)).to(device)


def time_grid(steps: int, t_max: float = 1.0, t_min: float = 0.0,
              dtype: torch.dtype | None = None) -> torch.Tensor:
    """steps + 1 noise levels from t_max down to t_min, evenly spaced: the sampler's grid."""
    if steps < 1:
        raise ValueError(f"Need at least 1 sampling step, got {steps}.")
    if not 0 <= t_min < t_max <= 1:
        raise ValueError(f"Need 0 <= t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}.")
    return torch.linspace(t_max, t_min, steps + 1, dtype=dtype)


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """t -> shift t / (1 + (shift - 1) t), Esser et al.'s (2024) resolution-dependent shift: it
    fixes 0 and 1 and, for shift > 1, moves every level towards noise (on the flow path it divides
    the SNR by shift^2). On training draws it biases the timesteps; on a grid it is diffusers' flow
    `shift`."""
    if shift <= 0:
        raise ValueError(f"The shift must be positive, got {shift}.")
    return shift * t / (1 + (shift - 1) * t)


@dataclass(frozen=True)
class Schedule:
    """alpha(t), sigma(t) for t in [0, 1] (any shape); `num_steps` is set for discrete schedules."""
    name: str
    alpha_sigma: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] = field(repr=False)
    variance_preserving: bool = True
    num_steps: int | None = None

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """alpha^2 / sigma^2: inf at t = 0."""
        alpha, sigma = self.alpha_sigma(t)
        return alpha**2 / sigma**2

    def log_snr(self, t: torch.Tensor) -> torch.Tensor:
        """log(alpha^2) - log(sigma^2): +inf at t = 0, -inf where alpha = 0."""
        alpha, sigma = self.alpha_sigma(t)
        return torch.log(alpha**2) - torch.log(sigma**2)

    def alpha_sigma_like(self, t: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha, sigma for per-item levels t [B], shaped [B, 1, ...] to broadcast over x [B, ...]."""
        return self.alpha_sigma(t.view(-1, *([1] * (x.ndim - 1))))

    def add_noise(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = alpha(t) x0 + sigma(t) eps with t [B]."""
        alpha, sigma = self.alpha_sigma_like(t, x0)
        return alpha * x0 + sigma * noise

    def grid(self, steps: int, t_max: float = 1.0, t_min: float = 0.0,
             dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """`time_grid`, with a discrete schedule's levels rounded to its trained ones k / N (from
        t_max = 1 that is diffusers' "trailing" spacing)."""
        ts = time_grid(steps, t_max, t_min, dtype=torch.float64)
        if self.num_steps is not None:
            ts = (ts * self.num_steps).round() / self.num_steps
            if not (ts[1:] < ts[:-1]).all():
                raise ValueError(f"{steps} steps between t={t_min} and t={t_max} do not fit on the "
                                 f"{self.num_steps} trained levels of the {self.name} schedule.")
        return ts.to(dtype)


def _interpolated_alpha_sigma(alpha_bar: torch.Tensor, tables: dict,
                              t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha, sigma at t from alpha_bar [N + 1] given at t = k / N, linear in t in between.

    In float64 (the table's) on t's device, or on the CPU for a device without float64 (MPS), so that a
    training step on a GPU reads nothing back and copies nothing there: `tables` keeps the table's copy
    on each device. t outside [0, 1] is an error: a device-side assertion, which on a GPU (where reading
    t would be a sync) fails at the next sync, and on the CPU at once, as a ValueError."""
    device = torch.device("cpu") if t.device.type == "mps" else t.device
    t64 = t.detach().to(device, torch.float64)
    try:
        torch._assert_async(((t64 >= 0) & (t64 <= 1)).all(), "Noise levels t must lie in [0, 1].")
    except RuntimeError as error:
        raise ValueError(str(error)) from None
    n = len(alpha_bar) - 1
    pos = t64 * n
    k = pos.floor().clamp(max=n - 1).long()
    if device not in tables:
        tables[device] = alpha_bar.to(device)
    alpha_bar = tables[device]
    ab = torch.lerp(alpha_bar[k], alpha_bar[k + 1], pos - k)
    dtype = t.dtype if t.is_floating_point() else torch.get_default_dtype()
    return ab.sqrt().to(t.device, dtype), (1 - ab).sqrt().to(t.device, dtype)


def linear_betas(n: int = 1000, start: float = 1e-4, end: float = 0.02) -> torch.Tensor:
    return torch.linspace(start, end, n, dtype=torch.float64)


def scaled_linear_betas(n: int = 1000, start: float = 0.00085, end: float = 0.012) -> torch.Tensor:
    return torch.linspace(start**0.5, end**0.5, n, dtype=torch.float64) ** 2


def rescale_zero_terminal_snr(alpha_bar: torch.Tensor) -> torch.Tensor:
    """Lin et al. (2023), Algorithm 1, on alpha_bar [N + 1] (entry 0 is the data, alpha_bar = 1).

    Over the trained levels k = 1..N, sqrt(alpha_bar) is shifted so that the last is 0 (SNR(1) = 0)
    and scaled so that the first is unchanged (SNR(1 / N) kept); the data level stays at 1.
    """
    a = alpha_bar[1:].sqrt()
    a = (a - a[-1]) * a[0] / (a[0] - a[-1])
    return torch.cat([alpha_bar[:1], a**2])


def beta_schedule(name: str, betas: torch.Tensor, zero_terminal_snr: bool = False) -> Schedule:
    """The VP schedule of discrete `betas` [N]: alpha_bar_k = prod_{i <= k} (1 - beta_i) at t = k / N."""
    alpha_bar = torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - betas.double(), 0)])
    if zero_terminal_snr:
        alpha_bar = rescale_zero_terminal_snr(alpha_bar)
    return Schedule(name, partial(_interpolated_alpha_sigma, alpha_bar, {}), True, len(betas))


def flow_alpha_sigma(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return 1 - t, t


COSINE = Schedule("cosine", cosine_alpha_sigma)
FLOW = Schedule("flow", flow_alpha_sigma, variance_preserving=False)
BETAS = {"linear": linear_betas, "scaled_linear": scaled_linear_betas}


@lru_cache(maxsize=None)
def get_schedule(name: str, zero_terminal_snr: bool = False, num_steps: int = 1000) -> Schedule:
    """A schedule by name: 'cosine', 'flow', or a beta schedule, 'linear' or 'scaled_linear', of
    `num_steps` trained levels, optionally rescaled to zero terminal SNR. The same object for the same
    arguments, so that a beta schedule's table is copied to a GPU once, not at every training step."""
    if name in BETAS:
        return beta_schedule(name, BETAS[name](num_steps), zero_terminal_snr)
    if name not in ("cosine", "flow"):
        raise ValueError(f"Unknown schedule {name!r}; choose from 'cosine', 'flow', "
                         f"{', '.join(map(repr, BETAS))}.")
    if zero_terminal_snr:
        raise ValueError(f"The {name} schedule already ends at SNR 0; zero_terminal_snr is for "
                         "beta schedules.")
    return COSINE if name == "cosine" else FLOW

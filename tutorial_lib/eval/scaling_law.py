"""Compute-optimal frontiers and saturating power laws (notebook 06, section 4).

A scaling study trains several model sizes, each for several compute budgets C (training FLOPs), and
measures a loss L on held-out data. Two steps turn those runs into a law:

1. The **frontier**: at a given compute the best one can do is the lowest loss any size reached with
   at most that compute. `compute_frontier` keeps the runs that beat every run of less or equal
   compute (Hoffmann et al., 2022, *Training Compute-Optimal Large Language Models*, approach 1,
   over discrete runs instead of whole training curves).
2. A **saturating power law** through the frontier,

       L(C) = E + A * C^(-alpha),    E >= 0, A >= 0,

   where E is the loss that no compute removes (the data's own entropy for a language model; for a
   denoiser, the irreducible error of predicting v from a noisy input): the form Henighan et al. (2020,
   *Scaling Laws for Autoregressive Generative Modeling*) fit to compute frontiers. Kaplan et al.
   (2020) fit a pure power law (E = 0); Hoffmann et al. (2022, Eq. 2) keep E in a law of parameters
   and data. Without E the fitted exponent falls as the
   losses approach their floor, and an extrapolation runs below it.

`fit_saturating_power_law` solves the least-squares problem exactly in (E, A) for each alpha (a
linear problem once alpha is fixed) and searches alpha on a grid, then by golden section.
"""
import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PowerLawFit:
    """L(C) = E + A * C^(-alpha), fitted to `n` points with root-mean-square residual `rms`."""
    E: float
    A: float
    alpha: float
    rms: float
    n: int

    def __call__(self, compute):
        return self.E + self.A * np.asarray(compute, dtype=np.float64) ** -self.alpha


def _check(compute, loss) -> tuple[np.ndarray, np.ndarray]:
    compute, loss = np.asarray(compute, dtype=np.float64), np.asarray(loss, dtype=np.float64)
    if compute.ndim != 1 or compute.shape != loss.shape:
        raise ValueError(f"compute and loss must be 1-D and of one length, got shapes {compute.shape} and {loss.shape}.")
    if not (np.all(np.isfinite(compute)) and np.all(np.isfinite(loss))):
        raise ValueError("compute and loss must be finite (a diverged run's loss is not a point on a scaling law).")
    if np.any(compute <= 0):
        raise ValueError(f"compute must be positive (training FLOPs), got min {compute.min()}.")
    return compute, loss


def compute_frontier(compute, loss) -> np.ndarray:
    """Indices, in order of compute, of the runs whose loss is lower than that of every run with less or
    equal compute: the lowest loss reachable at each compute."""
    compute, loss = _check(compute, loss)
    order = np.lexsort((loss, compute))  # by compute, ties by loss
    frontier, best = [], math.inf
    for i in order:
        if loss[i] < best:
            frontier.append(int(i))
            best = loss[i]
    return np.array(frontier, dtype=np.int64)


def _fit_at(alpha: float, x: np.ndarray, loss: np.ndarray) -> tuple[float, float, float]:
    """The least-squares (E, A) >= 0 of loss ~ E + A x^(-alpha), and its sum of squared residuals."""
    z = x ** -alpha
    E, A = np.linalg.lstsq(np.stack([np.ones_like(z), z], axis=1), loss, rcond=None)[0]
    if E < 0:  # the constrained optimum lies on E = 0 (the problem is convex in (E, A))
        E, A = 0.0, float(z @ loss / (z @ z))
    elif A < 0:  # on A = 0: a flat line
        E, A = float(loss.mean()), 0.0
    return float(E), float(A), float(np.sum((loss - E - A * z) ** 2))


def fit_saturating_power_law(compute, loss, alpha_range: tuple[float, float] = (0.005, 3.0)) -> PowerLawFit:
    """Least-squares fit of L = E + A * C^(-alpha) with E, A >= 0 and alpha in `alpha_range` (in squared
    error on L; Hoffmann et al., 2022, minimise a Huber loss on log L instead)."""
    compute, loss = _check(compute, loss)
    if len(compute) < 3:
        raise ValueError(f"A saturating power law has 3 parameters: fit it to at least 3 points, got {len(compute)}.")
    scale = compute.max()
    x = compute / scale  # in units of the largest compute, so that x^(-alpha) stays near 1
    grid = np.geomspace(*alpha_range, 200)
    sse = [_fit_at(a, x, loss)[2] for a in grid]
    k = int(np.argmin(sse))
    lo, hi = grid[max(k - 1, 0)], grid[min(k + 1, len(grid) - 1)]
    golden = (math.sqrt(5) - 1) / 2
    for _ in range(60):  # golden-section search between the best grid point's neighbours
        a1, a2 = hi - golden * (hi - lo), lo + golden * (hi - lo)
        if _fit_at(a1, x, loss)[2] < _fit_at(a2, x, loss)[2]:
            hi = a2
        else:
            lo = a1
    alpha = (lo + hi) / 2
    E, A, sse_best = _fit_at(alpha, x, loss)
    # back to C in FLOP: A (C / scale)^(-alpha) = (A scale^alpha) C^(-alpha)
    return PowerLawFit(E=E, A=float(A * scale ** alpha), alpha=float(alpha), rms=math.sqrt(sse_best / len(loss)), n=len(loss))

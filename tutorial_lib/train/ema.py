"""Averages of the weights over training: the classic EMA, and EDM2's post-hoc EMA.

`EMA` (with the warm-up of Karras et al. 2022) keeps one average whose length is fixed before
training. Post-hoc EMA (Karras, Aittala, Lehtinen, Hellsten, Aila & Laine 2024, "Analyzing and
Improving the Training Dynamics of Diffusion Models", arXiv 2312.02696, section 3 and appendix C)
picks the length after training instead:

1. Track a few power-function EMAs (section 3.1). At optimizer step t = 1, 2, ...

       theta_hat(t) = beta(t) theta_hat(t - 1) + (1 - beta(t)) theta(t),   beta(t) = (1 - 1/t)^(gamma + 1).

   Unrolled, theta_hat(t) = sum_{tau=1..t} p_t(tau) theta(tau) with the averaging profile

       p_t(tau) = (1 - beta(tau)) (tau / t)^(gamma + 1) = (tau^(gamma+1) - (tau-1)^(gamma+1)) / t^(gamma+1),

   which sums to 1 and is the step-by-step version of the paper's (gamma + 1) tau^gamma / t^(gamma+1).
   Its width relative to the training length, the standard deviation of tau / t under the paper's
   profile, is sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))): the profile keeps its
   shape as training goes on (unlike a fixed decay, whose length is a number of steps).
2. Save snapshots of them every few steps (`PowerEMA.save_snapshots`, or the Trainer's
   `posthoc_ema_sigma_rels` and `posthoc_snapshot_every`).
3. After training, reconstruct the EMA of any sigma_rel (appendix C.3): each snapshot is a known
   profile over past steps, so find the combination of snapshots whose profile is nearest to the
   target's in L2 over the steps, and take the same combination of the snapshots' weights
   (`reconstruct_ema`, `reconstruct_emas` for a sweep).

The profiles here are the exact step-by-step ones of the recursion above, so a reconstruction
matches a tracked EMA to float precision where the snapshots can represent it; the paper uses the
continuous profile, which differs from these by O(1/t).
"""

from __future__ import annotations

import copy
import json
import math
import re
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..weights import atomic_write

GOLDEN = (1 + math.sqrt(5)) / 2
# sigma_rel(gamma) rises from 0 at gamma = -1 to GOLDEN^(-5/2) at gamma = GOLDEN - 2, then falls
# to 0 as gamma grows: each sigma_rel below the maximum has one gamma on the falling branch.
MAX_SIGMA_REL = GOLDEN ** -2.5  # 0.3003
SNAPSHOT_KEY = "posthoc_ema"  # the metadata entry of a snapshot file
SNAPSHOT_NAME = re.compile(r"step_(\d{8})_sigma_rel_(.+)\.safetensors")
MAX_RESIDUAL = 0.05  # relative L2 misfit of a reconstructed profile beyond which reconstruction refuses
_CHUNK = 1 << 16  # steps per block when summing profiles over a long run


# ---------------------------------------------------------------------------------- averages
class WeightAverage:
    """A frozen copy of a model whose trainable parameters move toward the live model's,
    theta_avg <- theta_avg + w (theta - theta_avg) (`lerp`): one `torch._foreach_lerp_` over all of
    them, a few kernel launches a step rather than one per parameter (or, under FSDP, one per DTensor).

    What does not train is not averaged: the copy holds the live model's own frozen parameters (the
    base weights under LoRA, a frozen text encoder) and buffer tensors (a frozen caption table,
    position tables, running statistics), shared rather than copied.
    """

    def __init__(self, model: torch.nn.Module):
        frozen = {id(p): p for p in model.parameters() if not p.requires_grad}
        self.model = copy.deepcopy(model, memo=frozen).eval().requires_grad_(False)  # frozen ones: the same objects
        # (averaged submodule, live submodule, buffer name) for every buffer, in the same order.
        self._buffers = [(e, m, name) for e, m in zip(self.model.modules(), model.modules()) for name in m._buffers]
        self._share_buffers()

    def _share_buffers(self):
        """Point the copy's buffers at the live model's (again, if the live model replaced one)."""
        for e, m, name in self._buffers:
            if e._buffers[name] is not m._buffers[name]:
                e._buffers[name] = m._buffers[name]

    @torch.no_grad()
    def lerp(self, model: torch.nn.Module, weight: float):
        """theta_avg <- theta_avg + weight (theta - theta_avg), in place, for every trainable parameter.
        Parameters are read afresh each time, so this holds after FSDP has replaced both models'
        parameters with sharded ones: each rank then averages its own shards."""
        pairs = [(e, p.detach()) for e, p in zip(self.model.parameters(), model.parameters()) if p.requires_grad]
        if pairs:
            averaged, live = map(list, zip(*pairs))
            torch._foreach_lerp_(averaged, live, weight)
        self._share_buffers()


class EMA(WeightAverage):
    """Exponential moving average of weights, theta_ema <- d * theta_ema + (1 - d) * theta."""

    def __init__(self, model: torch.nn.Module, decay: float = 0.999):
        super().__init__(model)
        self.decay = decay

    def update(self, model: torch.nn.Module, step: int | None = None):
        # Warm-up (as in Karras et al.): early on, average over the steps seen so far.
        d = self.decay if step is None else min(self.decay, (1 + step) / (10 + step))
        self.lerp(model, 1 - d)


# ---------------------------------------------------------------------------------- power-function profile
def power_beta(t: int, gamma: float) -> float:
    """beta(t) = (1 - 1/t)^(gamma + 1): the decay of a power-function EMA at step t = 1, 2, ...
    (EDM2, section 3.1). beta(1) = 0, so the average starts at theta(1)."""
    if t < 1:
        raise ValueError(f"Power-function EMA steps count from 1, got t = {t}.")
    return (1 - 1 / t) ** (gamma + 1)


def gamma_to_sigma_rel(gamma: float) -> float:
    """sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))): the standard deviation of tau / t
    under the profile (gamma + 1) tau^gamma / t^(gamma + 1) on [0, t] (EDM2, section 3.1)."""
    if not gamma > -1:
        raise ValueError(f"A power-function EMA needs gamma > -1, got {gamma}.")
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma whose profile has relative width sigma_rel (the inverse of `gamma_to_sigma_rel`).

    Squaring and clearing the denominators, sigma_rel^2 (gamma + 2)^2 (gamma + 3) = gamma + 1, or with
    s = sigma_rel^-2 the cubic gamma^3 + 7 gamma^2 + (16 - s) gamma + (12 - s) = 0, whose largest root
    is the one on the falling branch (0 < sigma_rel < MAX_SIGMA_REL). EDM2's 0.05 and 0.10 give
    gamma = 16.97 and 6.94.
    """
    if not 0 < sigma_rel < MAX_SIGMA_REL:
        raise ValueError(f"sigma_rel must be in (0, {MAX_SIGMA_REL:.4f}) (the widest power-function profile, "
                         f"at gamma = {GOLDEN - 2:.3f}), got {sigma_rel}. EDM2 tracks 0.05 and 0.10.")
    s = sigma_rel ** -2
    return float(np.roots([1.0, 7.0, 16.0 - s, 12.0 - s]).real.max())


def power_profile(t: int, gamma: float, taus: np.ndarray) -> np.ndarray:
    """p_t(tau) = (1 - beta(tau)) (tau / t)^(gamma + 1) for tau <= t, else 0: the weight of theta(tau) in a
    power-function EMA at step t (float64, for the steps `taus` >= 1)."""
    taus = np.asarray(taus, dtype=np.float64)
    p = (1 - (1 - 1 / taus) ** (gamma + 1)) * (taus / t) ** (gamma + 1)
    return np.where(taus <= t, p, 0.0)


def fit_power_profiles(steps, gammas, step: int, target_gammas) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares coefficients x[k] of the snapshots (their steps t_i and exponents gamma_i) for each
    target profile (step, target_gammas[k]), and the relative residuals |sum_i x_ki p_i - p_k| / |p_k|
    (EDM2, appendix C.3): ([targets, snapshots], [targets]).

    Minimising |sum_i x_i p_i - p|^2 over the steps tau = 1..step gives the normal equations
    A x = b with A_ij = <p_i, p_j> and b_i = <p_i, p>. Here the inner products are sums over the steps
    of the exact profiles (the paper integrates the continuous ones in closed form); they take
    O(step x snapshots^2) time in blocks of steps, once for all targets: 2 s on one core for a million
    steps and 100 snapshots.
    """
    steps, gammas = np.asarray(steps, dtype=np.int64), np.asarray(gammas, dtype=np.float64)
    if len(steps) == 0 or steps.max() > step:
        raise ValueError(f"Need at least one snapshot, all at steps <= the target's {step}; got {steps.tolist()}.")
    n, k = len(steps), len(target_gammas)
    a, b, c = np.zeros((n, n)), np.zeros((n, k)), np.zeros(k)
    for start in range(1, step + 1, _CHUNK):
        taus = np.arange(start, min(start + _CHUNK, step + 1))  # [block]
        p_i = np.stack([power_profile(t, g, taus) for t, g in zip(steps, gammas)], axis=1)  # [block, n]
        p = np.stack([power_profile(step, g, taus) for g in target_gammas], axis=1)  # [block, k]
        a, b, c = a + p_i.T @ p_i, b + p_i.T @ p, c + (p * p).sum(0)
    x = np.linalg.lstsq(a, b, rcond=None)[0]  # [n, k]; minimum-norm where snapshots repeat a profile
    misfit = np.maximum(c - 2 * (x * b).sum(0) + (x * (a @ x)).sum(0), 0.0)  # |sum_i x_i p_i - p|^2
    return x.T, np.sqrt(misfit / c)


# ---------------------------------------------------------------------------------- tracking
class PowerEMA:
    """Power-function EMAs of a model's weights for several sigma_rels (EDM2 tracks 0.05 and 0.10),
    updated in place each step like `EMA`, and saved as snapshots for `reconstruct_ema`.

    `models[i]` is the average of width `sigma_rels[i]` (exponent `gammas[i]`), an eval-mode copy that
    shares the live model's buffers.
    """

    def __init__(self, model: torch.nn.Module, sigma_rels=(0.05, 0.10)):
        self.sigma_rels = tuple(float(s) for s in sigma_rels)
        if not self.sigma_rels or len(set(self.sigma_rels)) != len(self.sigma_rels):
            raise ValueError(f"sigma_rels must be one or more distinct numbers, got {sigma_rels}.")
        self.gammas = tuple(sigma_rel_to_gamma(s) for s in self.sigma_rels)
        self.averages = [WeightAverage(model) for _ in self.sigma_rels]

    @property
    def models(self) -> list[torch.nn.Module]:
        return [average.model for average in self.averages]

    def update(self, model: torch.nn.Module, step: int):
        """Fold in the weights after optimizer step `step` (0-based, as `EMA.update` takes it): the
        paper's t = step + 1."""
        for average, gamma in zip(self.averages, self.gammas):
            average.lerp(model, 1 - power_beta(step + 1, gamma))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged parameters, keyed "<index of the sigma_rel>.<parameter name>" (the buffers are the
        live model's)."""
        return {f"{i}.{name}": p for i, model in enumerate(self.models) for name, p in model.named_parameters()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]):
        ours = self.state_dict()
        if state.keys() != ours.keys():
            extra, missing = sorted(state.keys() - ours.keys()), sorted(ours.keys() - state.keys())
            raise ValueError(f"Post-hoc EMA state for other parameters: unexpected {extra[:5]}, "
                             f"missing {missing[:5]}.")
        for name, p in ours.items():
            p.copy_(state[name])

    def save_snapshots(self, folder: str | Path, step: int, snapshot_every: int) -> list[Path]:
        """Write each average after `step` optimizer steps to folder/step_XXXXXXXX_sigma_rel_S.safetensors,
        atomically. The metadata's one entry, "posthoc_ema", is JSON: its step, sigma_rel, gamma, every
        sigma_rel tracked, the snapshot interval and the names of its buffers (which reconstruction
        copies rather than averages). One entry, because safetensors writes several in any order, and
        a resumed run must write the same bytes."""
        paths = []
        for model, sigma_rel, gamma in zip(self.models, self.sigma_rels, self.gammas):
            params = {name for name, _ in model.named_parameters()}
            tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
            record = {"step": step, "sigma_rel": sigma_rel, "gamma": gamma, "sigma_rels": self.sigma_rels,
                      "snapshot_every": snapshot_every, "buffers": sorted(tensors.keys() - params)}
            meta = {SNAPSHOT_KEY: json.dumps(record, sort_keys=True)}
            path = Path(folder) / snapshot_name(step, sigma_rel)
            paths.append(atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta)))
        return paths


def snapshot_name(step: int, sigma_rel: float) -> str:
    return f"step_{step:08d}_sigma_rel_{sigma_rel!r}.safetensors"


# ---------------------------------------------------------------------------------- reconstruction
class SnapshotError(RuntimeError):
    """Post-hoc EMA snapshots that are missing, unreadable, or from different runs."""


@dataclass
class Snapshot:
    """One saved power-function EMA (its header only; `reconstruct_emas` reads the tensors)."""
    path: Path
    step: int
    sigma_rel: float
    gamma: float
    sigma_rels: tuple[float, ...]  # every sigma_rel its run tracked
    snapshot_every: int
    buffers: tuple[str, ...]
    shapes: dict[str, list[int]]


@dataclass
class PostHocEMA:
    """A reconstructed EMA: `state_dict` (load it into the model), the target, the snapshots used with
    their `coefficients`, and the profile's relative L2 `residual`."""
    sigma_rel: float
    gamma: float
    step: int
    state_dict: dict[str, torch.Tensor]
    coefficients: np.ndarray  # [len(snapshots)]
    residual: float
    snapshots: list[Snapshot]


def load_snapshots(folder: str | Path, allow_gaps: bool = False) -> list[Snapshot]:
    """Every snapshot in `folder` (headers only), ordered by step then sigma_rel, after checking that
    they come from one run and, unless `allow_gaps`, that none is missing from the grid they were
    written on (every multiple of the interval, and the last step of a run, for every sigma_rel)."""
    folder = Path(folder)
    paths = sorted(p for p in folder.glob("step_*.safetensors") if SNAPSHOT_NAME.fullmatch(p.name))
    if not paths:
        raise SnapshotError(f"No post-hoc EMA snapshots in {folder}: train with posthoc_ema_sigma_rels and "
                            "posthoc_snapshot_every set (they go to out_dir/posthoc_ema).")
    snapshots = [_read_header(p) for p in paths]
    first = snapshots[0]
    for s in snapshots[1:]:
        fields = ("shapes", "sigma_rels", "snapshot_every")
        if any(getattr(s, name) != getattr(first, name) for name in fields):
            differ = [name for name in fields if getattr(s, name) != getattr(first, name)]
            raise SnapshotError(f"{s.path} differs from {first.path} in {', '.join(differ)}: snapshots of "
                                "different runs in one folder. Keep one run's snapshots per folder.")
    found = {(s.step, s.sigma_rel) for s in snapshots}
    every, last = first.snapshot_every, max(s.step for s in snapshots)
    grid = sorted(set(range(every, last + 1, every)) | {step for step, _ in found})
    missing = [snapshot_name(step, s) for step in grid for s in first.sigma_rels if (step, s) not in found]
    if missing and not allow_gaps:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise SnapshotError(f"{folder} lacks {', '.join(missing[:3])}{more} (snapshots every {every} steps of "
                            f"sigma_rels {list(first.sigma_rels)} up to step {last}): deleted or lost. To "
                            "reconstruct from the others, load_snapshots(folder, allow_gaps=True).")
    return sorted(snapshots, key=lambda s: (s.step, s.sigma_rel))


def _read_header(path: Path) -> Snapshot:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
        if SNAPSHOT_KEY not in meta:
            raise ValueError(f"no {SNAPSHOT_KEY!r} entry in its metadata")
        r = json.loads(meta[SNAPSHOT_KEY])
        return Snapshot(path, r["step"], r["sigma_rel"], r["gamma"], tuple(r["sigma_rels"]), r["snapshot_every"],
                        tuple(r["buffers"]), shapes)
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as err:
        raise SnapshotError(f"{path} is not a readable post-hoc EMA snapshot ({type(err).__name__}: {err}). "
                            "Move it out of the folder to reconstruct from the others with "
                            "load_snapshots(folder, allow_gaps=True).") from None


def reconstruct_ema(snapshots: str | Path | list[Snapshot], sigma_rel: float, step: int | None = None,
                    max_residual: float = MAX_RESIDUAL) -> PostHocEMA:
    """The EMA of width `sigma_rel` at `step` (default: the last snapshot's), from a folder of snapshots
    (or `load_snapshots`' list): one target of `reconstruct_emas`."""
    return reconstruct_emas(snapshots, [sigma_rel], step, max_residual)[0]


def reconstruct_emas(snapshots: str | Path | list[Snapshot], sigma_rels, step: int | None = None,
                     max_residual: float = MAX_RESIDUAL) -> list[PostHocEMA]:
    """Reconstruct the EMA of each of `sigma_rels` at `step` (default: the last snapshot's step).

    First every target's coefficients (`fit_power_profiles` over the snapshots up to `step`), so that
    a target the snapshots cannot represent (relative residual above `max_residual`) fails before
    any tensor is read; then one pass over the snapshot files, summing sum_i x_i theta_i for all
    targets in float64 and casting back to the snapshots' dtype. Buffers (and integer tensors) are
    copied from the last snapshot used: they are the live model's at that step, not averages.
    """
    if not isinstance(snapshots, list):
        snapshots = load_snapshots(snapshots)
    if not snapshots:
        raise SnapshotError("No snapshots to reconstruct from.")
    sigma_rels = [float(s) for s in sigma_rels]
    first, last = min(s.step for s in snapshots), max(s.step for s in snapshots)
    step = last if step is None else step
    if not first <= step <= last:
        raise ValueError(f"step {step} is outside the snapshots' steps {first}..{last}.")
    used = [s for s in snapshots if s.step <= step]
    gammas = [sigma_rel_to_gamma(s) for s in sigma_rels]
    x, residuals = fit_power_profiles([s.step for s in used], [s.gamma for s in used], step, gammas)
    bad = [f"{s} (residual {r:.3g})" for s, r in zip(sigma_rels, residuals) if r > max_residual]
    if bad:
        tracked = sorted({s.sigma_rel for s in used})
        raise ValueError(f"Cannot reconstruct sigma_rel {', '.join(bad)} at step {step} from snapshots of sigma_rels "
                         f"{tracked} every {used[0].snapshot_every} steps: the best combination misses the target "
                         f"profile by more than max_residual = {max_residual} of its norm. Pick a sigma_rel nearer "
                         "the tracked ones or a step that has snapshots, or track a wider range (and snapshot "
                         "more often) in the next run.")
    states = _weighted_sums(used, torch.from_numpy(x))
    return [PostHocEMA(s, g, step, state, coefficients, float(r), used)
            for s, g, state, coefficients, r in zip(sigma_rels, gammas, states, x, residuals)]


def _weighted_sums(snapshots: list[Snapshot], x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """sum_i x[k, i] theta_i for each row k of x, tensor by tensor, reading one snapshot's tensor at a time."""
    states = [{} for _ in range(len(x))]
    newest = snapshots[-1]
    with ExitStack() as stack:
        files = [stack.enter_context(safe_open(str(s.path), framework="pt")) for s in snapshots]
        for key, shape in newest.shapes.items():
            last = _get(files[-1], key, newest)
            if key in newest.buffers or not last.is_floating_point():
                for state in states:
                    state[key] = last.clone()
                continue
            total = torch.zeros(len(x), *shape, dtype=torch.float64)  # [targets, *shape]
            for i, (f, s) in enumerate(zip(files, snapshots)):
                total += x[:, i].view(-1, *[1] * len(shape)) * _get(f, key, s).double()
            for state, t in zip(states, total):
                state[key] = t.to(last.dtype)
    return states


def _get(f, key: str, snapshot: Snapshot) -> torch.Tensor:
    try:
        return f.get_tensor(key)
    except (SafetensorError, OSError, ValueError) as err:
        raise SnapshotError(f"{snapshot.path}: cannot read tensor {key!r} ({err}); the file is damaged.") from None

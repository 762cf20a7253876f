"""Pieces every training loop here shares: seeded shuffling, the learning-rate schedule, EMA."""

from __future__ import annotations

import copy
import math

import torch


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch's global RNG and return a CPU generator for data order."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def epoch_batches(n: int, batch_size: int, generator: torch.Generator):
    """Index batches over one shuffled epoch, dropping the last partial batch."""
    order = torch.randperm(n, generator=generator)
    for i in range(0, n - batch_size + 1, batch_size):
        yield order[i:i + batch_size]


def infinite_batches(n: int, batch_size: int, generator: torch.Generator):
    batch_size = min(batch_size, n)
    while True:
        yield from epoch_batches(n, batch_size, generator)


def warmup_cosine(step: int, total: int, warmup: int, floor: float = 0.05) -> float:
    """LR multiplier: linear warm-up to 1, then cosine decay to `floor` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class EMA:
    """Exponential moving average of weights, theta_ema <- d * theta_ema + (1 - d) * theta."""

    def __init__(self, model: torch.nn.Module, decay: float = 0.999):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int | None = None):
        # Warm-up (as in Karras et al.): early on, average over the steps seen so far.
        d = self.decay if step is None else min(self.decay, (1 + step) / (10 + step))
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1 - d)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)

"""Pieces every training loop here shares: seeding and the learning-rate schedule (the EMA is in ema.py,
the data order and the DataLoader pieces in loader.py)."""

from __future__ import annotations

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


def warmup_inverse_sqrt(step: int, warmup: int, decay_start: int) -> float:
    """LR multiplier of EDM2 (Karras et al., 2024, "Analyzing and Improving the Training Dynamics of
    Diffusion Models", Eq. 16): linear warm-up to 1, constant until `decay_start` steps (their t_ref),
    then inverse-square-root decay, alpha(t) = alpha_ref / sqrt(max(t / t_ref, 1)). It never anneals to
    a floor, so the late weights keep moving and the EMA length still matters at the end."""
    return min(1.0, (step + 1) / max(1, warmup)) / math.sqrt(max((step + 1) / decay_start, 1.0))

"""Pieces every training loop here shares: seeded shuffling and the learning-rate schedule (the EMA is in
ema.py)."""

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


class ShuffledBatches:
    """Batches of indices over shuffled epochs (the last partial batch dropped), resumable exactly.

    Epoch e's order is randperm(n) from a generator seeded with seed + e (as torch's
    DistributedSampler does), so the whole state is (epoch, position): no generator state to save,
    and every rank of a data-parallel run draws the same order and takes its own share of it.
    """

    def __init__(self, n: int, batch_size: int, seed: int):
        if not 1 <= batch_size <= n:
            raise ValueError(f"A batch of {batch_size} does not fit in {n} examples.")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.position = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> torch.Tensor:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch))

    def next(self) -> torch.Tensor:
        """The next batch of indices [batch_size]."""
        if self.position + self.batch_size > self.n:
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._permutation()
        self.position += self.batch_size
        return self._order[self.position - self.batch_size:self.position]

    def state_dict(self) -> dict:
        return {"n": self.n, "batch_size": self.batch_size, "seed": self.seed,
                "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict):
        ours = {"n": self.n, "batch_size": self.batch_size, "seed": self.seed}
        if {k: state[k] for k in ours} != ours:
            raise ValueError(f"The data order was saved for {({k: state[k] for k in ours})}, not {ours}: "
                             "it cannot be restored.")
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._permutation()

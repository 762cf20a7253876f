"""How the Trainer reads its data: a seeded, resumable order of global batches, split per rank and
micro-batch, read through a torch DataLoader (workers, pinned memory, prefetch).

    ShuffledBatches  the order: epoch e is randperm(n) seeded with seed + e, cut into global batches;
                     its whole state is (epoch, position), which checkpoints record
    MicroBatches     the DataLoader's batch_sampler: this rank's micro-batches of each global batch,
                     forever, from a saved state of the order
    Gathered         tensors (or nested tuples / lists / dicts of them) as a dataset whose
                     __getitems__(indices) returns one whole batch
    whole_batch      the collate_fn: a dataset's __getitems__ already returns the whole batch
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, Sampler


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


def tree_map(fn, tree):
    """`fn` applied to every leaf of nested tuples (named ones too), lists and dicts."""
    if isinstance(tree, dict):
        return {k: tree_map(fn, v) for k, v in tree.items()}
    if isinstance(tree, (tuple, list)):
        items = [tree_map(fn, v) for v in tree]
        return type(tree)(*items) if hasattr(tree, "_fields") else type(tree)(items)
    return fn(tree)


def num_examples(data) -> int:
    """The number of examples in `data`: the length every leaf shares (a clear error if they differ)."""
    lengths = []
    tree_map(lambda leaf: lengths.append(len(leaf)), data)
    if not lengths or len(set(lengths)) != 1:
        raise ValueError(f"The data's tensors must share their first dimension, got lengths {lengths}.")
    return lengths[0]


def in_cpu_memory(data) -> bool:
    """Whether all of the data's tensors are in CPU memory (a dataset object is taken to be)."""
    leaves = []
    tree_map(leaves.append, data)
    return all(t.device.type == "cpu" for t in leaves if torch.is_tensor(t))


def whole_batch(batch):
    """The DataLoader's collate_fn: the dataset's __getitems__ returns the batch whole (a module-level
    function, so that worker processes can unpickle it)."""
    return batch


class Gathered(Dataset):
    """Tensors (or nested tuples / lists / dicts of them, or an object whose __getitem__ takes a
    LongTensor of indices) as a map-style dataset: __getitems__ indexes each leaf once per batch."""

    def __init__(self, data):
        self.data, self.n = data, num_examples(data)

    def __len__(self) -> int:
        return self.n

    def __getitems__(self, indices: list[int]):
        index = torch.tensor(indices)
        return tree_map(lambda leaf: leaf[index], self.data)


class MicroBatches(Sampler):
    """A DataLoader's batch_sampler: the indices of this rank's micro-batches, forever, from the data
    order's state (ShuffledBatches.state_dict()). Each global batch is viewed as [grad_accum_steps,
    world_size, micro-batch]; rank `rank` takes its column, one micro-batch per row, so the ranks'
    micro-batches of a step partition its global batch."""

    def __init__(self, order: dict, grad_accum_steps: int, rank: int = 0, world_size: int = 1):
        self.order, self.accum, self.rank, self.world_size = order, grad_accum_steps, rank, world_size

    def __iter__(self):
        batches = ShuffledBatches(self.order["n"], self.order["batch_size"], self.order["seed"])
        batches.load_state_dict(self.order)
        while True:
            for micro in batches.next().view(self.accum, self.world_size, -1)[:, self.rank]:
                yield micro.tolist()

"""Two-dimensional toy data for notebook 03b: points you can see, so that velocity fields, scores and
moving particles can be drawn.

    two_moons     two interleaved half circles (the shape of scikit-learn's make_moons), centred and
                  scaled to a spread of about 1, with Gaussian jitter
    checkerboard  uniform on the dark squares of a 4 x 4 board over [-2, 2]^2

Both are seeded: the same (n, seed) gives the same points on every machine (a private CPU generator,
float32), so a notebook's exact fields and a test's expectations do not move between runs.
"""

from __future__ import annotations

import math

import torch


def two_moons(n: int, seed: int = 0, noise: float = 0.05) -> torch.Tensor:
    """n points [n, 2]: half of them (in expectation) on the upper arc (cos a, sin a), the others on
    the lower one (1 - cos a, 1/2 - sin a), a ~ U[0, pi], plus N(0, noise^2) jitter; then centred on
    (1/2, 1/4) and scaled by 1.5: x spans about [-2.4, 2.4], y about [-1.3, 1.3]."""
    g = torch.Generator().manual_seed(seed)
    lower = torch.rand(n, generator=g) < 0.5
    a = torch.rand(n, generator=g) * math.pi
    upper_arc = torch.stack([torch.cos(a), torch.sin(a)], 1)
    lower_arc = torch.stack([1 - torch.cos(a), 0.5 - torch.sin(a)], 1)
    x = torch.where(lower[:, None], lower_arc, upper_arc) + noise * torch.randn(n, 2, generator=g)
    return (x - torch.tensor([0.5, 0.25])) * 1.5


def checkerboard(n: int, seed: int = 0) -> torch.Tensor:
    """n points [n, 2] uniform on the 8 dark squares (column + row even) of a 4 x 4 board of unit
    squares covering [-2, 2]^2."""
    g = torch.Generator().manual_seed(seed)
    column = torch.randint(0, 4, (n,), generator=g)
    row = 2 * torch.randint(0, 2, (n,), generator=g) + column % 2  # column + row even
    return torch.stack([column, row], 1).float() - 2 + torch.rand(n, 2, generator=g)

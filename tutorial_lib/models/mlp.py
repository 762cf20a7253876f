"""A small MLP for 2-D fields (notebook 03b): f(x_t, t) -> a vector of x's size, e.g. the flow
velocity u = eps - x0 of the linear path x_t = (1 - t) x0 + t eps.

    h = [x, timestep_embedding(t)]  ->  (Linear, SiLU) x depth  ->  Linear  ->  f  [B, dim]

t in [0, 1] enters through the course's sinusoidal embedding of 1000 t (`layers.timestep_embedding`),
the range it is built for. The forward takes the denoisers' signature `model(x_t, t, cond)` (cond
unused), so `parametrizations.x0_denoiser(model, "flow", FLOW)` hands it to any sampler.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .layers import timestep_embedding


@dataclass(frozen=True)
class FieldMLPConfig:
    dim: int = 2  # the data's dimension: input and output size
    hidden: int = 128  # width of every hidden layer
    depth: int = 3  # hidden layers
    time_dim: int = 32  # size of t's sinusoidal embedding (even)

    def __post_init__(self):
        if min(self.dim, self.hidden, self.depth) < 1 or self.time_dim < 2 or self.time_dim % 2:
            raise ValueError(f"Need dim, hidden, depth >= 1 and an even time_dim >= 2, got {self}.")


class FieldMLP(nn.Module):
    """The MLP above; `FieldMLP(FieldMLPConfig(hidden=64))`."""

    def __init__(self, config: FieldMLPConfig = FieldMLPConfig()):
        super().__init__()
        self.config = config
        layers, width = [], config.dim + config.time_dim
        for _ in range(config.depth):
            layers += [nn.Linear(width, config.hidden), nn.SiLU()]
            width = config.hidden
        self.net = nn.Sequential(*layers, nn.Linear(width, config.dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        """x [B, dim], t [B] (or a number) in [0, 1] -> [B, dim]."""
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])
        return self.net(torch.cat([x, timestep_embedding(t, self.config.time_dim).to(x.dtype)], -1))

"""Integrator Neurons (notebook 07): a gated refinement that each token takes as much of as its gate says.

After a DiT block, with u_k = modulate(LN(h_k), shift, scale) (the block's MLP modulation, so the gate and
the refinement see the noise level and the caption), for k = 1..T:

    g_k     = sigmoid(gate(u_k))              [B, N, 1]   gate: an MLP D -> D/4 -> 1
    h_{k+1} = h_k + g_k * refine(u_k)         [B, N, D]   refine: an MLP D -> D * mlp_ratio -> D

The same gate and refinement serve all T steps, so a token's state is integrated over them, each step
weighted by the token's own gate. The fraction of this compute a token receives is mean_k g_k in [0, 1],
a soft measure: every step is computed for every token (the FLOPs are those of T full refinements), and
a token with g near 0 simply keeps its state. `compute_fractions` measures it for a batch.

The idea is adaptive computation per token: Adaptive Computation Time (Graves, 2016) halts each token's
recurrence by a learned probability; Universal Transformers (Dehghani et al., 2019) share one block's
weights across steps; Mixture-of-Depths (Raposo et al., 2024) lets tokens skip a block's compute on the
residual. The name and the gated update come from one small public project, not a paper: INL-Diffusion
(github.com/Web3-League/inl-diffusion), whose IntegratorNeuron repeats h <- h + w sigmoid(gate(h)) refine(h)
for two steps on the raw state, with a learned scalar w. This version reads the state through the LayerNorm
and the block's modulation (so the gate sees t and the caption), drops w, and zero-initialises the
refinement's output projection, so a fresh Integrator is the identity (`DiT.initialize_weights`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..text.base import TextEmbedding
from .layers import MLP, modulate

GATE_RATIO = 0.25  # the gate MLP's hidden width / D: a gate is a small scorer beside the refinement


class IntegratorNeurons(nn.Module):
    """forward(h [B, N, D], shift [B, D], scale [B, D]) -> (h [B, N, D], gates g_k [B, T, N])."""

    def __init__(self, dim: int, iterations: int, mlp_ratio: float = 1.0):
        super().__init__()
        if iterations < 1 or int(dim * mlp_ratio) < 1 or int(dim * GATE_RATIO) < 1:
            raise ValueError(f"Integrator Neurons need iterations >= 1 and a hidden width of at least 1 "
                             f"(int(dim * mlp_ratio), int(dim * {GATE_RATIO})), got iterations {iterations}, "
                             f"dim {dim}, mlp_ratio {mlp_ratio}.")
        self.iterations = iterations
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)  # the modulation supplies the affine
        self.gate = MLP(dim, GATE_RATIO, out_dim=1)
        self.refine = MLP(dim, mlp_ratio)

    def forward(self, h, shift, scale):
        gates = []
        for _ in range(self.iterations):
            u = modulate(self.norm(h), shift, scale)  # [B, N, D]
            g = torch.sigmoid(self.gate(u))  # [B, N, 1]
            h = h + g * self.refine(u)
            gates.append(g.squeeze(-1))  # [B, N]
        return h, torch.stack(gates, dim=1)  # [B, T, N]


@torch.no_grad()
def compute_fractions(model: nn.Module, x: torch.Tensor, t: torch.Tensor, text: TextEmbedding,
                      threshold: float | None = None) -> torch.Tensor:
    """The share of the Integrator compute each token of x [B, C, H, W] receives, [B, N] with N = (H/p)(W/p)
    in raster order (`.view(B, H // p, W // p)` for a map): the mean of its gates over blocks and steps,
    or with `threshold` the share of (block, step) pairs whose gate exceeds it (e.g. 0.5).

    `model` is a DiT with integrator=True, run as `model(x, t, text, return_gates=True)`."""
    _, gates = model(x, t, text, return_gates=True)  # [B, blocks, T, N]
    if threshold is not None:
        gates = (gates > threshold).to(gates.dtype)
    return gates.mean(dim=(1, 2))  # [B, N]

"""Transformer building blocks shared by the course's denoisers."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding (Vaswani et al., 2017) of t in [0, 1], fed as 1000 t: [B] -> [B, dim].

    emb = [cos(1000 t w_i), sin(1000 t w_i)], w_i = max_period^(-i / (dim/2)), i = 0..dim/2-1.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_2d(h: int, w: int, dim: int) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding (as in MAE/DiT): half the channels encode the row,
    half the column, each with 1D sinusoids. Returns [h * w, dim], rows in raster order."""
    if dim % 4:
        raise ValueError(f"sincos_2d needs dim divisible by 4, got {dim}.")
    quarter = dim // 4
    omega = 1.0 / 10_000 ** (torch.arange(quarter) / quarter)
    ys, xs = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    out = [f(pos.reshape(-1)[:, None] * omega[None]) for pos in (ys, xs) for f in (torch.sin, torch.cos)]
    return torch.cat(out, dim=1)


class Attention(nn.Module):
    """Multi-head attention through `F.scaled_dot_product_attention`.

    Self-attention when `context` is None; cross-attention to `context` [B, S, context_dim]
    otherwise, with `mask` [B, S] (True = attend) hiding padding tokens.
    """

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}.")
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim or dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x, context=None, mask=None):
        b, n, d = x.shape
        context = x if context is None else context
        q = self.q(x).view(b, n, self.heads, -1).transpose(1, 2)  # [B, H, N, d/H]
        k, v = self.kv(context).view(b, context.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        attn_mask = None if mask is None else mask[:, None, None, :]  # [B, 1, 1, S]
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # [B, H, N, d/H]
        return self.out(h.transpose(1, 2).reshape(b, n, d))


class MLP(nn.Sequential):
    def __init__(self, dim: int, ratio: float = 4.0):
        hidden = int(dim * ratio)
        super().__init__(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))

"""Transformer building blocks shared by the course's denoisers.

Notebook 01's TinyTransformer uses `timestep_embedding`, `sincos_2d`, `Attention` (plain
multi-head) and `MLP`. Notebook 03's DiT adds adaLN modulation (`modulate`), 2D rotary position
embeddings (`rope_2d`, `apply_rope`), and `Attention`'s keyword-only options: grouped-query
attention and QK-norm. With those options left at their defaults `Attention` builds the same
parameters and computes the same numbers as before they existed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..versions import require_torch


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding (Vaswani et al., 2017) of t in [0, 1], fed as 1000 t: [B] -> [B, dim].

    emb = [cos(1000 t w_i), sin(1000 t w_i)], w_i = max_period^(-i / (dim/2)), i = 0..dim/2-1.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def grid_positions(h: int, w: int, scale: tuple[float, float] = (1.0, 1.0),
                   dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column coordinates (i * scale[0], j * scale[1]) of an h x w grid, each [h, w].

    scale < 1 interpolates positions (PixArt-alpha, Chen et al., 2023): a model trained on a 16 x 16
    grid and run on 32 x 32 with scale 1/2 sees coordinates in the range it was trained on."""
    ys, xs = torch.meshgrid(torch.arange(h, dtype=dtype), torch.arange(w, dtype=dtype), indexing="ij")
    return ys * scale[0], xs * scale[1]


def sincos_2d(h: int, w: int, dim: int, scale: tuple[float, float] = (1.0, 1.0)) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding (as in MAE/DiT): half the channels encode the row,
    half the column, each with 1D sinusoids. Returns [h * w, dim], rows in raster order.
    `scale` multiplies the coordinates (`grid_positions`)."""
    if dim % 4:
        raise ValueError(f"sincos_2d needs dim divisible by 4, got {dim}.")
    quarter = dim // 4
    omega = 1.0 / 10_000 ** (torch.arange(quarter) / quarter)
    ys, xs = grid_positions(h, w, scale)
    out = [f(pos.reshape(-1)[:, None] * omega[None]) for pos in (ys, xs) for f in (torch.sin, torch.cos)]
    return torch.cat(out, dim=1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Adaptive layer-norm modulation (FiLM, Perez et al., 2018; adaLN in DiT, Peebles & Xie, 2023):

        modulate(x) = x * (1 + scale) + shift,  x [B, N, D], shift and scale [B, D].

    With shift = scale = 0 (DiT's zero-initialised regression layer) this is the identity.
    """
    return x * (1 + scale[:, None]) + shift[:, None]  # [B, N, D]


def qk_norm_layer(kind: str, head_dim: int) -> nn.Module:
    """The per-head normalisation QK-norm applies to queries and keys before their dot product.

    QK-norm (Henry et al., 2020; LayerNorm in ViT-22B, Dehghani et al., 2023; RMSNorm in SD3,
    Esser et al., 2024) bounds the attention logits q.k / sqrt(d), which keeps large or
    low-precision models from diverging. kind: "none" (identity), "layer" or "rms".
    """
    if kind == "none":
        return nn.Identity()
    if kind == "layer":
        return nn.LayerNorm(head_dim, eps=1e-6)
    if kind == "rms":
        return nn.RMSNorm(head_dim, eps=1e-6)
    raise ValueError(f"Unknown qk_norm {kind!r}; choose one of 'none', 'layer', 'rms'.")


def rope_2d(h: int, w: int, head_dim: int, theta: float = 10_000.0,
            scale: tuple[float, float] = (1.0, 1.0)) -> tuple[torch.Tensor, torch.Tensor]:
    """Axial 2D rotary position embedding (RoPE, Su et al., 2021; 2D axial form as in Heo et al.,
    2024, "Rotary Position Embedding for Vision Transformer") for an h x w grid in raster order.

    Channel i of a head is paired with channel i + head_dim/2 and the pair is rotated by the angle
    a_i: the first head_dim/4 pairs by row * w_j, the other head_dim/4 by column * w_j, with
    w_j = theta^(-j / (head_dim/4)). Returns (cos, sin), each [h * w, head_dim], for `apply_rope`.
    Since rotations compose, q_m . k_n then depends on the positions only through m - n.
    `scale` multiplies the coordinates (`grid_positions`).
    """
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs a head dimension divisible by 4, got {head_dim}.")
    quarter = head_dim // 4
    omega = theta ** (-torch.arange(quarter, dtype=torch.float64) / quarter)  # [hd/4]
    ys, xs = grid_positions(h, w, scale, torch.float64)
    angles = torch.cat([ys.reshape(-1, 1) * omega, xs.reshape(-1, 1) * omega], dim=1)  # [h*w, hd/2]
    angles = torch.cat([angles, angles], dim=1)  # [h*w, hd]: pair (i, i + hd/2) shares an angle
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each channel pair (x_i, x_{i+d/2}) of x [B, H, N, d] by its angle (cos, sin [N, d]):

        x_i' = x_i cos a_i - x_{i+d/2} sin a_i,   x_{i+d/2}' = x_{i+d/2} cos a_i + x_i sin a_i.
    """
    x1, x2 = x.chunk(2, dim=-1)  # 2 x [B, H, N, d/2]
    rotated = torch.cat([-x2, x1], dim=-1)  # [B, H, N, d]
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class Attention(nn.Module):
    """Multi-head attention through `F.scaled_dot_product_attention`.

    Self-attention when `context` is None; cross-attention to `context` [B, S, context_dim]
    otherwise, with `mask` [B, S] (True = attend) hiding padding tokens. mask None (no padding, the
    caller's decision: `text.base.padding_mask`) gives SDPA attn_mask=None, so that it may take flash
    attention, which takes no mask; an all-True mask would compute the same, slower.

    Options (keyword-only; the defaults give plain multi-head attention):
    - kv_heads < heads: grouped-query attention (GQA, Ainslie et al., 2023). Keys and values have
      kv_heads heads, each shared by heads / kv_heads query heads; the K/V projection shrinks by
      that factor, the attention FLOPs do not.
    - qk_norm: "layer" or "rms" normalises each head's q and k (see `qk_norm_layer`).
    - forward(..., rope=(cos, sin)) rotates q and k after QK-norm (see `rope_2d`).
    """

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, *,
                 kv_heads: int | None = None, qk_norm: str = "none"):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}.")
        kv_heads = kv_heads or heads
        if heads % kv_heads:
            raise ValueError(f"heads {heads} is not divisible by kv_heads {kv_heads}.")
        if kv_heads != heads:
            require_torch("sdpa_gqa")
        self.heads, self.kv_heads = heads, kv_heads
        head_dim = dim // heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim or dim, 2 * kv_heads * head_dim)
        self.out = nn.Linear(dim, dim)
        self.q_norm, self.k_norm = qk_norm_layer(qk_norm, head_dim), qk_norm_layer(qk_norm, head_dim)

    def forward(self, x, context=None, mask=None, rope=None):
        b, n, d = x.shape
        context = x if context is None else context
        q = self.q(x).view(b, n, self.heads, -1).transpose(1, 2)  # [B, H, N, d/H]
        k, v = self.kv(context).view(b, context.shape[1], 2, self.kv_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)  # k, v: [B, H_kv, S, d/H]
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        attn_mask = None if mask is None else mask[:, None, None, :]  # [B, 1, 1, S]
        gqa = {"enable_gqa": True} if self.kv_heads != self.heads else {}
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, **gqa)  # [B, H, N, d/H]
        return self.out(h.transpose(1, 2).reshape(b, n, d))


class MLP(nn.Sequential):
    """Linear(dim, int(dim * ratio)), tanh-GELU, Linear(.., out_dim or dim): [..., dim] -> [..., out_dim]."""

    def __init__(self, dim: int, ratio: float = 4.0, out_dim: int | None = None):
        hidden = int(dim * ratio)
        super().__init__(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, out_dim or dim))


def check_denoiser_inputs(x: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor | None,
                          channels: int, text_dim: int):
    """Clear errors for a denoiser's inputs x [B, channels, H, W], t [B], caption tokens [B, L, text_dim]
    and a bool mask [B, L] (or None: no padding). Shapes and dtypes only: no look at the values, so no
    sync with the host."""
    if x.ndim != 4 or x.shape[1] != channels:
        raise ValueError(f"Expected latents [B, {channels}, H, W], got {tuple(x.shape)}.")
    if tokens.ndim != 3 or tokens.shape[2] != text_dim:
        raise ValueError(f"Expected text tokens [B, L, {text_dim}], got {tuple(tokens.shape)}.")
    check_text_mask(tokens, mask)
    if t.shape != (x.shape[0],) or tokens.shape[0] != x.shape[0]:
        raise ValueError(f"Batch sizes differ: x {x.shape[0]}, t {tuple(t.shape)}, text {tokens.shape[0]}.")


def check_text_mask(tokens: torch.Tensor, mask: torch.Tensor | None):
    """A clear error unless `mask` is a bool [B, L] for tokens [B, L, D], or None (no padding)."""
    if mask is not None and (mask.dtype != torch.bool or mask.shape != tokens.shape[:2]):
        raise ValueError(f"Expected a bool text mask {tuple(tokens.shape[:2])} or None (no padding), got "
                         f"{mask.dtype} {tuple(mask.shape)}.")

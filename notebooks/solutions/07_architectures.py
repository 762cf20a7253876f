"""Worked solutions to notebook 07's exercises (run through their checks by tests/test_exercises.py)."""

import math

import torch
import torch.nn.functional as F

from tutorial_lib.models.layers import apply_rope


def single_stream(block, x, c, rope, mask):
    """Flux's parallel block: one projection gives q, k, v and the MLP's hidden layer u; attention and
    GELU(u) side by side go through one output projection, gated, onto x."""
    d, heads = x.shape[-1], block.heads
    shift, scale, gate = block.adaLN_modulation(c).chunk(3, dim=-1)  # 3 x [B, D]
    h = F.layer_norm(x, (d,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
    qkv, u = block.linear1(h).split([3 * d, block.mlp_hidden], dim=-1)
    q, k, v = qkv.unflatten(-1, (3, heads, d // heads)).permute(2, 0, 3, 1, 4)  # 3 x [B, H, S, d/H]
    q, k = apply_rope(block.qk_norm.q_norm(q), *rope), apply_rope(block.qk_norm.k_norm(k), *rope)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # [B, H, S, S]
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))  # padding hidden as keys
    attn = (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)  # [B, S, D]
    return x + gate[:, None] * block.linear2(torch.cat([attn, F.gelu(u, approximate="tanh")], dim=-1))


def rope_2d_rotate(x, rows, cols, theta=10_000.0):
    """Pair (x_i, x_{i + d/2}) turns by a_i: row * w_i for i < d/4, col * w_{i - d/4} after, w_j = theta^(-j / (d/4))."""
    d = x.shape[-1]
    omega = theta ** (-torch.arange(d // 4, dtype=torch.float64) / (d // 4))  # [d/4]
    angles = torch.cat([rows.double()[:, None] * omega, cols.double()[:, None] * omega], dim=1)  # [N, d/2]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def merge_lora(layer):
    """W' = W + (alpha / r) B A: one matrix, so the merged layer costs what the plain layer costs."""
    scale = layer.scaling["default"]  # alpha / r
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight  # [r, d_in], [d_out, r]
    return layer.base_layer.weight + scale * (b @ a)

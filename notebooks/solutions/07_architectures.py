"""Worked solutions to notebook 07's exercises (run through their checks by tests/test_exercises.py)."""

import math

import torch


def masked_joint_attention(q, k, v, text_mask):
    """Keys [text; image]: the caption's mask, then True for every image token; hidden keys get score
    -inf, so their softmax weight is exactly 0. A padding query still sees the real keys (no NaN)."""
    n_image = q.shape[2] - text_mask.shape[1]
    visible = torch.cat([text_mask, text_mask.new_ones(len(text_mask), n_image)], dim=1)  # [B, L + N]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # [B, H, S, S]
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))  # hide columns (keys), not rows
    return scores.softmax(-1) @ v


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

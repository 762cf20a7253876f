"""Worked solutions to notebook 06's exercises (run through their checks by tests/test_exercises.py)."""

import torch
import torch.nn.functional as F


def switch_from_scratch(layer, x):
    """Top-1 token choice: each token picks its best expert; an expert keeps its first C tokens."""
    b, n, d = x.shape
    capacity = layer.capacity(n)
    probs = (x @ layer.router.weight.T).softmax(dim=-1)  # [B, N, E]
    gate, pick = probs.max(dim=-1)  # [B, N]
    ex = layer.experts
    out = torch.zeros_like(x)
    for i in range(b):
        taken = [0] * layer.num_experts
        for t in range(n):  # in token order: the first to pick an expert keep their places
            e = pick[i, t].item()
            if taken[e] < capacity:
                taken[e] += 1
                h = F.gelu(x[i, t] @ ex.w1[e] + ex.b1[e, 0], approximate="tanh") @ ex.w2[e] + ex.b2[e, 0]
                out[i, t] = gate[i, t] * h
    return out


def balancing_loss(probs, picks):
    e = probs.shape[-1]
    f = F.one_hot(picks, e).float().mean(dim=(0, 1))  # share of tokens sent to each expert
    return e * (f * probs.mean(dim=(0, 1))).sum()


def moe_flops(n, d, mlp_hidden, num_experts, capacity_factor):
    tokens_per_expert = int(capacity_factor * n / num_experts)
    experts = 2 * 2 * num_experts * tokens_per_expert * d * mlp_hidden  # two matmuls per processed token
    router = 2 * n * d * num_experts
    return experts + router

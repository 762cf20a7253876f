"""Worked solutions to notebook 06's exercises (run through their checks by tests/test_exercises.py)."""

import torch
import torch.nn.functional as F


def dropped_share(picks, num_experts, capacity):
    """Top-1 token choice drops what an expert receives beyond its C places, in each image: the order of
    the tokens decides which are dropped, not how many."""
    load = F.one_hot(picks, num_experts).sum(dim=1)  # [B, E]: tokens per expert in each image
    return (load - capacity).clamp(min=0).sum().item() / picks.numel()


def unchosen_share(probs, capacity):
    """Each expert takes its top-C tokens of each image; a token no expert took is unchosen."""
    b, n, _ = probs.shape
    picked = probs.topk(capacity, dim=1).indices  # [B, C, E]: each expert's C tokens
    chosen = torch.zeros(b, n).scatter(1, picked.reshape(b, -1), 1.0)  # [B, N]
    return 1 - chosen.mean().item()


def moe_flops(n, d, mlp_hidden, num_experts, capacity_factor):
    tokens_per_expert = int(capacity_factor * n / num_experts)
    experts = 2 * 2 * num_experts * tokens_per_expert * d * mlp_hidden  # two matmuls per processed token
    router = 2 * n * d * num_experts
    return experts + router


def mask_and_restore(tokens, mask_ratio, generator):
    """A uniform K-subset per image (the K smallest of N random scores), sorted; then scattered back."""
    b, n, d = tokens.shape
    k = max(1, round(n * (1 - mask_ratio)))
    keep = torch.rand(b, n, generator=generator).argsort(dim=1)[:, :k].sort(dim=1).values  # [B, K]
    index = keep[..., None].expand(-1, -1, d)
    restored = torch.zeros_like(tokens).scatter(1, index, tokens.gather(1, index))  # [B, N, D]
    return keep, restored

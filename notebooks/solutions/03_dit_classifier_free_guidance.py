"""Worked solutions to notebook 03's exercises (run through their checks by tests/test_exercises.py)."""

import torch


def timestep_embedding_from_scratch(t, dim):
    half = dim // 2
    omega = 10_000.0 ** (-torch.arange(half, dtype=torch.float64) / half)  # [dim / 2], from 1 down to ~1e-4
    args = 1000.0 * t.double()[:, None] * omega[None]  # [B, dim / 2]: the level as a DDPM step index
    return torch.cat([args.cos(), args.sin()], dim=1).float()  # [B, dim]


def adaln_zero_(block):
    # the gates alpha come from the modulation's last linear: zero it and both gated branches are off;
    # the cross-attention branch has no gate, so its output projection starts at zero instead
    for layer in (block.adaLN_modulation[-1], block.cross_attn.out):
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)


def guided_mixture_x0(x_t, alpha, sigma, c, w, means, s):
    var_t = alpha**2 * s**2 + sigma**2  # x_t given class k: N(alpha mean_k, alpha² s² + sigma²)
    per_class = means[:, None] + alpha * s**2 / var_t * (x_t[None] - alpha * means[:, None])  # [K, N]
    posterior = (-(x_t[None] - alpha * means[:, None]) ** 2 / (2 * var_t)).softmax(0)  # p(k | x_t), [K, N]
    conditional, unconditional = per_class[c], (posterior * per_class).sum(0)
    return unconditional + w * (conditional - unconditional)

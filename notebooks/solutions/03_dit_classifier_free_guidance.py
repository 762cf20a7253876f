"""Worked solutions to notebook 03's exercises (run through their checks by tests/test_exercises.py)."""

import torch


def sincos_2d_from_scratch(h, w, dim):
    quarter = dim // 4
    omega = 10_000.0 ** (-torch.arange(quarter, dtype=torch.float64) / quarter)  # [dim / 4]
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")  # token k: (k // w, k % w)
    parts = []
    for pos in (rows.reshape(-1), cols.reshape(-1)):
        angles = pos[:, None] * omega[None]  # [h * w, dim / 4]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).float()  # [h * w, dim]: sin, cos of the row, then of the column


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

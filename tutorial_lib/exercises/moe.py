"""Notebook 06's exercises: token choice from scratch, the balancing loss, a MoE layer's FLOPs."""

from __future__ import annotations

import torch

from ..models.dit import DiTConfig, dit_cost
from ..models.moe import TokenChoiceMoE
from . import exercise_check


@exercise_check(refuses=[])
def check_switch_routing(answer) -> str | None:
    """answer(layer, x [B, N, D]) -> [B, N, D]: top-1 token choice with capacity, as TokenChoiceMoE(top_k=1)."""
    torch.manual_seed(0)
    for capacity_factor in (0.5, 1.0, 2.0):
        layer = TokenChoiceMoE(dim=16, hidden=32, num_experts=4, capacity_factor=capacity_factor, top_k=1,
                               aux_loss_coef=0.0)
        x = torch.randn(3, 12, 16)
        with torch.no_grad():
            want, got = layer(x), answer(layer, x)
        if got.shape != want.shape:
            return f"expected shape {tuple(want.shape)}, got {tuple(got.shape)}."
        if not torch.allclose(got, want, atol=1e-5):
            return (f"at capacity factor {capacity_factor} the output differs by up to "
                    f"{(got - want).abs().max().item():.2g}; did the first tokens (in order) keep their places?")
    return None


@exercise_check(refuses=[])
def check_balancing_loss(answer) -> str | None:
    """answer(probs [B, N, E], picks [B, N] expert index per token) -> L_aux = E sum_e f_e P_e (a scalar)."""
    g = torch.Generator().manual_seed(0)
    e = 4
    cases = {"uniform": torch.full((2, 8, e), 1 / e), "random": torch.rand(2, 8, e, generator=g).softmax(-1)}
    for name, probs in cases.items():
        picks = probs.argmax(-1) if name == "random" else torch.arange(8).remainder(e).expand(2, 8)
        f = torch.nn.functional.one_hot(picks, e).float().mean(dim=(0, 1))
        want = e * (f * probs.mean(dim=(0, 1))).sum()
        got = torch.as_tensor(answer(probs, picks), dtype=torch.float32)
        if got.numel() != 1 or not torch.allclose(got.reshape(()), want, atol=1e-6):
            return f"for the {name} router the loss should be {want.item():.4f}, got {got.reshape(-1)[:3].tolist()}."
    return None


@exercise_check(refuses=[])
def check_moe_flops(answer) -> str | None:
    """answer(n, d, mlp_hidden, num_experts, capacity_factor) -> forward FLOPs of one expert-choice MoE
    layer (router and experts, 2 per multiply-add), as `dit_cost` counts them."""
    for n, d, e, cf in [(16, 128, 4, 1.0), (256, 1024, 8, 2.0), (64, 64, 8, 0.5)]:
        cfg = DiTConfig(hidden_size=d, num_heads=4, depth=2, moe_every=2, num_experts=e, capacity_factor=cf,
                        input_size=(2 * int(n ** 0.5),) * 2)
        parts = dit_cost(cfg).flops_by_part
        want = parts["moe_experts"] + parts["moe_router"]
        got = answer(n, d, int(d * cfg.mlp_ratio), e, cf)
        if got != want:
            return f"for N = {n}, D = {d}, E = {e}, capacity factor {cf}: expected {want:,} FLOPs, got {got}."
    return None

"""Notebook 07's exercises: Flux's single-stream block, 2D RoPE, and folding a LoRA adapter into its
weight (with a prediction of how far training moved the weights)."""

from __future__ import annotations

import math

import torch

from ..models.layers import apply_rope, rope_2d
from ..models.mmdit import MMDiTConfig, SingleStreamBlock, joint_attention
from ..train.lora import load_lora
from . import exercise_check

try:  # peft's LoRA layer: its own merge is what exercise 3 re-derives
    from peft.tuners.lora.layer import Linear as _LoraLinear

    _PEFT_MERGE = [(_LoraLinear, "merge"), (_LoraLinear, "get_delta_weight")]
except ImportError:  # without peft (the `lora` extra) the exercise cannot run anyway
    _PEFT_MERGE = []


def _close(got, want, rtol=1e-5, atol=1e-5) -> bool:
    """float32-friendly: atol relative to the reference's scale."""
    got = torch.as_tensor(got)
    return got.shape == want.shape and bool(torch.isfinite(got).all()) and \
        torch.allclose(got.double(), want.double(), rtol=rtol, atol=atol * max(1.0, want.abs().max().item()))


def _attend_to(q, k, v, keys):
    """softmax(q k^T / sqrt(d)) v for one batch element, over the key indices `keys` only (the hidden keys
    are left out, not masked)."""
    k, v = k[:, keys], v[:, keys]  # [H, S_keys, d]
    return (q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1) @ v.double()


# ----------------------------------------------------------------------------- 1 · single-stream block
def _single_stream_reference(block, x, c, positions, mask, one_plus=True, tanh=True, rope=True, qk_norm=True):
    """Flux's single-stream block from its weights, in float64: the keys hidden by `mask` [B, S] are left
    out of each softmax, RoPE is the complex-number form at `positions` (rows, cols [S])."""
    f = torch.nn.functional
    x, c = x.double(), c.double()
    w = {name: p.detach().double() for name, p in block.named_parameters()}
    d, heads, m = x.shape[-1], block.heads, block.mlp_hidden
    shift, scale, gate = f.linear(f.silu(c), w["adaLN_modulation.1.weight"], w["adaLN_modulation.1.bias"]).chunk(3, -1)
    h = f.layer_norm(x, (d,), eps=1e-6) * ((1 + scale) if one_plus else scale)[:, None] + shift[:, None]
    qkv, u = f.linear(h, w["linear1.weight"], w["linear1.bias"]).split([3 * d, m], dim=-1)
    q, k, v = qkv.unflatten(-1, (3, heads, d // heads)).permute(2, 0, 3, 1, 4)  # 3 x [B, H, S, d/H]
    if qk_norm:
        rms = lambda t, g: t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * g  # noqa: E731
        q, k = rms(q, w["qk_norm.q_norm.weight"]), rms(k, w["qk_norm.k_norm.weight"])
    if rope:
        q, k = _rope_reference(q, *positions, 10_000.0), _rope_reference(k, *positions, 10_000.0)
    attn = torch.stack([_attend_to(q[b], k[b], v[b], mask[b].nonzero().flatten()) for b in range(len(x))])
    attn = attn.transpose(1, 2).flatten(2)  # [B, S, D]
    mlp = f.gelu(u, approximate="tanh" if tanh else "none")
    return x + gate[:, None] * f.linear(torch.cat([attn, mlp], dim=-1), w["linear2.weight"], w["linear2.bias"])


@exercise_check(refuses=[(SingleStreamBlock, "forward"), joint_attention])
def check_single_stream_block(answer) -> str | None:
    """answer(block: a SingleStreamBlock, x [B, L + N, D], c [B, D], rope (cos, sin) [L + N, d], mask [B, L + N])
    -> the block's output [B, L + N, D]."""
    g = torch.Generator().manual_seed(0)
    for cfg, (length, h, w) in ((MMDiTConfig(hidden_size=32, num_heads=2), (5, 3, 3)),
                                (MMDiTConfig(hidden_size=64, num_heads=4, mlp_ratio=2.0), (7, 2, 4))):
        block = SingleStreamBlock(cfg)
        with torch.no_grad():
            for p in block.parameters():  # every weight random, the modulation included (a fresh one is zero)
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]) + (p.dim() == 1) * 0.5)
        n, d = h * w, cfg.hidden_size
        x, c = torch.randn(2, length + n, d, generator=g), torch.randn(2, d, generator=g)
        cos, sin = rope_2d(h, w, cfg.head_dim)
        rope = (torch.cat([torch.ones(length, cfg.head_dim), cos]), torch.cat([torch.zeros(length, cfg.head_dim), sin]))
        rows = torch.cat([torch.zeros(length), torch.arange(n) // w]).double()  # the text at (0, 0)
        cols = torch.cat([torch.zeros(length), torch.arange(n) % w]).double()
        mask = torch.ones(2, length + n, dtype=torch.bool)
        mask[1, length - 2:length] = False  # the second caption has 2 padding tokens
        want = _single_stream_reference(block, x, c, (rows, cols), mask)
        with torch.no_grad():
            got = answer(block, x, c, rope, mask)
        if _close(got, want):
            continue
        got = torch.as_tensor(got)
        if got.shape != want.shape:
            return f"the output has the shape of x, {tuple(want.shape)}, got {tuple(got.shape)}."
        for problem, flags in (("modulate with (1 + scale): modulate(LN(x), shift, scale) = LN(x) (1 + scale) + shift.",
                                {"one_plus": False}),
                               ("the MLP branch's GELU is the tanh approximation, F.gelu(u, approximate=\"tanh\").",
                                {"tanh": False}),
                               ("rotate q and k by RoPE (apply_rope with the given cos, sin) after the QK-norm.",
                                {"rope": False}),
                               ("normalise each head's q and k with block.qk_norm (RMSNorm) before RoPE.",
                                {"qk_norm": False})):
            if _close(got, _single_stream_reference(block, x, c, (rows, cols), mask, **flags)):
                return problem
        if _close(got, _single_stream_reference(block, x, c, (rows, cols), torch.ones_like(mask))):
            return "the padding keys are attended to: hide the keys where mask is False (mask[:, None, None, :])."
        return (f"for D = {d}, {cfg.num_heads} heads: differs from the reference by up to "
                f"{(got.double() - want).abs().max().item():.2e}. linear1's output is [q, k, v, u] (3D, then the MLP's "
                "hidden width), the heads split as mmdit.split_heads does, and the gate multiplies linear2 of "
                "[attention output; GELU(u)], added to x.")
    return None


# ----------------------------------------------------------------------------- 2 · 2D RoPE
def _rope_reference(x, rows, cols, theta, row_only=False):
    """Channel pairs (x_i, x_{i + d/2}) as complex numbers z_i, multiplied by exp(i a_i): a_i = row * w_i
    for the first d/4 pairs, col * w_{i - d/4} for the next d/4, w_j = theta^(-j / (d/4))."""
    d = x.shape[-1]
    quarter = d // 4
    omega = theta ** (-torch.arange(quarter, dtype=torch.float64) / quarter)  # [d/4]
    rows, cols = torch.as_tensor(rows, dtype=torch.float64), torch.as_tensor(cols, dtype=torch.float64)
    second = rows if row_only else cols
    angles = torch.cat([rows[:, None] * omega, second[:, None] * omega], dim=1)  # [N, d/2]
    z = torch.complex(x[..., : d // 2].double(), x[..., d // 2:].double()) * torch.polar(torch.ones_like(angles), angles)
    return torch.cat([z.real, z.imag], dim=-1)


def _rope_adjacent(x, rows, cols, theta):
    """The same angles on adjacent pairs (x_{2i}, x_{2i+1}): RoFormer's and Flux's channel order."""
    d = x.shape[-1]
    order = torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)])  # evens then odds
    out = torch.empty_like(x, dtype=torch.float64)
    out[..., order] = _rope_reference(x[..., order], rows, cols, theta)
    return out


@exercise_check(refuses=[rope_2d, apply_rope])
def check_rope_2d(answer) -> str | None:
    """answer(x [..., N, d], rows [N], cols [N], theta) -> x with each channel pair rotated (2D RoPE)."""
    g = torch.Generator().manual_seed(1)
    for shape, theta in (((2, 3, 6, 8), 10_000.0), ((1, 2, 16, 16), 10_000.0), ((4, 5, 12), 100.0)):
        x = torch.randn(*shape, generator=g)
        n = shape[-2]
        rows, cols = torch.randint(0, 8, (n,), generator=g).float(), torch.randint(0, 8, (n,), generator=g).float()
        want = _rope_reference(x, rows, cols, theta)
        got = answer(x, rows, cols, theta)
        if not _close(got, want):
            got = torch.as_tensor(got)
            if got.shape != want.shape:
                return f"the output should have the shape of x, {tuple(want.shape)}, got {tuple(got.shape)}."
            if _close(got, _rope_reference(x, rows, cols, theta, row_only=True)):
                return ("every pair is rotated by the row: the first d/4 pairs turn with the row, the second d/4 "
                        "with the column.")
            if _close(got, _rope_reference(x, -rows, -cols, theta)):
                return "the rotation runs backwards: x_i' = x_i cos a - x_{i+d/2} sin a, x_{i+d/2}' = x_{i+d/2} cos a + x_i sin a."
            if _close(got, _rope_adjacent(x, rows, cols, theta)):
                return "the pairs here are (x_i, x_{i + d/2}), not adjacent channels (x_{2i}, x_{2i+1})."
            return (f"for x of shape {tuple(shape)} the result differs from the reference by up to "
                    f"{(got.double() - want).abs().max().item():.2e}. Check the frequencies w_j = theta^(-j / (d/4)), "
                    "j = 0 .. d/4 - 1, the same for rows and columns.")
    # What RoPE is for: a query-key product depends on the positions only through their difference.
    q, k = torch.randn(1, 10, 16, generator=g), torch.randn(1, 10, 16, generator=g)
    rows, cols = torch.randint(0, 6, (10,), generator=g).float(), torch.randint(0, 6, (10,), generator=g).float()
    scores = answer(q, rows, cols, 10_000.0) @ answer(k, rows, cols, 10_000.0).transpose(-1, -2)
    moved = answer(q, rows + 3, cols - 5, 10_000.0) @ answer(k, rows + 3, cols - 5, 10_000.0).transpose(-1, -2)
    if not _close(moved, scores, atol=1e-4):
        return "moving every token by (3, -5) changed the query-key products: they must depend on the difference only."
    return None


# ----------------------------------------------------------------------------- 3 · merging LoRA
def _lora_layers(model):
    """(name, layer) of the peft LoRA linear layers of `model`."""
    return [(name, m) for name, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]


def _lora_linear(d_in, d_out, rank, alpha, g):
    """A peft LoRA Linear with random W, b, A and a nonzero B (a trained adapter)."""
    from torch import nn

    from ..train.lora import LoRAConfig, add_lora

    holder = nn.Module()
    holder.proj = nn.Linear(d_in, d_out)
    add_lora(holder, LoRAConfig(rank=rank, alpha=alpha, target_modules=("proj",)))
    with torch.no_grad():
        for p in holder.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
    return holder.proj


@exercise_check(refuses=[load_lora, *_PEFT_MERGE])
def check_merge_lora(answer, prediction=None, model=None) -> str | None:
    """answer(layer: a peft LoRA Linear) -> the merged weight W + (alpha / r) B A [d_out, d_in]. With
    `model` (the notebook's adapted DiT), the correct answer then measures how far its adapter moved each
    weight, ||W' - W|| / ||W||, and prints that next to `prediction`."""
    g = torch.Generator().manual_seed(2)
    for d_in, d_out, rank, alpha in ((6, 5, 2, 3.0), (128, 64, 4, 8.0), (48, 96, 8, 4.0)):
        layer = _lora_linear(d_in, d_out, rank, alpha, g)
        w = layer.base_layer.weight.detach().clone()
        a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
        want = w.double() + (alpha / rank) * (b.double() @ a.double())
        with torch.no_grad():
            got = answer(layer)
        if not torch.equal(layer.base_layer.weight, w):
            return "the layer's own weight changed: return the merged weight as a new tensor, leave W as it is."
        got = torch.as_tensor(got)
        if not _close(got, want):
            if got.shape != want.shape:
                return (f"the merged weight has W's shape [d_out, d_in] = {tuple(want.shape)}, got {tuple(got.shape)}: "
                        "B [d_out, r] @ A [r, d_in].")
            if _close(got, w.double() + b.double() @ a.double()):
                return f"the update is scaled by alpha / r (here {alpha:g} / {rank} = {alpha / rank:g}): W + (alpha / r) B A."
            return (f"for d_in {d_in}, d_out {d_out}, rank {rank}: differs from W + (alpha / r) B A by up to "
                    f"{(got.double() - want).abs().max().item():.2e}.")
        x = torch.randn(7, d_in, generator=g)
        with torch.no_grad():
            same = torch.nn.functional.linear(x, got.to(x.dtype), layer.base_layer.bias)
            if not _close(same, layer(x).double(), atol=1e-4):
                return "the merged layer does not compute what the adapted layer computes."
    if model is not None:
        with torch.no_grad():
            shares = sorted(((answer(m).double() - m.base_layer.weight.double()).norm()
                             / m.base_layer.weight.double().norm()).item() for _, m in _lora_layers(model))
        print(f"your prediction: {prediction}" if prediction is not None else "no prediction made (my_prediction is None)")
        print(f"measured with your merge_lora over the {len(shares)} adapted layers: ||W' - W|| / ||W|| "
              f"largest {shares[-1]:.3f}, median {shares[len(shares) // 2]:.3f}, smallest {shares[0]:.3f}")
    return None

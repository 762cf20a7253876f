"""Notebook 07's exercises: MMDiT's joint attention with the caption's padding hidden, 2D RoPE, and
folding a LoRA adapter into its weight (with a prediction of how far training moved the weights)."""

from __future__ import annotations

import math

import torch

from ..models.layers import apply_rope, rope_2d
from ..models.mmdit import joint_attention, joint_mask
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


# ----------------------------------------------------------------------------- 1 · joint attention
def _attend_to(q, k, v, keys):
    """softmax(q k^T / sqrt(d)) v for one batch element, over the key indices `keys` only (the
    reference: the hidden keys are left out, not masked)."""
    k, v = k[:, keys], v[:, keys]  # [H, S_keys, d]
    return (q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1) @ v.double()


def _joint_reference(q, k, v, visible):
    """The joint attention computed batch element by batch element over the keys where visible [B, S]."""
    return torch.stack([_attend_to(q[b], k[b], v[b], visible[b].nonzero().flatten()) for b in range(len(q))])


@exercise_check(refuses=[joint_mask, joint_attention])
def check_masked_joint_attention(answer) -> str | None:
    """answer(q, k, v [B, H, L + N, d] over [text; image], text_mask [B, L] bool) -> [B, H, L + N, d]."""
    g = torch.Generator().manual_seed(0)
    for batch, heads, length, n, d in ((3, 2, 5, 4, 8), (2, 4, 7, 16, 16), (4, 1, 3, 9, 4)):
        q, k, v = (torch.randn(batch, heads, length + n, d, generator=g) for _ in range(3))
        text_mask = torch.ones(batch, length, dtype=torch.bool)
        text_mask[1, length // 2:] = False  # padding at the end of the second caption
        if batch > 2:
            text_mask[2, 1:] = False  # a caption of one real token
        images = text_mask.new_ones(batch, n)
        visible = torch.cat([text_mask, images], dim=1)  # [B, L + N]: the caption's real tokens, every image token
        want = _joint_reference(q, k, v, visible)
        got = answer(q, k, v, text_mask)
        if _close(got, want):
            noisy_k, noisy_v = k.clone(), v.clone()
            b_hidden, s_hidden = (~visible).nonzero(as_tuple=True)
            noisy_k[b_hidden, :, s_hidden], noisy_v[b_hidden, :, s_hidden] = 100.0, -100.0
            if not _close(answer(q, noisy_k, noisy_v, text_mask), want):
                return ("the output changes when the padding tokens' keys and values change: what sits behind "
                        "the mask must not reach any token.")
            continue
        got = torch.as_tensor(got)
        if got.shape != want.shape:
            return f"the output should have the shape of q, {tuple(want.shape)}, got {tuple(got.shape)}."
        if not torch.isfinite(got).all():
            return ("NaN in the output: a whole row of scores was hidden. Hide the padding tokens as keys (the "
                    "last dimension of the scores, mask[:, None, None, :]), never as queries: a padding query "
                    "still attends to the real tokens.")
        if _close(got, _joint_reference(q, k, v, torch.ones_like(visible))):
            return "the padding keys are still attended to: hide the keys where text_mask is False."
        if _close(got, _joint_reference(q, k, v, torch.cat([text_mask, ~images], dim=1))):
            return ("the image tokens are hidden too: they are never padding, so extend the caption's mask with "
                    "True for the N image tokens.")
        if _close(got, _joint_reference(q, k, v, torch.cat([images, text_mask], dim=1))):
            return "the sequence is [text; image]: the caption's mask comes first, then the N image tokens."
        return (f"for L = {length} text and N = {n} image tokens, the outputs differ from the reference by up to "
                f"{(got.double() - want).abs().max().item():.2e}. Scale the scores by 1 / sqrt(d) and take the softmax "
                "over the keys (the last dimension).")
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

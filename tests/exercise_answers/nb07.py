"""Notebook 07's exercises: the shortcut and a planted bug for each."""

import torch
import torch.nn.functional as F

from tutorial_lib.models.layers import apply_rope
from tutorial_lib.exercises import zoo

from . import Exercise

NOTEBOOK = "07_architectures"


def _library_block(block, x, c, rope, mask):
    return block(x, c, rope, mask)


def _exact_gelu(block, x, c, rope, mask):  # the MLP branch with exact GELU, not Flux's tanh approximation
    d = x.shape[-1]
    shift, scale, gate = block.adaLN_modulation(c).chunk(3, dim=-1)
    h = F.layer_norm(x, (d,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
    qkv, u = block.linear1(h).split([3 * d, block.mlp_hidden], dim=-1)
    q, k, v = qkv.unflatten(-1, (3, block.heads, -1)).permute(2, 0, 3, 1, 4)
    q, k = apply_rope(block.qk_norm.q_norm(q), *rope), apply_rope(block.qk_norm.k_norm(k), *rope)
    attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :]).transpose(1, 2).flatten(2)
    return x + gate[:, None] * block.linear2(torch.cat([attn, F.gelu(u)], dim=-1))


def _library_rope(x, rows, cols, theta=10_000.0):  # the library's rotation, given the angles
    d = x.shape[-1]
    omega = theta ** (-torch.arange(d // 4, dtype=torch.float64) / (d // 4))
    angles = torch.cat([rows.double()[:, None] * omega, cols.double()[:, None] * omega], dim=1).repeat(1, 2)
    return apply_rope(x, angles.cos().float(), angles.sin().float())


def _row_only(x, rows, cols, theta=10_000.0):  # forgets the column: every pair turns with the row
    d = x.shape[-1]
    omega = theta ** (-torch.arange(d // 4, dtype=torch.float64) / (d // 4))
    angles = torch.cat([rows.double()[:, None] * omega, rows.double()[:, None] * omega], dim=1)
    cos, sin = angles.cos().float(), angles.sin().float()
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _peft_merge(layer):  # peft's own: merge in place, read the weight, unmerge
    layer.merge()
    merged = layer.base_layer.weight.clone()
    layer.unmerge()
    return merged


def _unscaled(layer):  # forgets alpha / r
    return layer.base_layer.weight + layer.lora_B["default"].weight @ layer.lora_A["default"].weight


EXERCISES = [
    Exercise(zoo.check_single_stream_block, "single_stream", shortcut=_library_block, bug=_exact_gelu, hint="tanh"),
    Exercise(zoo.check_rope_2d, "rope_2d_rotate", shortcut=_library_rope, bug=_row_only, hint="with the column"),
    Exercise(zoo.check_merge_lora, "merge_lora", shortcut=_peft_merge, bug=_unscaled, hint="alpha / r", predicts=True),
]

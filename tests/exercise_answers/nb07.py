"""Notebook 07's exercises: the shortcut and a planted bug for each."""

import math

import torch

from tutorial_lib.models.layers import apply_rope
from tutorial_lib.models.mmdit import joint_attention, joint_mask
from tutorial_lib.exercises import zoo

from . import Exercise

NOTEBOOK = "07_architectures"


def _library_joint_attention(q, k, v, text_mask):
    no_rope = (torch.ones(q.shape[2], q.shape[3]), torch.zeros(q.shape[2], q.shape[3]))
    out = joint_attention(q, k, v, no_rope, joint_mask(text_mask, q.shape[2] - text_mask.shape[1]))
    return out.unflatten(-1, (q.shape[1], -1)).transpose(1, 2)


def _padding_hidden_as_queries(q, k, v, text_mask):  # masks rows (queries): a padding query's row is all -inf
    visible = torch.cat([text_mask, text_mask.new_ones(len(text_mask), q.shape[2] - text_mask.shape[1])], dim=1)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~visible[:, None, :, None], float("-inf"))
    return scores.softmax(-1) @ v


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
    Exercise(zoo.check_masked_joint_attention, "masked_joint_attention", shortcut=_library_joint_attention,
             bug=_padding_hidden_as_queries, hint="as keys"),
    Exercise(zoo.check_rope_2d, "rope_2d_rotate", shortcut=_library_rope, bug=_row_only, hint="with the column"),
    Exercise(zoo.check_merge_lora, "merge_lora", shortcut=_peft_merge, bug=_unscaled, hint="alpha / r", predicts=True),
]

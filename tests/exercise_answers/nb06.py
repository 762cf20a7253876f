"""Notebook 06's exercises: the shortcut and a planted bug for each."""

import torch
import torch.nn.functional as F

from tutorial_lib.exercises import moe
from tutorial_lib.models.dit import DiTConfig, dit_cost
from tutorial_lib.models.masking import random_keep, restore_tokens, take_tokens
from tutorial_lib.models.moe import ExpertChoiceMoE, TokenChoiceMoE

from . import Exercise

NOTEBOOK = "06_moe_at_scale"


def _library_dropped_share(picks, num_experts, capacity):  # the library layer, its router made to pick `picks`
    n = picks.shape[1]
    layer = TokenChoiceMoE(dim=num_experts, hidden=4, num_experts=num_experts, capacity_factor=capacity * num_experts / n,
                           top_k=1, aux_loss_coef=0.0)
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(num_experts))
        layer(F.one_hot(picks, num_experts).float() * 10)
    return layer.stats["dropped"].item()


def _dropped_share_per_batch(picks, num_experts, capacity):  # capacity counted over the whole batch, not per image
    load = F.one_hot(picks, num_experts).sum(dim=(0, 1))
    return (load - capacity).clamp(min=0).sum().item() / picks.numel()


def _library_unchosen_share(probs, capacity):  # the library layer, its router made to score `probs`
    b, n, e = probs.shape
    layer = ExpertChoiceMoE(dim=e, hidden=4, num_experts=e, capacity_factor=capacity * e / n)
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(e))
        layer(probs.log())
    return layer.stats["unchosen"].item()


def _unchosen_top_experts(probs, capacity):  # each token's top experts instead of each expert's top tokens
    picked = probs.topk(min(capacity, probs.shape[2]), dim=2).indices
    return 1 - F.one_hot(picked, probs.shape[2]).amax(dim=2).any(dim=2).float().mean().item()


def _library_moe_flops(n, d, mlp_hidden, num_experts, capacity_factor):
    cfg = DiTConfig(hidden_size=d, num_heads=4, depth=2, moe_every=2, num_experts=num_experts,
                    capacity_factor=capacity_factor, mlp_ratio=mlp_hidden / d, input_size=(2 * int(n ** 0.5),) * 2)
    parts = dit_cost(cfg).flops_by_part
    return parts["moe_experts"] + parts["moe_router"]


def _moe_flops_all_tokens(n, d, mlp_hidden, num_experts, capacity_factor):  # every expert on every token
    return 2 * n * d * num_experts + 2 * 2 * num_experts * n * d * mlp_hidden


def _library_mask_and_restore(tokens, mask_ratio, generator):
    keep = random_keep(tokens.shape[0], tokens.shape[1], mask_ratio, generator)
    return keep, restore_tokens(take_tokens(tokens, keep), keep, tokens.shape[1])


def _unsorted_mask(tokens, mask_ratio, generator):  # the K first of a permutation, left in random order
    b, n, d = tokens.shape
    k = max(1, round(n * (1 - mask_ratio)))
    keep = torch.rand(b, n, generator=generator).argsort(dim=1)[:, :k]
    index = keep[..., None].expand(-1, -1, d)
    return keep, torch.zeros_like(tokens).scatter(1, index, tokens.gather(1, index))


EXERCISES = [
    Exercise(moe.check_dropped_share, "dropped_share", shortcut=_library_dropped_share, bug=_dropped_share_per_batch,
             hint="per image", predicts=True),
    Exercise(moe.check_unchosen_share, "unchosen_share", shortcut=_library_unchosen_share, bug=_unchosen_top_experts,
             hint="top C over the tokens", predicts=True),
    Exercise(moe.check_moe_flops, "moe_flops", shortcut=_library_moe_flops, bug=_moe_flops_all_tokens,
             hint="only its C tokens"),
    Exercise(moe.check_mask_and_restore, "mask_and_restore", shortcut=_library_mask_and_restore, bug=_unsorted_mask,
             hint="sort the kept indices"),
]

"""Notebook 07's exercises: what adaLN-single saves, and how many weights a LoRA adapter trains."""

from __future__ import annotations

import copy
import dataclasses

from ..models.dit import DiT, DiTConfig, dit_cost
from . import exercise_check


@exercise_check(refuses=[])
def check_adaln_single_saving(answer) -> str | None:
    """answer(cfg: DiTConfig) -> the parameters adaLN-single removes from that DiT (an int)."""
    for cfg in (DiTConfig(), DiTConfig(hidden_size=384, depth=12, num_heads=6, cross_attention=False),
                DiTConfig(hidden_size=1152, depth=28, num_heads=16)):
        want = dit_cost(cfg).params - dit_cost(dataclasses.replace(cfg, adaln_single=True)).params
        got = answer(cfg)
        if got != want:
            return (f"for D = {cfg.hidden_size}, depth {cfg.depth}: adaLN-single saves {want:,} parameters, "
                    f"got {got}. Count each block's adaLN MLP and the final layer's, less what adaLN-single adds.")
    return None


@exercise_check(refuses=[])
def check_lora_parameters(answer) -> str | None:
    """answer(denoiser, rank, targets) -> the weights a LoRA adapter of that rank on those layers trains."""
    from ..train.lora import LoRAConfig, add_lora, trainable_share

    for rank, targets in [(4, ("cross_attn.q", "cross_attn.kv", "cross_attn.out")), (8, ("attn.q", "mlp.0"))]:
        denoiser = DiT(DiTConfig(text_dim=384))
        want = trainable_share(add_lora(copy.deepcopy(denoiser), LoRAConfig(rank, target_modules=targets)))[0]
        got = answer(denoiser, rank, targets)
        if got != want:
            return (f"rank {rank} on {list(targets)}: the adapter trains {want:,} weights, got {got}. Each adapted "
                    f"linear layer d_in -> d_out gains A [r, d_in] and B [d_out, r].")
    return None

"""Scale on paper: a DiT's memory per GPU under FSDP, and the GPU-hours and cost of a training run.

Memory per GPU (bytes), for P parameters sharded over W GPUs with FSDP2 (`distributed.shard`) and AdamW:

    states       (4 + 4 + 8 + 4) P / W     float32 weights, gradients, Adam's two moments, EMA
    gathered     2 x 2 P_block             one block's bf16 weights in use, the next one prefetched
    activations  bf16, B images of n tokens of width D per GPU, after Korthikanti et al. (2022,
                 "Reducing Activation Recomputation in Large Transformer Models"), whose per-layer
                 34 s b h bytes keeps no attention matrix (SDPA's fused kernels recompute it):
                   without checkpointing  depth x 34 B n D
                   with checkpointing     depth x 2 B n D (each block's input) + 34 B n D (one block)

An estimate of what the model needs, not a measurement: the CUDA caching allocator's slack, NCCL's
buffers and the text encoder come on top (a frozen encoder's embeddings are cached: text/embedding_cache).
MoE blocks are counted as dense ones, since their experts process capacity_factor x n tokens in all.

Cost: training FLOPs are 3 x the forward FLOPs per image (the backward costs about twice the
forward; Kaplan et al., 2020), so a run over I images takes 3 I F / (peak x MFU) GPU-seconds.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..models.dit import DiTConfig, dit_cost
from ..models.masking import num_kept

GIB = 2**30
STATE_BYTES_PER_PARAM = 4 + 4 + 8 + 4  # float32 weights, gradients, AdamW's m and v, EMA


@dataclass(frozen=True)
class Memory:
    """Bytes per GPU, by part (`fsdp_memory`)."""

    states: float
    gathered: float
    activations: float

    @property
    def total(self) -> float:
        return self.states + self.gathered + self.activations


def fsdp_memory(config: DiTConfig, world_size: int, batch_per_gpu: int, input_size: tuple[int, int] | None = None,
                mask_ratio: float = 0.0, activation_checkpointing: bool = True) -> Memory:
    """The module docstring's estimate for `config` on `world_size` GPUs with `batch_per_gpu` images each."""
    if world_size < 1 or batch_per_gpu < 1:
        raise ValueError(f"Need world_size >= 1 and batch_per_gpu >= 1, got {world_size}, {batch_per_gpu}.")
    cost = dit_cost(config, input_size, mask_ratio=mask_ratio)
    block_params = max(_block_params(config, i) for i in range(config.depth))
    (h, w), p = input_size or config.input_size, config.patch_size
    n = (h // p) * (w // p)
    tokens = [n] * config.mixer_depth + [num_kept(n, mask_ratio)] * config.depth  # per block
    per_token = 2 * batch_per_gpu * config.hidden_size  # bytes of one token's bf16 activations, whole batch
    if activation_checkpointing:
        activations = sum(per_token * t for t in tokens) + 17 * per_token * max(tokens)
    else:
        activations = sum(17 * per_token * t for t in tokens)
    return Memory(STATE_BYTES_PER_PARAM * cost.params / world_size, 2 * 2 * block_params, activations)


def _block_params(config: DiTConfig, index: int) -> int:
    import torch

    from ..models.dit import DiTBlock

    with torch.device("meta"):
        return sum(t.numel() for t in DiTBlock(config, config.is_moe(index)).parameters())


def gpu_hours(forward_flops_per_image: float, images: float, peak_flops: float, mfu: float) -> float:
    """GPU-hours to train on `images` images at `mfu` of `peak_flops` (FLOP/s): 3 I F / (peak MFU) / 3600."""
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu is a fraction of the peak, in (0, 1]; got {mfu}.")
    return 3 * forward_flops_per_image * images / (peak_flops * mfu) / 3600

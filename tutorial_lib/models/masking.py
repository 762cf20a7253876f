"""Patch masking for cheaper diffusion-transformer training (MaskDiT, Zheng et al., 2024; deferred
masking in micro_diffusion, Sehwag et al., 2024).

A transformer's cost grows with its tokens, so training on a random 25% of each image's patches
costs about a quarter per block. The DiT's blocks then see only the kept tokens, and the loss is
computed on the kept patches only: the network never has to guess a patch it was not shown.
MaskDiT goes further: learned mask tokens fill the masked places, a small decoder runs on all
patches, and an MAE loss reconstructs the masked patches of the noisy input. This variant has no
decoder, no mask token (zeros, which the loss ignores) and no reconstruction loss.

Masking every patch's token right after the patch embedding hides most of the image from every
block. Deferred masking runs a light patch-mixer (a few transformer blocks) on all N tokens first,
so each kept token already carries information about the patches that are then dropped. A short
unmasked fine-tune at the end closes the gap between training on 25% of the tokens and sampling on
all of them.

    keep   = random_keep(B, N, mask_ratio)      [B, K], K = round(N (1 - mask_ratio)), ascending
    tokens = mixer(tokens)                      [B, N, D]
    tokens = take_tokens(tokens, keep)          [B, K, D]   -> the DiT's blocks
    tokens = restore_tokens(tokens, keep, N)    [B, N, D]   zeros where masked; the loss ignores them
    loss   = mean over kept pixels (keep_pixels) of the objective's squared error

Kept indices are sorted, so the kept tokens keep their raster order and `restore_tokens` puts each
back where it came from.
"""

from __future__ import annotations

import torch


def num_kept(num_tokens: int, mask_ratio: float) -> int:
    """K = round(N (1 - mask_ratio)) tokens kept of N (at least 1)."""
    check_mask_ratio(mask_ratio)
    return max(1, round(num_tokens * (1 - mask_ratio)))


def check_mask_ratio(mask_ratio: float):
    if not 0 <= mask_ratio < 1:
        raise ValueError(f"mask_ratio is the fraction of patches dropped, in [0, 1); got {mask_ratio}.")


def random_keep(batch_size: int, num_tokens: int, mask_ratio: float,
                generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Indices of the K kept tokens of each item, drawn uniformly without replacement and sorted:
    [B, K] (long). Drawn from `generator` on its device (a trainer's lives on its GPU: no copy), so a
    run resumes to the same masks; then moved to `device` if it differs."""
    k = num_kept(num_tokens, mask_ratio)
    scores = torch.rand(batch_size, num_tokens, generator=generator,
                        device=None if generator is None else generator.device)  # [B, N]
    return scores.argsort(dim=1)[:, :k].sort(dim=1).values.to(device)  # [B, K]


def take_tokens(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The kept tokens: x [B, N, D], keep [B, K] -> [B, K, D]."""
    return x.gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))


def restore_tokens(x: torch.Tensor, keep: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Kept tokens back in their places: x [B, K, D], keep [B, K] -> [B, N, D], zeros where masked."""
    b, _, d = x.shape
    return x.new_zeros(b, num_tokens, d).scatter(1, keep[..., None].expand(-1, -1, d), x)


def keep_pixels(keep: torch.Tensor, grid: tuple[int, int], patch_size: int) -> torch.Tensor:
    """The loss mask of the kept patches: keep [B, K] on an h x w grid of p x p patches -> [B, 1, h p, w p],
    1 on the kept patches' pixels, 0 elsewhere."""
    (h, w), p = grid, patch_size
    flat = torch.zeros(keep.shape[0], h * w, device=keep.device).scatter(1, keep, 1.0)  # [B, N]
    return flat.view(-1, 1, h, w).repeat_interleave(p, dim=2).repeat_interleave(p, dim=3)  # [B, 1, H, W]

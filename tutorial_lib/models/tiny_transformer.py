"""Notebook 01's denoiser: a tiny transformer over latent pixels, conditioned on caption tokens.

Each of the h*w latent pixels (C channels) is one token. Every block adds the noise-level
embedding to the tokens, then applies pre-norm self-attention, cross-attention to the caption
tokens, and an MLP, each as a residual. The output is x0_hat, the model's estimate of the clean
latent (x0-prediction).

Activation checkpointing and FSDP units as the DiT's (models/dit.py): `model.gradient_checkpointing = True`
recomputes each block in backward, inside the block; `fsdp_units()` are the blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..text.word_encoder import TextEmbedding
from .dit import BlockCheckpointing, checkpointed
from .layers import MLP, Attention, sincos_2d, timestep_embedding


@dataclass
class TinyTransformerConfig:
    latent_channels: int = 4
    latent_size: int = 8
    dim: int = 128
    depth: int = 4
    heads: int = 4
    text_dim: int = 128


# Named sizes: "cpu" trains in minutes on a laptop CPU; "base" is the shipped model's size.
PRESETS = {
    "cpu": TinyTransformerConfig(dim=64, depth=4, heads=4, text_dim=64),
    "base": TinyTransformerConfig(dim=128, depth=6, heads=4, text_dim=128),
}


def preset(name: str) -> TinyTransformerConfig:
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; choose one of {', '.join(PRESETS)}.")
    return TinyTransformerConfig(**vars(PRESETS[name]))


class Block(nn.Module):
    gradient_checkpointing = False  # True: recompute in backward (dit.checkpointed); the model's switch sets it

    def __init__(self, cfg: TinyTransformerConfig):
        super().__init__()
        self.time = nn.Linear(cfg.dim, cfg.dim)
        self.norm1, self.self_attn = nn.LayerNorm(cfg.dim), Attention(cfg.dim, cfg.heads)
        self.norm2, self.cross_attn = nn.LayerNorm(cfg.dim), Attention(cfg.dim, cfg.heads, cfg.text_dim)
        self.norm3, self.mlp = nn.LayerNorm(cfg.dim), MLP(cfg.dim)

    @checkpointed
    def forward(self, x, temb, text: TextEmbedding):
        x = x + self.time(temb)[:, None]  # [B, N, D] + [B, 1, D]
        x = x + self.self_attn(self.norm1(x))
        x = x + self.cross_attn(self.norm2(x), text.tokens, text.mask)
        return x + self.mlp(self.norm3(x))


class TinyTransformer(BlockCheckpointing, nn.Module):
    def __init__(self, config: TinyTransformerConfig | None = None):
        super().__init__()
        self.config = cfg = config or TinyTransformerConfig()
        self.patch_in = nn.Linear(cfg.latent_channels, cfg.dim)
        self.register_buffer("pos", sincos_2d(cfg.latent_size, cfg.latent_size, cfg.dim), persistent=False)
        self.time_mlp = nn.Sequential(nn.Linear(cfg.dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm_out = nn.LayerNorm(cfg.dim)
        self.patch_out = nn.Linear(cfg.dim, cfg.latent_channels)

    def fsdp_units(self) -> list[nn.Module]:
        """The modules FSDP shards one by one (train/distributed.py): the blocks."""
        return list(self.blocks)

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: TextEmbedding) -> torch.Tensor:
        """x_t [B, C, h, w], noise level t [B] in [0, 1], caption tokens -> x0_hat [B, C, h, w]."""
        cfg = self.config
        expected = (cfg.latent_channels, cfg.latent_size, cfg.latent_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"Expected latents [B, {', '.join(map(str, expected))}], got {tuple(x.shape)}.")
        if t.shape != (x.shape[0],) or text.tokens.shape[0] != x.shape[0]:
            raise ValueError(f"Batch sizes differ: x {x.shape[0]}, t {tuple(t.shape)}, "
                             f"text {text.tokens.shape[0]}.")
        b, c, h, w = x.shape
        tokens = self.patch_in(x.flatten(2).transpose(1, 2)) + self.pos  # [B, h*w, D]
        temb = self.time_mlp(timestep_embedding(t, cfg.dim).to(tokens.dtype))  # float32 sinusoids -> [B, D]
        for block in self.blocks:
            tokens = block(tokens, temb, text)
        out = self.patch_out(self.norm_out(tokens))  # [B, h*w, C]
        return out.transpose(1, 2).reshape(b, c, h, w)

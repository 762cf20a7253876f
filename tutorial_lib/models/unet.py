"""Notebook 07's convolutional denoiser: diffusers' UNet2DConditionModel behind the course's interface.

The U-Net (Ronneberger et al., 2015) as DDPM (Ho et al., 2020) and latent diffusion (Rombach et al.,
2022: Stable Diffusion) use it: residual convolution blocks at a few resolutions, halving the latent on
the way down and doubling it on the way up, with skip connections between levels of equal resolution;
at the levels of type CrossAttn*, transformer blocks whose cross-attention reads the caption tokens.
This file does not rewrite it: `UNet` builds diffusers' model from a small `UNetConfig` and adapts the call

    F(x [B, C, H, W], t [B] in [0, 1], text) = unet(x, timestep = 1000 t,
                                                   encoder_hidden_states = text.tokens,
                                                   encoder_attention_mask = text.mask,
                                                   class_labels = the mean of the real caption tokens).

- Time: diffusers' sinusoidal `Timesteps` (flip_sin_to_cos, no frequency shift) of 1000 t is our
  `layers.timestep_embedding(t)`: t in [0, 1] scaled to the 0..1000 range of a 1000-step DDPM schedule,
  for which that embedding's frequencies were chosen.
- Mask: diffusers turns the mask into a bias of -10000 on the padding keys; their softmax weight
  underflows to exactly 0, so whatever sits behind the mask does not change the output.
- Pooled text (pooled_text=True): the mean of the real caption tokens goes through diffusers'
  "projection" class embedding and is added to the time embedding, as DiT's y_embedder (SDXL adds its
  pooled text embedding to the time embedding the same way).
- Zero output at init: conv_out is zero-initialised, as the U-Nets of ADM (Dhariwal & Nichol, 2021)
  and latent diffusion zero their output convolution. A fresh UNet outputs exactly 0, the
  parametrization's "no correction", like a fresh DiT; its gradient reaches conv_out at once (the
  features feeding it are not 0), so it learns. diffusers keeps PyTorch's default init there, since its
  UNets load trained weights; nothing else in its model depends on the init.

Saving: a pipeline saves the UNet like our other denoisers (transformer/config.json with this file's
config, and diffusion_pytorch_model.safetensors with keys "unet.*"). `pipe.transformer.unet` is a plain
diffusers model: `pipe.transformer.unet.save_pretrained(folder)` writes diffusers' own folder, which
`diffusers.UNet2DConditionModel.from_pretrained(folder)` reads without tutorial_lib.

Activation checkpointing: `model.gradient_checkpointing = True` (the Trainer's activation_checkpointing)
switches diffusers' own on (`enable_gradient_checkpointing`): each down, mid and up block checkpoints
its residual blocks and transformers from inside its own forward. FSDP (train/distributed.py) shards
those blocks as units (`fsdp_units()`), so every checkpoint sits inside a unit, after FSDP's pre-forward
hook has cast the unit's inputs (as models/dit.py explains); the rest (conv_in, the time and pooled-text
embeddings, the output norm and conv_out) is the root.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from diffusers import UNet2DConditionModel
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ..text.base import TextEmbedding, masked_mean
from .dit import DiTCost
from .layers import check_denoiser_inputs

DOWN_BLOCKS = ("DownBlock2D", "CrossAttnDownBlock2D")
UP_BLOCKS = ("UpBlock2D", "CrossAttnUpBlock2D")


@dataclass
class UNetConfig:
    """A UNet's shape: one entry per resolution level in block_out_channels and the block types."""

    in_channels: int = 4  # latent channels C; the output has the same
    input_size: tuple[int, int] = (8, 8)  # the latent (H, W): each divisible by 2^(levels - 1)
    block_out_channels: tuple[int, ...] = (32, 48, 64)  # width per level; each level but the last halves H, W
    # As Stable Diffusion's: no attention at the highest resolution (8x8 here), cross-attention below it.
    down_block_types: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    layers_per_block: int = 1  # residual blocks per level on the way down (one more on the way up)
    attention_head_dim: int | tuple[int, ...] = 16  # channels per attention head: one for all levels, or per level
    transformer_layers_per_block: int = 1
    norm_num_groups: int = 16  # GroupNorm groups: must divide every width
    text_dim: int = 128  # D_text of the caption tokens (the text encoder's width)
    pooled_text: bool = True  # add the projected mean caption token to the time embedding

    def __post_init__(self):
        # JSON turns tuples into lists; an int means a square latent or one head width for every level.
        size, levels = self.input_size, len(self.block_out_channels)
        self.input_size = (size, size) if isinstance(size, int) else tuple(size)
        self.block_out_channels = tuple(self.block_out_channels)
        self.down_block_types, self.up_block_types = tuple(self.down_block_types), tuple(self.up_block_types)
        if not isinstance(self.attention_head_dim, int):
            self.attention_head_dim = tuple(self.attention_head_dim)
        if levels < 1 or len(self.down_block_types) != levels or len(self.up_block_types) != levels \
                or len(self.head_dims) != levels:
            raise ValueError(f"block_out_channels {self.block_out_channels}, down_block_types, up_block_types and "
                             f"attention_head_dim need one entry per level, got {len(self.down_block_types)}, "
                             f"{len(self.up_block_types)} and {len(self.head_dims)} for {levels} levels.")
        unknown = [b for b in self.down_block_types if b not in DOWN_BLOCKS] + \
                  [b for b in self.up_block_types if b not in UP_BLOCKS]
        if unknown:
            raise ValueError(f"Unknown block types {unknown}; down blocks are {', '.join(DOWN_BLOCKS)}, up blocks "
                             f"{', '.join(UP_BLOCKS)}.")
        factor = self.downsampling
        if len(self.input_size) != 2 or any(s < 1 or s % factor for s in self.input_size):
            raise ValueError(f"input_size {self.input_size} must be (H, W), each divisible by {factor}: the "
                             f"{levels} levels of block_out_channels {self.block_out_channels} halve the latent "
                             f"{levels - 1} times. Use fewer levels or a larger latent.")
        bad = [(c, self.norm_num_groups) for c in self.block_out_channels if c % self.norm_num_groups]
        bad += [(c, h) for c, h in zip(self.block_out_channels, self.head_dims) if c % h]
        if bad:
            raise ValueError(f"Every width in block_out_channels {self.block_out_channels} must be divisible by "
                             f"norm_num_groups {self.norm_num_groups} and by its level's attention_head_dim "
                             f"{self.attention_head_dim}; (width, divisor) fail: {bad}.")

    @property
    def head_dims(self) -> tuple[int, ...]:
        """The attention head width of each level."""
        head = self.attention_head_dim
        return (head,) * len(self.block_out_channels) if isinstance(head, int) else head

    @property
    def downsampling(self) -> int:
        """How much the lowest level is smaller than the latent: 2^(levels - 1)."""
        return 2 ** (len(self.block_out_channels) - 1)

    def diffusers_kwargs(self) -> dict:
        """UNet2DConditionModel's arguments for this config."""
        pooled = self.pooled_text
        return dict(
            sample_size=self.input_size, in_channels=self.in_channels, out_channels=self.in_channels,
            down_block_types=self.down_block_types, up_block_types=self.up_block_types,
            block_out_channels=self.block_out_channels, layers_per_block=self.layers_per_block,
            # diffusers' legacy name: its attention_head_dim holds the number of heads of each level.
            attention_head_dim=tuple(c // h for c, h in zip(self.block_out_channels, self.head_dims)),
            transformer_layers_per_block=self.transformer_layers_per_block, norm_num_groups=self.norm_num_groups,
            cross_attention_dim=self.text_dim, class_embed_type="projection" if pooled else None,
            projection_class_embeddings_input_dim=self.text_dim if pooled else None)


# Named sizes. "tiny" trains on a laptop CPU at about the parameters and FLOPs per image of dit.preset("tiny"):
# with MiniLM's 384-wide tokens, 1.73M parameters and 41.7 MFLOPs against the DiT's 1.87M and 44.2M (notebook 07
# compares them at equal compute, `unet_cost` and `dit.dit_cost`). "small" is a GPU size for the same 8x8
# latents. "SD-1.5" is Stable Diffusion 1.5's UNet (859,520,964 parameters: 64x64x4 latents of 512 px images,
# CLIP ViT-L/14's 768-wide tokens, 8 heads per level, no pooled text).
PRESETS: dict[str, UNetConfig] = {
    "tiny": UNetConfig(),
    "small": UNetConfig(block_out_channels=(128, 256, 256), layers_per_block=2, attention_head_dim=64,
                        norm_num_groups=32, down_block_types=("CrossAttnDownBlock2D",) * 3,
                        up_block_types=("CrossAttnUpBlock2D",) * 3),
    "SD-1.5": UNetConfig(input_size=(64, 64), block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                         attention_head_dim=(40, 80, 160, 160), norm_num_groups=32, text_dim=768, pooled_text=False,
                         down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                         up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
}


def preset(name: str, **overrides) -> UNetConfig:
    """A fresh copy of the named config, with `overrides` (any UNetConfig field) applied."""
    if name not in PRESETS:
        raise ValueError(f"Unknown UNet preset {name!r}; choose one of {', '.join(PRESETS)}.")
    return dataclasses.replace(PRESETS[name], **overrides)


class UNet(nn.Module):
    """forward(x [B, C, H, W], t [B] in [0, 1], TextEmbedding(tokens [B, L, D_text], mask [B, L]))
    -> [B, C, H, W]: diffusers' UNet2DConditionModel (`self.unet`) behind the course's denoiser interface."""

    def __init__(self, config: UNetConfig | None = None):
        super().__init__()
        self.config = cfg = config or UNetConfig()
        self.unet = UNet2DConditionModel(**cfg.diffusers_kwargs())
        nn.init.zeros_(self.unet.conv_out.weight)  # a fresh model outputs 0 (module docstring)
        nn.init.zeros_(self.unet.conv_out.bias)

    @property
    def gradient_checkpointing(self) -> bool:
        return self.unet.is_gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, on: bool):
        self.unet.enable_gradient_checkpointing() if on else self.unet.disable_gradient_checkpointing()

    def fsdp_units(self) -> list[nn.Module]:
        """The modules FSDP shards one by one (train/distributed.py): the down blocks, the mid block and the
        up blocks of diffusers' model, in the order they run."""
        unet = self.unet
        return [*unet.down_blocks, *([unet.mid_block] if unet.mid_block is not None else []), *unet.up_blocks]

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: TextEmbedding) -> torch.Tensor:
        """x_t [B, C, H, W], noise level t [B] in [0, 1], caption tokens -> F(x_t) [B, C, H, W]."""
        cfg = self.config
        check_denoiser_inputs(x, t, *text, cfg.in_channels, cfg.text_dim)
        pooled = masked_mean(text).to(x.dtype) if cfg.pooled_text else None  # [B, D_text]
        return self.unet(x, 1000 * t, encoder_hidden_states=text.tokens, encoder_attention_mask=text.mask,
                         class_labels=pooled).sample  # [B, C, H, W]


def unet_cost(config: UNetConfig, input_size: int | tuple[int, int] | None = None, text_len: int = 16) -> DiTCost:
    """Parameters, and the FLOPs of one image's forward pass at `input_size` (default the config's) with
    `text_len` caption tokens, by top-level part of diffusers' model (conv_in, time_embedding,
    down_blocks.0, ..., mid_block, up_blocks.0, ..., conv_out): the record `dit.dit_cost` gives, so the
    zoo tabulates both (every parameter is active).

    Counted by `torch.utils.flop_counter.FlopCounterMode` on one forward pass of a model on the meta
    device (shapes only: no memory, no arithmetic), as `dit_cost` counts: 2 FLOPs per multiply-add of the
    matrix multiplies, convolutions and attention; elementwise work (GroupNorm, SiLU, softmax,
    interpolation) left out.
    """
    cfg = dataclasses.replace(config, input_size=input_size or config.input_size)
    with torch.device("meta"):
        model = UNet(cfg)
        x = torch.empty(1, cfg.in_channels, *cfg.input_size)
        text = TextEmbedding(torch.empty(1, text_len, cfg.text_dim), torch.ones(1, text_len, dtype=torch.bool))
        # The math backend: attention as bmm's, which FlopCounterMode counts (a fused CPU kernel it does not).
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model(x, torch.empty(1), text)
    top = "UNet.unet."
    flops = {name[len(top):]: sum(ops.values()) for name, ops in counter.get_flop_counts().items()
             if name.startswith(top)}
    level = ("down_blocks.", "up_blocks.")  # their parts are their levels, down_blocks.0, ...
    parts = {name: f for name, f in flops.items() if name.count(".") == name.startswith(level)}
    params = sum(p.numel() for p in model.parameters())
    return DiTCost(params, params, parts)

"""Weights both ways between our `AutoencoderKL` and `diffusers.AutoencoderKL`.

The two are the same network (LDM's KL autoencoder) under different names: `KEY_MAP` is the whole
correspondence, and `diffusers_config` the configuration. Older checkpoints store the attention
projections as 1x1 convolutions; ours are `nn.Linear`, so those are squeezed on the way in.
diffusers' `force_upcast` (default True there; SDXL's VAE needs it: in float16 it overflows and decodes
to NaN or black) is kept both ways, so that a half-precision VAE still encodes and decodes in float32.
"""

from __future__ import annotations

import re

from .autoencoder import AutoencoderKL, VAEConfig

# (ours, diffusers) regular expressions over state-dict keys, per component.
KEY_MAP = [
    (r"encoder\.levels\.(\d+)\.blocks\.", r"encoder.down_blocks.\1.resnets."),
    (r"encoder\.levels\.(\d+)\.resample\.", r"encoder.down_blocks.\1.downsamplers.0."),
    (r"decoder\.levels\.(\d+)\.blocks\.", r"decoder.up_blocks.\1.resnets."),
    (r"decoder\.levels\.(\d+)\.resample\.", r"decoder.up_blocks.\1.upsamplers.0."),
    (r"\.mid\.res1\.", r".mid_block.resnets.0."),
    (r"\.mid\.res2\.", r".mid_block.resnets.1."),
    (r"\.mid\.attn\.norm\.", r".mid_block.attentions.0.group_norm."),
    (r"\.mid\.attn\.(q|k|v)\.", r".mid_block.attentions.0.to_\1."),
    (r"\.mid\.attn\.out\.", r".mid_block.attentions.0.to_out.0."),
    (r"\.skip\.", r".conv_shortcut."),
    (r"\.norm_out\.", r".conv_norm_out."),
]


def to_diffusers_key(key: str) -> str:
    """Our state-dict key -> diffusers' (e.g. encoder.levels.0.blocks.0.* -> encoder.down_blocks.0.resnets.0.*)."""
    for ours, theirs in KEY_MAP:
        key = re.sub(ours, theirs, key)
    return key


def diffusers_config(config: VAEConfig) -> dict:
    """The `diffusers.AutoencoderKL` keyword arguments for the same network."""
    n = len(config.channels)
    return dict(
        in_channels=config.in_channels, out_channels=config.in_channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=config.channels, layers_per_block=config.num_res_blocks,
        latent_channels=config.latent_channels, norm_num_groups=config.norm_groups,
        mid_block_add_attention=config.mid_attention, scaling_factor=config.scaling_factor,
        shift_factor=config.shift_factor, use_quant_conv=config.quant_conv,
        use_post_quant_conv=config.quant_conv, force_upcast=config.force_upcast,
    )


def to_diffusers(vae: AutoencoderKL):
    """Our VAE as a `diffusers.AutoencoderKL` with identical weights (float32, eval mode)."""
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    theirs = DiffusersAutoencoderKL(**diffusers_config(vae.config))
    state = {to_diffusers_key(k): v for k, v in vae.state_dict().items()}
    theirs.load_state_dict(state, strict=True)
    return theirs.eval()


def from_diffusers(theirs) -> AutoencoderKL:
    """A `diffusers.AutoencoderKL` (e.g. Stable Diffusion's) as our VAE, in float32 eval mode."""
    c = theirs.config
    if set(c.down_block_types) != {"DownEncoderBlock2D"} or set(c.up_block_types) != {"UpDecoderBlock2D"}:
        raise ValueError(f"Only DownEncoderBlock2D/UpDecoderBlock2D VAEs convert; got {c.down_block_types}.")
    if c.in_channels != c.out_channels or c.act_fn != "silu" or c.use_quant_conv != c.use_post_quant_conv:
        raise ValueError("Only VAEs with in_channels == out_channels, SiLU activations and both or "
                         "neither of quant_conv / post_quant_conv convert.")
    config = VAEConfig(
        in_channels=c.in_channels, channels=tuple(c.block_out_channels), num_res_blocks=c.layers_per_block,
        latent_channels=c.latent_channels, mid_attention=getattr(c, "mid_block_add_attention", True),
        norm_groups=c.norm_num_groups, scaling_factor=float(c.scaling_factor),
        shift_factor=float(c.shift_factor or 0.0), quant_conv=c.use_quant_conv,
        force_upcast=bool(getattr(c, "force_upcast", True)),  # diffusers' default when a config lacks it
    )
    ours = AutoencoderKL(config)
    state = {k: v.float()[:, :, 0, 0] if ".attentions." in k and v.ndim == 4 else v.float()
             for k, v in theirs.state_dict().items()}
    by_their_key = {to_diffusers_key(k): k for k in ours.state_dict()}
    missing = set(by_their_key) - set(state)
    unexpected = set(state) - set(by_their_key)
    if missing or unexpected:
        raise ValueError(f"diffusers state dict does not match: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}.")
    ours.load_state_dict({by_their_key[k]: v for k, v in state.items()}, strict=True)
    return ours.eval()

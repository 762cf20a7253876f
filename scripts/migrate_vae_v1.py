"""Map the first shipped VAE (commit b7ddbd3) onto the LDM/diffusers-exact layout of `vae/autoencoder.py`.

How the shipped VAE was made: the first VAE (15,000 steps on a GPU) had per-width GroupNorm groups,
symmetric down-sampling padding and 1x1-convolution attention projections. Its tensors map one to
one onto the current layout (this script), but the changed normalisation and padding drop its test
PSNR to about 9 dB, so it was then fine-tuned with `python -m tutorial_lib train-vae --init`.

    git show b7ddbd3:tutorial_lib/assets/vae.safetensors > vae_v1.safetensors
    python scripts/migrate_vae_v1.py vae_v1.safetensors vae_v1_migrated.safetensors
"""

from __future__ import annotations

import re
import sys

from tutorial_lib.vae.autoencoder import AutoencoderKL, VAEConfig
from tutorial_lib.weights import read_weights, save_weights


def migrate(state: dict, config: VAEConfig) -> dict:
    blocks = {"encoder": config.num_res_blocks, "decoder": config.num_res_blocks + 1}
    out = {}
    for key, value in state.items():
        m = re.match(r"(encoder|decoder)\.levels\.(\d+)\.(\d+)\.(.*)", key)
        if m:
            part, level, index, rest = m.groups()
            key = (f"{part}.levels.{level}.blocks.{index}.{rest}" if int(index) < blocks[part]
                   else f"{part}.levels.{level}.resample.conv.{rest.split('.')[-1]}")
        if ".attn.qkv." in key:  # one [3C, C, 1, 1] convolution -> three [C, C] linear maps
            for name, chunk in zip("qkv", value.chunk(3)):
                out[key.replace("qkv", name)] = chunk.flatten(1) if chunk.ndim == 4 else chunk
            continue
        if ".attn.proj." in key:
            key, value = key.replace("proj", "out"), value.flatten(1) if value.ndim == 4 else value
        out[key] = value
    return out


if __name__ == "__main__":
    src, dst = sys.argv[1:3]
    state, old, _ = read_weights(src, "vae")
    config = VAEConfig(channels=tuple(old["channels"]), num_res_blocks=old["num_res_blocks"],
                       latent_channels=old["latent_channels"], mid_attention=old["mid_attention"],
                       norm_groups=8, scaling_factor=old["scaling_factor"], shift_factor=old["shift_factor"])
    vae = AutoencoderKL(config)
    vae.load_state_dict(migrate(state, config), strict=True)
    save_weights(vae, dst, "vae", {"migrated_from": "b7ddbd3:tutorial_lib/assets/vae.safetensors"})
    print(f"wrote {dst}: {config}")

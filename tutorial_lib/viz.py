"""Pictures: image grids with row labels, denoising strips."""

from __future__ import annotations

import math

import torch
from PIL import Image


def to_pil(image: torch.Tensor) -> Image.Image:
    """One image [1, H, W] in [-1, 1] -> a grayscale PIL image."""
    from .data.fashion_mnist import to_uint8

    return Image.fromarray(to_uint8(image[None])[0, 0].numpy(), mode="L")


def grid(images: torch.Tensor, nrow: int, pad: int = 2) -> torch.Tensor:
    """Images [N, 1, H, W] in [-1, 1] -> one [H', W'] array in [0, 1], nrow images per row."""
    n, _, h, w = images.shape
    rows = (n + nrow - 1) // nrow
    out = torch.ones(rows * (h + pad) + pad, nrow * (w + pad) + pad)
    for i, img in enumerate(images.clamp(-1, 1).add(1).div(2)):
        r, c = divmod(i, nrow)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = img[0]
    return out


def show_grid(images: torch.Tensor, nrow: int, row_labels=None, title: str | None = None,
              path=None, scale: float = 0.6):
    """Plot a grid (one row per label if given) with matplotlib; save it to `path` if given."""
    import matplotlib.pyplot as plt

    g = grid(images, nrow)
    fig, ax = plt.subplots(figsize=(scale * nrow + (2.2 if row_labels else 0.2),
                                    scale * g.shape[0] / g.shape[1] * nrow + 0.4))
    ax.imshow(g.numpy(), cmap="gray", vmin=0, vmax=1)
    ax.set_xticks([])
    if row_labels:
        h = images.shape[-2] + 2
        ax.set_yticks([2 + h * i + h / 2 - 1 for i in range(len(row_labels))], row_labels)
    else:
        ax.set_yticks([])
    if title:
        ax.set_title(title)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig


def denoising_strip(pipe, prompt: str, num_inference_steps: int = 25, guidance_scale: float = 3.0,
                    seed: int = 0, columns: int = 8, **options) -> tuple[torch.Tensor, list[float]]:
    """The sampler's state and x0_hat, decoded, at `columns` evenly spaced steps: (images [2 * columns,
    1, H, W], levels). `options` override the pipeline's sampling options, as in `generate_latents`.

    The first row is the noisy latent on the data's scale, the second the model's estimate x0_hat.
    A t-space sampler's state x_t = alpha_t x0 + sigma_t eps is shown as it is, and `levels` are its t.
    A sigma-space one's (SIGMA_SAMPLERS) x = x0 + sigma n has variance sigma_data^2 + sigma^2 (std 80
    at the start): it is shown as the VP x_t at the same level, x / sqrt(1 + sigma^2) (every VP
    schedule has alpha_t^2 + sigma_t^2 = 1 and sigma = sigma_t / alpha_t, so alpha_t = 1 / sqrt(1 +
    sigma^2)), of variance between sigma_data^2 and 1: the picture a t-space sampler on a VP schedule
    shows at that level. Its `levels` are its sigma (`level_name` says which).
    """
    sigma_space = level_name(pipe, options.get("sampler")) == "sigma"
    xs, x0s, levels = [], [], []

    def record(i, level, x, x0_hat):
        level = float(level)
        xs.append(x / math.sqrt(1 + level**2) if sigma_space else x.clone())
        x0s.append(x0_hat.clone())
        levels.append(level)

    pipe.generate_latents(prompt, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                          seed=seed, callback=record, **options)
    pick = torch.linspace(0, len(xs) - 1, columns).round().long().tolist()
    latents = torch.cat([xs[i] for i in pick] + [x0s[i] for i in pick])
    vae_dtype = next(pipe.vae.parameters()).dtype
    return pipe.vae.decode_latents(latents.to(vae_dtype)).float().cpu(), [levels[i] for i in pick]


def level_name(pipe, sampler: str | None = None) -> str:
    """What a sampler's callback gets as its level: "sigma" if `sampler` (default: the pipeline's)
    steps in sigma (SIGMA_SAMPLERS), else "t"."""
    from .diffusion.samplers import SIGMA_SAMPLERS

    return "sigma" if (sampler or pipe.config.sampler) in SIGMA_SAMPLERS else "t"


def show_denoising_strip(pipe, prompt: str, num_inference_steps: int = 25, guidance_scale: float = 3.0,
                         seed: int = 0, columns: int = 8, path=None, **options):
    """Plot `denoising_strip`, its rows and levels labelled as t or sigma; save it to `path` if given."""
    images, levels = denoising_strip(pipe, prompt, num_inference_steps, guidance_scale, seed, columns, **options)
    if level_name(pipe, options.get("sampler")) == "sigma":
        rows = [r"$x / \sqrt{1 + \sigma^2}$", r"$\hat{x}_0$"]
        title = r"$\sigma$ = " + ", ".join(f"{s:.3g}" for s in levels)
    else:
        rows, title = [r"$x_t$", r"$\hat{x}_0$"], "t = " + ", ".join(f"{t:.2f}" for t in levels)
    return show_grid(images, len(levels), row_labels=rows, title=title, path=path)

"""Pictures: image grids with row labels, denoising strips."""

from __future__ import annotations

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
    ax.imshow(g, cmap="gray", vmin=0, vmax=1)
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
                    seed: int = 0, columns: int = 8) -> tuple[torch.Tensor, list[float]]:
    """Decoded x_t and x0_hat at `columns` evenly spaced steps: (images [2 * columns, 1, H, W], ts).

    The first row is the noisy latent x_t (decoded), the second the model's estimate x0_hat.
    """
    xs, x0s, ts = [], [], []

    def record(i, t, x, x0_hat):
        xs.append(x.clone())
        x0s.append(x0_hat.clone())
        ts.append(float(t))

    pipe.generate_latents(prompt, num_inference_steps=num_inference_steps,
                          guidance_scale=guidance_scale, seed=seed, callback=record)
    pick = torch.linspace(0, len(xs) - 1, columns).round().long().tolist()
    latents = torch.cat([xs[i] for i in pick] + [x0s[i] for i in pick])
    return pipe.vae.decode_latents(latents).cpu(), [ts[i] for i in pick]

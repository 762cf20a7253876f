"""Pictures: image grids with row and column labels, denoising strips, per-class accuracy bars, log axes."""

from __future__ import annotations

import math
import textwrap

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
              path=None, scale: float = 0.6, col_labels=None):
    """Plot a grid (one row per label if given, columns labelled below if given, e.g. with their class)
    with matplotlib; save it to `path` if given. A title wider than the grid wraps onto more lines."""
    import matplotlib.pyplot as plt

    g = grid(images, nrow)
    width = scale * nrow + (2.2 if row_labels else 0.2)
    fig, ax = plt.subplots(figsize=(width, scale * g.shape[0] / g.shape[1] * nrow + (0.9 if col_labels else 0.4)))
    ax.imshow(g.numpy(), cmap="gray", vmin=0, vmax=1)
    h, w = images.shape[-2] + 2, images.shape[-1] + 2
    if col_labels:
        ax.set_xticks([2 + w * i + w / 2 - 1 for i in range(len(col_labels))], col_labels,
                      rotation=40, ha="right", fontsize=8)
        ax.tick_params(axis="x", length=0)
    else:
        ax.set_xticks([])
    if row_labels:
        ax.set_yticks([2 + h * i + h / 2 - 1 for i in range(len(row_labels))], row_labels)
    else:
        ax.set_yticks([])
    if title:
        ax.set_title(textwrap.fill(title, max(20, int(8 * width))))  # ~8 characters per inch at 12 pt
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig


def per_class_bars(accuracy: dict, title: str, ax=None):
    """Bars of per-class accuracy, one group per class and one colour per model: `accuracy` maps a
    model's name to its class name -> fraction dict (an evaluation's "per_class_accuracy"; a missing
    class has no bar). Returns the axes."""
    import matplotlib.pyplot as plt
    import numpy as np

    from .data.fashion_mnist import CLASSES

    if ax is None:
        _, ax = plt.subplots(figsize=(8, 2.8))
    width = 0.8 / len(accuracy)
    for k, (name, by_class) in enumerate(accuracy.items()):
        values = np.array([by_class.get(c, np.nan) for c in CLASSES], dtype=float)
        ax.bar(np.arange(len(CLASSES)) + (k - (len(accuracy) - 1) / 2) * width, 100 * values,
               width, label=name, color=f"C{k}")
    low = min(min(v.values()) for v in accuracy.values())
    ax.set_xticks(range(len(CLASSES)), CLASSES, rotation=30, ha="right")
    ax.set(ylabel="class accuracy (%)", ylim=(np.floor(100 * low / 5) * 5 - 5, 100.5), title=title)
    if len(accuracy) > 1:
        ax.legend(loc="lower right", fontsize=8)
    return ax


def log_axis(ax, axis: str = "y"):
    """Put `axis` ("x", "y" or "both") of `ax` on a log scale, labelled with plain numbers: at every
    tick when it spans at most a decade, at 1, 2 and 5 up to three decades, at powers of ten beyond.
    Matplotlib's default labels minor ticks on short log axes, where the labels collide. Call it after
    plotting, as it reads the data limits."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    for name in ("x", "y") if axis == "both" else (axis,):
        getattr(ax, f"set_{name}scale")("log")
        lo, hi = sorted(getattr(ax, f"get_{name}lim")())
        decades = math.log10(hi / lo)
        subs = tuple(range(1, 10)) if decades <= 1 else (1, 2, 5) if decades <= 3 else (1,)
        target = getattr(ax, f"{name}axis")
        target.set_major_locator(LogLocator(subs=subs, numticks=30))
        target.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        target.set_minor_formatter(NullFormatter())
    return ax


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

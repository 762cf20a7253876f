"""Attributes a person can see in a Fashion-MNIST picture, measured from its pixels.

The same functions label the training data (for `captions.attribute_caption`) and score generated
images (`eval.metrics.attribute_accuracy`), so a prompt's "dark" means exactly what the captions
meant by it. Both kinds of input are measured on the same 28x28 uint8 grid: model images
([N, 1, 32, 32] in [-1, 1]) are rounded back with `fashion_mnist.to_uint8` and their 2-pixel
padding cut off, so a real image gives the same labels either way.

The garment is every pixel above `MASK_LEVEL` = 32 of 255 (the shipped VAE's reconstructions keep
the padding around a garment at 16 or below). Three measurements, each binary at a threshold:

  brightness  dark / light         mean intensity of the garment's pixels, in [0, 1]
  size        small / large        fraction of the 28x28 frame the garment covers
  texture     plain / patterned    mean gradient magnitude inside the garment, after Gaussian
                                   smoothing (sigma 1 px) and at least 2 px inside its outline

"Dark" is as the picture is displayed (white garment on black); Fashion-MNIST's pictures are the
negatives of product photos, so a "dark" garment here was a light one in the shop.

Texture, the third attribute, was chosen by measurement. Width does not vary where it matters
(the bounding box fills the frame's width for most shoes and bags); the intensity spread inside the
garment tracks brightness (within-class |correlation| 0.34-0.54). The gradient is measured in the
interior only, so that the outline's own edge does not count as pattern, and after smoothing,
because the VAE does not keep 1-pixel texture: on 1,000 test images the label of the raw gradient
survives a VAE round trip in 84% of images, the smoothed one in 94%. It is nearly independent of
brightness and size (within-class |correlation| 0.19 and 0.13 on average). A garment with no
interior (2% of images, mostly thin sandals) measures 0, plain; an empty picture measures 0 in all.

The words (`ATTRIBUTES`) and `HELD_OUT_COMBINATIONS` live in captions.py and are re-exported here:
the loader imports the captions and this module imports the loader.

Thresholds are medians of the 60,000 training images (`fit_thresholds`, cached by `thresholds`):
global for brightness and texture, which should mean the same thing on any garment, and per
class for size, since a large sandal is smaller than a small coat (a global threshold would only
restate the class). They are computed, not typed in, so they always match the measurement code;
tests/test_attributes.py pins the values below so that a change to it cannot pass unnoticed.

  brightness > 0.657 is light, texture > 0.0327 is patterned; size > the class's median is large:
  T-shirt 0.537, Trouser 0.315, Pullover 0.603, Dress 0.385, Coat 0.570, Sandal 0.237,
  Shirt 0.582, Sneaker 0.276, Bag 0.531, Ankle boot 0.425.

Frequency of value 1 (light / large / patterned) per class in the training split (all: 0.50 each):

  class        light  large  patterned     class        light  large  patterned
  T-shirt      0.48   0.50   0.27          Sandal       0.16   0.50   0.74
  Trouser      0.61   0.49   0.74          Shirt        0.39   0.50   0.30
  Pullover     0.51   0.50   0.25          Sneaker      0.31   0.50   0.88
  Dress        0.58   0.50   0.41          Bag          0.60   0.50   0.37
  Coat         0.67   0.50   0.33          Ankle boot   0.69   0.50   0.71

Labels of the 10,000 real test images are identical from uint8 and from `to_model_images`; after
the shipped VAE's round trip (`encode_to_latents` then `decode_latents`, 1,000 test images) they
agree for brightness 98.7%, size 97.7%, texture 94.4% (all three 91.0%): the ceiling for the
attribute accuracy of generated images.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from .captions import ATTRIBUTES, HELD_OUT_COMBINATIONS, is_held_out
from .classes import CLASSES
from .fashion_mnist import IMAGE_SIZE, load_fashion_mnist, to_uint8

__all__ = ["ATTRIBUTES", "HELD_OUT_COMBINATIONS", "SCOPE", "as_uint8", "fit_thresholds", "is_held_out",
           "label_attributes", "measure", "thresholds"]

MASK_LEVEL = 32  # garment pixels are > 32 of 255
INTERIOR_DEPTH = 2  # texture is measured this many pixels (4-neighbour steps) inside the outline
SMOOTHING_SIGMA = 1.0  # pixels, before the texture's gradient
SCOPE = {"brightness": "global", "size": "class", "texture": "global"}  # where a threshold applies
_CHUNK = 4096  # images per step, to bound memory (float64 copies of the images)


def as_uint8(images) -> np.ndarray:
    """uint8 [N, 28, 28] as loaded, or model images (float [N, 1, 32, 32] in [-1, 1]) rounded back
    to uint8 with the padding cut off: the 28x28 grid every measurement works on."""
    x = torch.as_tensor(images).detach().cpu()
    if x.dtype == torch.uint8 and x.shape[1:] == (28, 28):
        return x.numpy()
    if x.is_floating_point() and x.shape[1:] == (1, IMAGE_SIZE, IMAGE_SIZE):
        pad = (IMAGE_SIZE - 28) // 2
        return to_uint8(x.float())[:, 0, pad:pad + 28, pad:pad + 28].numpy()
    raise ValueError(f"Expected uint8 images [N, 28, 28] (as loaded) or float model images "
                     f"[N, 1, {IMAGE_SIZE}, {IMAGE_SIZE}] in [-1, 1]; got {x.dtype} {tuple(x.shape)}.")


def _neighbours(a: np.ndarray):
    """Each pixel's up, down, left and right neighbour, [N, H, W] each; 0 beyond the frame."""
    p = np.pad(a, ((0, 0), (1, 1), (1, 1)))
    return p[:, :-2, 1:-1], p[:, 2:, 1:-1], p[:, 1:-1, :-2], p[:, 1:-1, 2:]


def _smooth(v: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of [N, H, W], background (0) beyond the frame."""
    r = int(np.ceil(4 * sigma))
    kernel = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    for axis in (1, 2):
        p = np.pad(v, [(r, r) if a == axis else (0, 0) for a in range(3)])
        v = sum(w * p.take(np.arange(j, j + v.shape[axis]), axis=axis) for j, w in enumerate(kernel))
    return v


def _mean_over(v: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per-image mean of v over mask, [N]; 0 where the mask is empty."""
    return (v * mask).sum((1, 2)) / np.maximum(mask.sum((1, 2)), 1)


def _measure(x: np.ndarray) -> dict[str, np.ndarray]:
    """`measure` of uint8 images [n, 28, 28]."""
    v = x.astype(np.float64) / 255  # intensity in [0, 1]
    garment = x > MASK_LEVEL
    interior = garment
    for _ in range(INTERIOR_DEPTH):
        interior = interior & np.logical_and.reduce(_neighbours(interior))
    up, down, left, right = _neighbours(_smooth(v, SMOOTHING_SIGMA))
    gradient = np.hypot(down - up, right - left) / 2  # central differences
    return {
        "brightness": _mean_over(v, garment),
        "size": garment.sum((1, 2)) / (x.shape[1] * x.shape[2]),
        "texture": _mean_over(gradient, interior),
    }


def measure(images) -> dict[str, np.ndarray]:
    """The raw measurement behind each attribute: name -> float64 [N] (see the module docstring)."""
    x = as_uint8(images)
    parts = [_measure(x[i:i + _CHUNK]) for i in range(0, len(x), _CHUNK)]
    return {name: np.concatenate([np.zeros(0)] + [p[name] for p in parts]) for name in ATTRIBUTES}


def _check_labels(labels, n: int) -> np.ndarray:
    y = torch.as_tensor(labels).cpu().numpy()
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"Expected {n} integer class labels, one per image; got {y.dtype} {y.shape}.")
    if n and not (0 <= y.min() and y.max() < len(CLASSES)):
        raise ValueError(f"Class labels are 0..{len(CLASSES) - 1}; got {y.min()}..{y.max()}.")
    return y


def fit_thresholds(images, labels) -> dict[str, np.ndarray]:
    """name -> float64 [classes]: the median of each measurement, over all images for a global
    attribute (the same number for every class) and within each class for a per-class one."""
    features = measure(images)
    y = _check_labels(labels, len(features["size"]))
    if missing := sorted(set(range(len(CLASSES))) - set(y.tolist())):
        raise ValueError(f"Thresholds need images of every class; none of {[CLASSES[c] for c in missing]}.")
    return {name: np.array([np.median(f[y == c] if SCOPE[name] == "class" else f) for c in range(len(CLASSES))])
            for name, f in features.items()}


@lru_cache(maxsize=1)
def thresholds() -> dict[str, np.ndarray]:
    """`fit_thresholds` of the training split (read-only arrays), computed once per process."""
    fitted = fit_thresholds(*load_fashion_mnist("train"))
    for t in fitted.values():
        t.setflags(write=False)
    return fitted


def label_attributes(images, labels) -> dict[str, np.ndarray]:
    """name -> int64 [N] value index (0: ATTRIBUTES[name][0], 1: [1]) of each image, for images of
    the classes `labels` (for a generated image: the class it was asked for)."""
    features = measure(images)
    y = _check_labels(labels, len(features["size"]))
    return {name: (f > thresholds()[name][y]).astype(np.int64) for name, f in features.items()}

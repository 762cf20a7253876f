"""Worked solutions to notebook 00's exercises (run through their checks by tests/test_exercises.py)."""

import numpy as np
import torch
import torch.nn.functional as F


def to_model_images_from_scratch(images):
    x = torch.as_tensor(images).float() / 127.5 - 1  # 0..255 -> -1..1
    return F.pad(x, (2, 2, 2, 2), value=-1.0)[:, None]  # 28 -> 32 with background, [N, 1, 32, 32]


def brightness_and_size(images):
    x = np.asarray(images)
    garment = x > 32  # [N, 28, 28]: the garment's pixels
    pixels = garment.sum(axis=(1, 2))  # [N]
    brightness = (x / 255 * garment).sum(axis=(1, 2)) / np.maximum(pixels, 1)  # 0 for an empty picture
    return brightness, pixels / (x.shape[1] * x.shape[2])

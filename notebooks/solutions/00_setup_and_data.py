"""Worked solutions to notebook 00's exercises (run through their checks by tests/test_exercises.py)."""

import torch
import torch.nn.functional as F


def to_model_images_from_scratch(images):
    x = torch.as_tensor(images).float() / 127.5 - 1  # 0..255 -> -1..1
    return F.pad(x, (2, 2, 2, 2), value=-1.0)[:, None]  # 28 -> 32 with background, [N, 1, 32, 32]


def class_means(images, labels):
    return torch.stack([images[labels == k, 0].mean(dim=0) for k in range(10)])

"""The Fashion-MNIST classifier: the course's yardstick for generated images, and the feature
network of the VAE's perceptual loss.

A small residual CNN on 32x32 images in [-1, 1]. Its logits give the class accuracy of samples;
its penultimate activations (`features`, 128-d after global average pooling) are the feature
space in which FID is measured, as in the fastai course (course22p2).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ClassifierConfig:
    in_channels: int = 1
    channels: tuple[int, ...] = (32, 64, 128)
    blocks_per_level: int = 2
    num_classes: int = 10
    dropout: float = 0.2

    def __post_init__(self):
        self.channels = tuple(self.channels)


class _Block(nn.Module):
    """conv-BN-ReLU-conv-BN plus skip (He et al., 2016), optionally halving the resolution."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
            nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out),
        )
        self.skip = (nn.Identity() if stride == 1 and c_in == c_out else
                     nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)))

    def forward(self, x):
        return F.relu(self.body(x) + self.skip(x))


class FashionClassifier(nn.Module):
    def __init__(self, config: ClassifierConfig | None = None):
        super().__init__()
        self.config = cfg = config or ClassifierConfig()
        layers, c = [nn.Conv2d(cfg.in_channels, cfg.channels[0], 3, 1, 1, bias=False),
                     nn.BatchNorm2d(cfg.channels[0]), nn.ReLU()], cfg.channels[0]
        for i, c_out in enumerate(cfg.channels):
            for j in range(cfg.blocks_per_level):
                layers.append(_Block(c, c_out, stride=2 if (i > 0 and j == 0) else 1))
                c = c_out
        self.body = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(c, cfg.num_classes))

    @property
    def feature_dim(self) -> int:
        return self.config.channels[-1]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, 1, 32, 32] in [-1, 1] -> penultimate features [B, feature_dim]."""
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"Expected images [B, {self.config.in_channels}, H, W] in [-1, 1]; "
                             f"got {tuple(x.shape)}.")
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # [B, num_classes] logits


@lru_cache(maxsize=4)
def load_classifier(path=None) -> FashionClassifier:
    """The shipped classifier (or the one at `path`), in eval mode; loaded once per process, so
    that statistics cached per classifier (the test set's features) are computed once too."""
    from ..weights import asset, load_model

    model, _ = load_model(FashionClassifier, ClassifierConfig,
                          path or asset("classifier.safetensors"), "classifier")
    return model.eval()

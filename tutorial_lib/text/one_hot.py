"""Class conditioning as a text encoder: the prompt's class, as one token.

The simplest "text" encoder knows ten classes and nothing else. A prompt is looked up as a class
name ("sneaker", "Ankle boot") or as one of the training captions ("a photo of a sneaker"); any
other prompt, a held-out paraphrase included, is an error, which is the point of comparing it with
encoders that read words. The empty prompt "" is the null class `NULL_LABEL` (= 10), the extra row
classifier-free guidance drops to, as DiT's class embedding table has one.

`OneHotConfig(dim=0)` gives fixed one-hot vectors of width 11 (no parameters, so frozen);
`dim > 0` a learned table `nn.Embedding(11, dim)` that trains with the denoiser.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from ..data.captions import all_training_captions, class_index
from ..data.fashion_mnist import CLASSES
from .base import NULL_PROMPT, TextEmbedding, TextEncoder, check_prompts

NUM_CLASSES = len(CLASSES)
NULL_LABEL = NUM_CLASSES


def _normal(prompt: str) -> str:
    return " ".join(prompt.lower().split())


@lru_cache(maxsize=1)
def _caption_labels() -> dict[str, int]:
    table: dict[str, int] = {}
    for label in range(NUM_CLASSES):
        for caption in all_training_captions(label):
            key = _normal(caption)
            if table.setdefault(key, label) != label:
                raise RuntimeError(f"Training caption {caption!r} belongs to two classes.")
    return table


def prompt_label(prompt: str) -> int:
    """The class of a prompt: a class name or a training caption; "" is `NULL_LABEL`."""
    if not isinstance(prompt, str):
        raise TypeError(f"A prompt is a str, got {type(prompt).__name__}.")
    key = _normal(prompt)
    if key == NULL_PROMPT:
        return NULL_LABEL
    if key in _caption_labels():
        return _caption_labels()[key]
    try:
        return class_index(key)
    except ValueError:
        raise ValueError(f"The one-hot encoder knows the class names ({', '.join(CLASSES)}) and the "
                         f"training captions, not {prompt!r}; an encoder that reads words "
                         "('word', 'minilm', 'clip') can embed new prompts.") from None


@dataclass
class OneHotConfig:
    dim: int = 0  # 0: fixed one-hot vectors of width NUM_CLASSES + 1; > 0: a learned table

    def __post_init__(self):
        if isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim < 0:
            raise ValueError(f"OneHotConfig.dim is an int >= 0, got {self.dim!r}.")


class OneHotEncoder(TextEncoder):
    """Prompt -> class -> one token [B, 1, D], mask all True."""

    name = "one_hot"

    def __init__(self, config: OneHotConfig | None = None):
        super().__init__()
        self.config = cfg = config or OneHotConfig()
        self.embed = nn.Embedding(NUM_CLASSES + 1, cfg.dim) if cfg.dim else None

    @property
    def dim(self) -> int:
        return self.config.dim or NUM_CLASSES + 1

    def labels(self, prompt) -> torch.Tensor:
        """Prompt(s) -> class labels [B] (NULL_LABEL for "")."""
        return torch.tensor([prompt_label(p) for p in check_prompts(prompt)], device=self.device)

    def encode_labels(self, labels) -> TextEmbedding:
        """Labels [B] in 0..NUM_CLASSES (NUM_CLASSES = the null class) -> TextEmbedding."""
        labels = torch.as_tensor(labels, device=self.device)
        dtype = labels.dtype
        integer = not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)
        if labels.ndim != 1 or labels.numel() == 0 or not integer:
            raise ValueError(f"Labels are a non-empty 1-d integer tensor, got {labels!r:.80}.")
        if labels.min() < 0 or labels.max() > NULL_LABEL:
            raise ValueError(f"Labels are 0..{NUM_CLASSES - 1}, or {NULL_LABEL} for the null class; "
                             f"got {labels.tolist()}.")
        labels = labels.long()
        tokens = self.embed(labels) if self.embed is not None else F.one_hot(labels, NUM_CLASSES + 1).float()
        mask = torch.ones(len(labels), 1, dtype=torch.bool, device=labels.device)
        return TextEmbedding(tokens[:, None], mask)  # [B, 1, D], [B, 1]

    def encode(self, prompt) -> TextEmbedding:
        return self.encode_labels(self.labels(prompt))

"""A small word-level text encoder, trained jointly with the denoiser.

Every text encoder in the course returns a `TextEmbedding` (see `text/base.py`): token embeddings
[B, L, D] and a boolean mask [B, L] (True = a real token). Here a prompt is lower-cased, split into
words, and prefixed with a begin token, so even the empty prompt "" has one token: the null
condition that classifier-free guidance trains on and samples with (Ho & Salimans, 2022).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from ..data.captions import all_training_captions
from .base import TextEmbedding, TextEncoder, check_mask, check_prompts

__all__ = ["BOS", "PAD", "UNK", "TextEmbedding", "check_prompts", "words", "default_vocab",
           "WordEncoderConfig", "WordEncoder"]

BOS, PAD, UNK = "<bos>", "<pad>", "<unk>"


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def default_vocab() -> tuple[str, ...]:
    """Special tokens, then every word of the training captions, sorted (held-out words excluded)."""
    return (PAD, BOS, UNK) + tuple(sorted({w for c in all_training_captions() for w in words(c)}))


@dataclass
class WordEncoderConfig:
    vocab: tuple[str, ...] = ()
    dim: int = 128
    depth: int = 1
    heads: int = 4
    max_len: int = 16

    def __post_init__(self):
        self.vocab = tuple(self.vocab) or default_vocab()


class WordEncoder(TextEncoder):
    """Word embeddings + learned positions + `depth` pre-norm transformer layers."""

    name = "word"

    def __init__(self, config: WordEncoderConfig | None = None):
        super().__init__()
        self.config = cfg = config or WordEncoderConfig()
        self.index = {w: i for i, w in enumerate(cfg.vocab)}
        self.embed = nn.Embedding(len(cfg.vocab), cfg.dim)
        self.pos = nn.Parameter(torch.randn(cfg.max_len, cfg.dim) * 0.02)
        layer = nn.TransformerEncoderLayer(cfg.dim, cfg.heads, 4 * cfg.dim, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, cfg.depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.dim)

    @property
    def dim(self) -> int:
        return self.config.dim

    def tokenize(self, prompt) -> torch.Tensor:
        """Prompt(s) -> token ids [B, max_len]: <bos>, the words (unknown ones as <unk>), <pad>s."""
        rows = []
        for p in check_prompts(prompt):
            ids = [self.index[BOS]] + [self.index.get(w, self.index[UNK]) for w in words(p)]
            ids = ids[: self.config.max_len]
            rows.append(ids + [self.index[PAD]] * (self.config.max_len - len(ids)))
        return torch.tensor(rows)

    def unknown_words(self, prompt) -> list[str]:
        return [w for p in check_prompts(prompt) for w in words(p) if w not in self.index]

    def forward(self, ids: torch.Tensor) -> TextEmbedding:
        """Token ids [B, L] -> TextEmbedding(tokens [B, L, dim], mask [B, L])."""
        mask = check_mask(ids != self.index[PAD])
        h = self.embed(ids) + self.pos[: ids.shape[1]]
        h = self.layers(h, src_key_padding_mask=~mask)
        return TextEmbedding(self.norm(h), mask)

    def encode(self, prompt) -> TextEmbedding:
        return self(self.tokenize(prompt).to(self.pos.device))

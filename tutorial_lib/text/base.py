"""The one interface every text encoder in the course shares.

An encoder turns prompt(s) into a `TextEmbedding`: token embeddings [B, L, D] and a boolean mask
[B, L] (True = a real token, False = padding the denoiser must not attend to). A mask of None says
that no token is padding: the denoisers then give attention no mask at all, so that
`scaled_dot_product_attention` may take its fastest kernel (flash attention takes no mask). Whether a
batch has padding is decided where its mask is made, on the host (`padding_mask`), never by
looking at a mask on the GPU, which would wait for it (a sync with the host).

The null condition. Classifier-free guidance (Ho & Salimans, 2022) trains with the caption
sometimes replaced by a "no caption" condition and samples by extrapolating away from it. For every
encoder here that condition is the encoding of the empty prompt `NULL_PROMPT = ""`, and
`encoder.null(n)` is by definition `encoder.encode([""] * n)`: a trainer that drops captions to ""
and a sampler that calls `null` use exactly the same tensors. What "" encodes to depends on the
encoder (the one-hot encoder's null class, the word encoder's lone <bos>, MiniLM's [CLS] [SEP],
CLIP's <|startoftext|> <|endoftext|>); it is never an all-padding sequence, so attention always has
at least one real token to look at.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import NamedTuple

import torch
from torch import nn

NULL_PROMPT = ""


class TextEmbedding(NamedTuple):
    tokens: torch.Tensor  # [B, L, D]
    mask: torch.Tensor | None  # [B, L] bool, True where a token is real; None: every token is real


def check_prompts(prompt) -> list[str]:
    """A prompt or a non-empty list of prompts, as a list; anything else is a clear error."""
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"A prompt is a str or a list of str, got {prompt!r:.80}.")
    if len(prompts) == 0:
        raise ValueError("The list of prompts is empty.")
    return list(prompts)


def check_mask(mask: torch.Tensor) -> torch.Tensor:
    """`mask` [B, L] itself, once each caption is known to have a real token: attention over a row
    of padding alone is NaN. Encoders check where they make masks, once per batch of prompts, so
    that no denoiser's forward syncs with the host (one sync per sampling step on a GPU) to check."""
    if not bool(mask.any(dim=1).all()):
        raise ValueError("Every caption needs at least one real token (a mask row is all False); an "
                         "encoder must give even the empty prompt one, as the word encoder's <bos>, "
                         "MiniLM's [CLS] and CLIP's <|startoftext|> do.")
    return mask


def padding_mask(mask: torch.Tensor) -> torch.Tensor | None:
    """`mask` [B, L] if some token is padding, else None (see the module docstring). Free for a mask on
    the CPU, where masks are made (tokenizers, caption tables, a DataLoader's collation); a mask already
    on a GPU is returned as it is rather than read (which would be a sync)."""
    if mask.device.type != "cpu":
        return mask
    return None if bool(mask.all()) else mask


def full_mask(emb: TextEmbedding) -> torch.Tensor:
    """The mask [B, L] of `emb`, all True where it is None (no padding)."""
    if emb.mask is not None:
        return emb.mask
    return torch.ones(emb.tokens.shape[:2], dtype=torch.bool, device=emb.tokens.device)


def masked_mean(emb: TextEmbedding) -> torch.Tensor:
    """Mean of the real tokens [B, D]: the pooling sentence-transformers uses for MiniLM."""
    if emb.mask is None:
        return emb.tokens.mean(1)
    weights = emb.mask.unsqueeze(-1).to(emb.tokens.dtype)  # [B, L, 1]
    return (emb.tokens * weights).sum(1) / weights.sum(1).clamp(min=1)


def state_hash(module: nn.Module, config: dict) -> str:
    """A short SHA-256 of a JSON config and every tensor of `module.state_dict()`."""
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class TextEncoder(nn.Module):
    """Base class: subclasses set `name` and implement `dim` and `encode`.

    Learned encoders (the one-hot table, the word encoder) train with the denoiser; frozen ones
    (MiniLM, CLIP, or any encoder after `.freeze()`) have no parameter that requires a gradient, so
    their embeddings of a fixed caption set can be computed once (`text.cache.caption_embeddings`).
    """

    name = "text"
    null_prompt = NULL_PROMPT

    @property
    def dim(self) -> int:
        """D, the width of each token embedding."""
        raise NotImplementedError

    def encode(self, prompt) -> TextEmbedding:
        """Prompt(s) -> TextEmbedding(tokens [B, L, dim], mask [B, L] bool)."""
        raise NotImplementedError

    def null(self, batch_size: int = 1) -> TextEmbedding:
        """The null condition of classifier-free guidance: exactly `encode([""] * batch_size)`."""
        return self.encode([self.null_prompt] * batch_size)

    def pooled(self, prompt) -> torch.Tensor:
        """One vector per prompt [B, dim]: the mean of the real tokens."""
        return masked_mean(self.encode(prompt))

    @property
    def device(self) -> torch.device:
        for t in list(self.parameters()) + list(self.buffers()):
            return t.device
        return torch.device("cpu")

    @property
    def frozen(self) -> bool:
        return not any(p.requires_grad for p in self.parameters())

    def freeze(self):
        """No gradients and eval mode from now on; returns self."""
        return self.requires_grad_(False).eval()

    def cache_config(self) -> dict:
        """Everything besides the weights that changes the embeddings (goes into `cache_key`)."""
        config = getattr(self, "config", None)
        return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else {}

    def cache_key(self) -> str:
        """'<name>-<16 hex digits>': the encoder's name and a hash of its config and weights."""
        return f"{self.name}-{state_hash(self, {'name': self.name, **self.cache_config()})}"

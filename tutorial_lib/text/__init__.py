"""Text encoders: one interface (`TextEncoder.encode(prompt) -> TextEmbedding(tokens, mask)`), several
encoders, and a cache of frozen encoders' caption embeddings. `transformers` is imported only when a
pretrained encoder is built.

| name      | class         | tokens [B, L, D]           | weights                   | needs                 |
|-----------|---------------|----------------------------|---------------------------|-----------------------|
| "one_hot" | OneHotEncoder | [B, 1, 11] or [B, 1, dim]  | none, or a learned table  | nothing               |
| "word"    | WordEncoder   | [B, max_len, dim]          | trained with the denoiser | nothing               |
| "minilm"  | MiniLMEncoder | [B, 32, 384]               | pretrained, frozen        | tutorial_lib[minilm]  |
| "clip"    | CLIPEncoder   | [B, 77, 512]               | pretrained, frozen        | transformers, the Hub |

Every encoder's null condition (what classifier-free guidance drops to) is its encoding of "":
`encoder.null(n) == encoder.encode([""] * n)`. `text_encoder("clip")` returns None when CLIP is
neither reachable on the Hub nor in the local cache.
"""

from __future__ import annotations

from .base import NULL_PROMPT, TextEmbedding, TextEncoder, check_mask, check_prompts, masked_mean
from .cache import CaptionEmbeddings, UnknownCaption, cache_path, caption_embeddings, clear_memory_cache
from .one_hot import NULL_LABEL, NUM_CLASSES, OneHotConfig, OneHotEncoder, prompt_label
from .pretrained import CLIPEncoder, HFTextEncoder, MiniLMEncoder, load_clip_encoder, minilm_dir
from .word_encoder import WordEncoder, WordEncoderConfig

TEXT_ENCODERS = ("one_hot", "word", "minilm", "clip")


def text_encoder(name: str, **kwargs) -> TextEncoder | None:
    """A text encoder by name (one of `TEXT_ENCODERS`), built with `kwargs`:
    "one_hot" -> OneHotEncoder(OneHotConfig(**kwargs)), "word" -> WordEncoder(WordEncoderConfig(**kwargs)),
    "minilm" -> MiniLMEncoder(**kwargs), "clip" -> load_clip_encoder(**kwargs) (None when offline)."""
    if name == "one_hot":
        return OneHotEncoder(OneHotConfig(**kwargs))
    if name == "word":
        return WordEncoder(WordEncoderConfig(**kwargs))
    if name == "minilm":
        return MiniLMEncoder(**kwargs)
    if name == "clip":
        return load_clip_encoder(**kwargs)
    raise ValueError(f"Unknown text encoder {name!r}; choose one of {', '.join(map(repr, TEXT_ENCODERS))}.")


__all__ = ["NULL_PROMPT", "TextEmbedding", "TextEncoder", "check_mask", "check_prompts", "masked_mean",
           "CaptionEmbeddings", "UnknownCaption", "cache_path", "caption_embeddings", "clear_memory_cache",
           "NULL_LABEL", "NUM_CLASSES", "OneHotConfig", "OneHotEncoder", "prompt_label",
           "WordEncoder", "WordEncoderConfig", "TEXT_ENCODERS", "text_encoder",
           "MiniLMEncoder", "CLIPEncoder", "HFTextEncoder", "load_clip_encoder", "minilm_dir"]

"""A frozen encoder's embeddings of a fixed caption set, computed once.

Training captions are a finite set (`captions.all_training_captions()`: 400 of them), so a trainer
with a frozen text encoder (MiniLM, CLIP, any encoder after `.freeze()`) need not run it at every
step: `caption_embeddings(encoder)` encodes every caption, and "" (the null condition), once, and
the trainer looks rows up by caption (`lookup`) or by index (`indices` once, then `take`).

Where: `data_root()/text/<encoder name>-<hash of its config and weights>/captions-<hash>.safetensors`,
tokens [N, L, D] float32 and mask [N, L] bool, the captions and the encoder's key in the metadata
(safetensors: nothing is ever unpickled). Other weights give another folder, another caption set
another file; each result is also kept in memory for the life of the process.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..data.captions import all_training_captions
from ..paths import data_root
from ..weights import atomic_write
from .base import NULL_PROMPT, TextEmbedding, TextEncoder, check_prompts

_MEMORY: dict[str, "CaptionEmbeddings"] = {}


class UnknownCaption(KeyError):
    def __str__(self):
        return str(self.args[0])


@dataclass(eq=False)
class CaptionEmbeddings:
    """Embeddings of `captions` (row i is captions[i]); prompts must match a caption exactly."""

    key: str
    captions: tuple[str, ...]
    tokens: torch.Tensor  # [N, L, D]
    mask: torch.Tensor  # [N, L] bool
    path: Path | None = None
    index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self):
        self.index = {c: i for i, c in enumerate(self.captions)}

    def __len__(self) -> int:
        return len(self.captions)

    def __contains__(self, caption) -> bool:
        return caption in self.index

    def indices(self, prompt) -> torch.Tensor:
        """Prompt(s) -> row indices [B] (on the tokens' device)."""
        prompts = check_prompts(prompt)
        missing = [p for p in prompts if p not in self.index]
        if missing:
            raise UnknownCaption(f"{len(missing)} prompt(s) are not in the cached caption set of "
                                 f"{self.key} (e.g. {missing[0]!r}); encode them with the encoder itself, "
                                 "or cache a caption set that includes them: "
                                 "`caption_embeddings(encoder, captions)`.")
        return torch.tensor([self.index[p] for p in prompts], device=self.tokens.device)

    def take(self, indices: torch.Tensor) -> TextEmbedding:
        """Rows [B] -> TextEmbedding(tokens [B, L, D], mask [B, L])."""
        indices = torch.as_tensor(indices, device=self.tokens.device)
        return TextEmbedding(self.tokens[indices], self.mask[indices])

    def lookup(self, prompt) -> TextEmbedding:
        return self.take(self.indices(prompt))

    def null(self, batch_size: int = 1) -> TextEmbedding:
        return self.lookup([NULL_PROMPT] * batch_size)

    def to(self, device) -> "CaptionEmbeddings":
        return CaptionEmbeddings(self.key, self.captions, self.tokens.to(device), self.mask.to(device),
                                 self.path)


def _caption_set(captions) -> tuple[str, ...]:
    """The captions, in order, without repeats, with the null prompt "" added if missing."""
    captions = check_prompts(all_training_captions() if captions is None else captions)
    return tuple(dict.fromkeys([*captions, NULL_PROMPT]))


def cache_path(encoder: TextEncoder, captions=None, root: str | Path | None = None) -> Path:
    """Where `caption_embeddings(encoder, captions)` keeps its file."""
    captions = _caption_set(captions)
    digest = hashlib.sha256(json.dumps(captions).encode()).hexdigest()[:16]
    folder = Path(root) if root is not None else data_root() / "text"
    return folder / encoder.cache_key() / f"captions-{digest}.safetensors"


def _read(path: Path, key: str, captions: tuple[str, ...]) -> CaptionEmbeddings | None:
    """The cached embeddings in `path` if they are for this encoder and caption set, else None."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
        ok = (meta.get("encoder") == key and tuple(json.loads(meta.get("captions", "null")) or ()) == captions
              and tensors["tokens"].shape[0] == len(captions) == tensors["mask"].shape[0])
    except (SafetensorError, OSError, ValueError, KeyError) as err:
        print(f"Recomputing {path}: unreadable ({type(err).__name__}: {err}).")
        return None
    if not ok:
        print(f"Recomputing {path}: it holds another encoder's or caption set's embeddings.")
        return None
    return CaptionEmbeddings(key, captions, tensors["tokens"], tensors["mask"], path)


def _pad_cat(parts: list[TextEmbedding]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate batches whose lengths L may differ (padding with zeros and mask False)."""
    length = max(p.tokens.shape[1] for p in parts)
    tokens = [torch.nn.functional.pad(p.tokens, (0, 0, 0, length - p.tokens.shape[1])) for p in parts]
    masks = [torch.nn.functional.pad(p.mask, (0, length - p.mask.shape[1])) for p in parts]
    return torch.cat(tokens).float().cpu().contiguous(), torch.cat(masks).bool().cpu().contiguous()


def caption_embeddings(encoder: TextEncoder, captions=None, root: str | Path | None = None,
                       batch_size: int = 64) -> CaptionEmbeddings:
    """A frozen encoder's embeddings of `captions` (default: every training caption) and of "".

    From memory if this process computed them, else from disk if an earlier one did, else computed
    now (in batches of `batch_size`, on the encoder's device) and written. Returned on the CPU.
    """
    if not isinstance(encoder, TextEncoder):
        raise TypeError(f"Expected a tutorial_lib TextEncoder, got {type(encoder).__name__}.")
    if not encoder.frozen:
        raise ValueError(f"The {encoder.name!r} encoder has trainable parameters, so its embeddings "
                         "change as it trains and cannot be cached; cache frozen encoders only "
                         "(pretrained ones are; call `.freeze()` on a trained one).")
    captions = _caption_set(captions)
    path = cache_path(encoder, captions, root)
    key = path.parent.name
    if str(path) in _MEMORY:
        return _MEMORY[str(path)]
    cached = _read(path, key, captions) if path.is_file() else None
    if cached is None:
        was_training = encoder.training
        encoder.eval()
        try:
            with torch.no_grad():
                parts = [encoder.encode(list(captions[i:i + batch_size]))
                         for i in range(0, len(captions), batch_size)]
        finally:
            encoder.train(was_training)
        tokens, mask = _pad_cat(parts)
        meta = {"encoder": key, "captions": json.dumps(captions)}
        atomic_write(path, lambda tmp: save_file({"tokens": tokens, "mask": mask}, tmp, metadata=meta))
        cached = CaptionEmbeddings(key, captions, tokens, mask, path)
    _MEMORY[str(path)] = cached
    return cached


def clear_memory_cache() -> None:
    """Forget the embeddings kept in memory (the files on disk stay)."""
    _MEMORY.clear()

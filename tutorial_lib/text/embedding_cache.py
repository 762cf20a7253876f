"""A frozen text encoder's embeddings of a dataset's per-image captions, computed once, in shards.

A frozen encoder (MiniLM, CLIP) always maps a caption to the same tokens, so running it at every
training step wastes compute: this cache runs it once per distinct caption and training reads the
rows it needs (`take`). A learned encoder cannot be cached; it encodes the caption strings online.

Layout, one folder per (captions, encoder):

    <folder>/index.json            {"format", "encoder" (its cache_key), "captions_hash", "num_records",
                                    "num_captions", "shard_size", "num_shards", "length" L, "dim" D, "dtype"}
    <folder>/rows.safetensors      "row" [num_records] int64: record i's caption is distinct caption row[i]
    <folder>/emb-00000.safetensors "tokens" [m, L, D] (dtype), "mask" [m, L] bool, for distinct captions
                                   s * shard_size ... ; metadata: the encoder's key and the captions (JSON)

Distinct captions are numbered in order of first appearance after "" (the null condition of
classifier-free guidance), which is always row 0. L is the longest caption's real length, so no
column is all padding. Each file is written whole or not at all (`weights.atomic_write`); a rerun
keeps the shards that verify and encodes the rest, and several processes can split the shards
(shard s belongs to rank s % world_size; `index.json` is written last, by whoever finds every shard).
Files are safetensors: nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..weights import atomic_write
from .base import NULL_PROMPT, TextEmbedding, TextEncoder, check_mask

FORMAT = 1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class EmbeddingCacheError(RuntimeError):
    """A caption-embedding cache that is incomplete, damaged, or for other captions or another encoder."""


def _distinct(captions: list[str]) -> tuple[list[str], torch.Tensor]:
    """(distinct captions, "" first; row [N] int64 of each record's caption among them)."""
    index = {NULL_PROMPT: 0}
    rows = [index.setdefault(c, len(index)) for c in captions]
    return list(index), torch.tensor(rows, dtype=torch.int64)


def _captions_hash(captions: list[str]) -> str:
    return hashlib.sha256(json.dumps(captions).encode()).hexdigest()[:16]


def _shard_name(s: int) -> str:
    return f"emb-{s:05d}.safetensors"


def _read_shard(path: Path, key: str, captions: list[str]) -> dict | None:
    """The shard's tensors if it is whole and holds exactly these captions' embeddings, else None."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError):
        return None
    ok = meta.get("encoder") == key and json.loads(meta.get("captions", "null")) == captions \
        and len(tensors.get("tokens", ())) == len(captions) == len(tensors.get("mask", ()))
    return tensors if ok else None


def encode_caption_cache(captions: list[str], encoder: TextEncoder, folder: str | Path,
                         shard_size: int = 50_000, dtype: str = "bfloat16", batch_size: int = 256,
                         rank: int = 0, world_size: int = 1) -> Path:
    """Encode each distinct caption of `captions` (one per record) with the frozen `encoder` into
    `folder` (layout in the module docstring); returns `folder`. Shards already there are kept."""
    if not encoder.frozen:
        raise ValueError(f"The {encoder.name!r} encoder has trainable parameters: its embeddings change as it "
                         "trains, so they cannot be cached; give the captions to the model as strings instead.")
    if dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}.")
    empty = [i for i, c in enumerate(captions) if not c.strip()]
    if empty:
        raise ValueError(f"Record {empty[0]} has an empty caption ({len(empty)} records do): every training "
                         "caption must say something; the empty prompt is the null condition.")
    folder, key = Path(folder), encoder.cache_key()
    distinct, rows = _distinct(list(captions))
    num_shards = -(-len(distinct) // shard_size)
    was_training = encoder.training
    encoder.eval()
    try:
        for s in tqdm(range(rank, num_shards, world_size), desc="encoding captions", leave=False):
            part = distinct[s * shard_size:(s + 1) * shard_size]
            path = folder / _shard_name(s)
            if _read_shard(path, key, part) is not None:
                continue
            with torch.no_grad():
                embs = [encoder.encode(part[i:i + batch_size]) for i in range(0, len(part), batch_size)]
            length = max(e.tokens.shape[1] for e in embs)
            tokens = torch.cat([torch.nn.functional.pad(e.tokens, (0, 0, 0, length - e.tokens.shape[1]))
                                for e in embs]).to("cpu", DTYPES[dtype]).contiguous()
            mask = check_mask(torch.cat([torch.nn.functional.pad(e.mask, (0, length - e.mask.shape[1]))
                                         for e in embs]).cpu().contiguous())
            meta = {"encoder": key, "captions": json.dumps(part)}
            atomic_write(path, lambda tmp: save_file({"tokens": tokens, "mask": mask}, tmp, metadata=meta))
    finally:
        encoder.train(was_training)
    shards = [_read_shard(folder / _shard_name(s), key, distinct[s * shard_size:(s + 1) * shard_size])
              for s in range(num_shards)]
    if all(t is not None for t in shards):  # the last rank to finish publishes the index
        length = max(int(t["mask"].sum(1).max()) for t in shards)
        atomic_write(folder / "rows.safetensors", lambda tmp: save_file({"row": rows}, tmp))
        index = {"format": FORMAT, "encoder": key, "captions_hash": _captions_hash(list(captions)),
                 "num_records": len(captions), "num_captions": len(distinct), "shard_size": shard_size,
                 "num_shards": num_shards, "length": length, "dim": encoder.dim, "dtype": dtype}
        atomic_write(folder / "index.json", lambda tmp: Path(tmp).write_text(json.dumps(index, indent=1)))
    return folder


class CaptionEmbeddingCache:
    """Read a folder written by `encode_caption_cache`: `take(records)` -> their captions' embeddings.

    Rows are read through memory-mapped safetensors slices, so the cache never has to fit in memory;
    files are opened lazily in each process (DataLoader workers included).
    """

    def __init__(self, folder: str | Path, encoder_key: str | None = None, captions: list[str] | None = None):
        self.folder = Path(folder)
        try:
            self.index = json.loads((self.folder / "index.json").read_text())
        except (OSError, ValueError) as err:
            raise EmbeddingCacheError(f"{self.folder} is not a finished caption-embedding cache ({err}); "
                                      "run encode_caption_cache (or `encode-latents --text-encoder`) to finish it.")
        if encoder_key is not None and self.index["encoder"] != encoder_key:
            raise EmbeddingCacheError(f"{self.folder} holds the embeddings of encoder {self.index['encoder']}, "
                                      f"not of {encoder_key}: encode the captions with this encoder.")
        if captions is not None and (len(captions) != self.index["num_records"]
                                     or _captions_hash(list(captions)) != self.index["captions_hash"]):
            raise EmbeddingCacheError(f"{self.folder} was encoded from other captions ({self.index['num_records']} "
                                      f"records) than these ({len(captions)}): encode them again.")
        self.length, self.shard_size = self.index["length"], self.index["shard_size"]
        missing = [s for s in range(self.index["num_shards"]) if not (self.folder / _shard_name(s)).is_file()]
        if missing or not (self.folder / "rows.safetensors").is_file():
            raise EmbeddingCacheError(f"{self.folder} is incomplete (shards {missing} or rows.safetensors "
                                      "missing): run the encoding again to finish it.")
        self._rows = None
        self._files = {}

    def __len__(self) -> int:
        return self.index["num_records"]

    def _file(self, s: int):
        if s not in self._files:
            self._files[s] = safe_open(str(self.folder / _shard_name(s)), framework="pt")
        return self._files[s]

    def rows(self, records: torch.Tensor) -> torch.Tensor:
        """Records [B] -> their distinct-caption rows [B]."""
        if self._rows is None:
            self._rows = load_file(str(self.folder / "rows.safetensors"))["row"]
        return self._rows[torch.as_tensor(records)]

    def take_rows(self, rows: torch.Tensor) -> TextEmbedding:
        """Distinct-caption rows [B] -> TextEmbedding(tokens [B, L, D] float32, mask [B, L])."""
        tokens, masks = [], []
        for r in torch.as_tensor(rows).tolist():
            f, i = self._file(r // self.shard_size), r % self.shard_size
            t, m = f.get_slice("tokens")[i:i + 1, :self.length], f.get_slice("mask")[i:i + 1, :self.length]
            pad = self.length - m.shape[1]  # a shard of shorter captions than the longest
            tokens.append(torch.nn.functional.pad(t, (0, 0, 0, pad)))
            masks.append(torch.nn.functional.pad(m, (0, pad)))
        return TextEmbedding(torch.cat(tokens).float(), torch.cat(masks))

    def take(self, records: torch.Tensor) -> TextEmbedding:
        """Records [B] -> their captions' TextEmbedding (tokens [B, L, D] float32, mask [B, L])."""
        return self.take_rows(self.rows(records))

    def null(self, batch_size: int = 1) -> TextEmbedding:
        """The embedding of "" (row 0) for `batch_size` items: what classifier-free guidance drops to."""
        return self.take_rows(torch.zeros(batch_size, dtype=torch.int64))

    def __getstate__(self):  # DataLoader workers: reopen the files in the worker
        return {**self.__dict__, "_files": {}}

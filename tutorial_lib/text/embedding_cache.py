"""A frozen text encoder's embeddings of a dataset's per-image captions, computed once, in shards.

A frozen encoder (MiniLM, CLIP) always maps a caption to the same tokens, so running it at every
training step wastes compute: this cache runs it once per distinct caption of each shard, and
training reads the rows it needs (`take`). A learned encoder cannot be cached; it encodes the caption
strings online.

Layout, one folder per (captions, encoder):

    <folder>/index.json            {"format", "encoder" (its cache_key), "captions_hash", "num_records",
                                    "num_rows", "shard_size", "num_shards", "length" L, "dim" D, "dtype"}
    <folder>/emb-00000.safetensors for records s * shard_size ... (s + 1) * shard_size - 1 (n of them):
                                   "tokens" [m, L_s, D] (dtype) and "mask" [m, L_s] bool of the shard's m
                                   distinct captions, "" (the null condition of classifier-free
                                   guidance) first, then in order of first appearance; "row" [n] int64,
                                   record i's caption among them; metadata: the encoder's key, the hash
                                   of the shard's captions, its L_s

Captions are deduplicated within a shard, never across shards: a global table of distinct captions
would grow with the dataset in every process (for 3.3M captions a dictionary of gigabytes), while
per-shard dedup keeps what one process holds to one shard's worth and still stores a class-caption
dataset's repeats once per shard. L is the longest caption's real length over all shards, so no
column is all padding; a shard of shorter captions is padded when read.

Work is split as for latent shards: shard s belongs to rank s % world_size, each file is written whole
or not at all (`weights.atomic_write`), and a rerun keeps the shards whose header matches (encoder,
captions hash, shapes). When every rank has passed a barrier, rank 0 checks the shards by their names
(built from s, never listed) from their headers alone and writes index.json; a second barrier lets every
rank open the cache. No process ever reads another shard's embeddings, and captions are read from
`captions` one shard's slice at a time (a list, or the lazy `data.shards.Captions` of an encoding).
Files are safetensors: nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..data.shards import GAP_BYTES, _read_rows, resolve_barrier
from ..weights import atomic_write
from .base import NULL_PROMPT, TextEmbedding, TextEncoder, check_mask

FORMAT = 2  # 1: one global table of distinct captions, which every rank loaded whole to finish the cache
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ROW_GAP = GAP_BYTES // 8  # rows of "row" (int64) bridged in one read


class EmbeddingCacheError(RuntimeError):
    """A caption-embedding cache that is incomplete, damaged, or for other captions or another encoder."""


def _distinct(captions: list[str]) -> tuple[list[str], torch.Tensor]:
    """(distinct captions, "" first; row [n] int64 of each record's caption among them)."""
    index = {NULL_PROMPT: 0}
    rows = [index.setdefault(c, len(index)) for c in captions]
    return list(index), torch.tensor(rows, dtype=torch.int64)


def _hash(captions: list[str]) -> str:
    return hashlib.sha256(json.dumps(captions).encode()).hexdigest()[:16]


def _shard_name(s: int) -> str:
    return f"emb-{s:05d}.safetensors"


def _shard_hashes(captions, shard_size: int) -> list[str]:
    """Each shard's captions hash, reading `captions` one shard at a time; refuses an empty caption."""
    hashes = []
    for start in range(0, len(captions), shard_size):
        part = list(captions[start:start + shard_size])
        empty = next((i for i, c in enumerate(part) if not c.strip()), None)
        if empty is not None:
            raise ValueError(f"Record {start + empty} has an empty caption: every training caption must say "
                             "something; the empty prompt is the null condition.")
        hashes.append(_hash(part))
    return hashes


def _combined(hashes: list[str]) -> str:
    return hashlib.sha256("".join(hashes).encode()).hexdigest()[:16]


def _shard_problem(path: Path, key: str, captions_hash: str, count: int) -> str | None:
    """Why `path` is not the shard of these `count` captions (hash) by encoder `key`, or None. Header only."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            shapes = {name: f.get_slice(name).get_shape() for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        return "missing" if not path.is_file() else f"damaged ({type(err).__name__}: {err})"
    if meta.get("encoder") != key or meta.get("captions_hash") != captions_hash:
        return "for other captions or another encoder"
    if sorted(shapes) != ["mask", "row", "tokens"] or shapes["row"] != [count] \
            or shapes["tokens"][:2] != shapes["mask"] or "length" not in meta:
        return f"wrong contents ({shapes})"
    return None


def _encode_shard(part: list[str], encoder: TextEncoder, batch_size: int, dtype: torch.dtype) -> tuple[dict, int]:
    """The shard's tensors for captions `part`, and its longest real caption length."""
    distinct, rows = _distinct(part)
    with torch.no_grad():  # each batch's tokens [b, L_b, D] go to the storage dtype at once
        embs = [TextEmbedding(e.tokens.to(dtype), e.mask) for e in
                (encoder.encode(distinct[i:i + batch_size]) for i in range(0, len(distinct), batch_size))]
    length = max(e.tokens.shape[1] for e in embs)
    # [m, L_s, D] and [m, L_s] on the encoder's device, zero-padded and filled in place: no padded copies
    tokens = embs[0].tokens.new_zeros(len(distinct), length, embs[0].tokens.shape[2])
    mask = embs[0].mask.new_zeros(len(distinct), length)
    start = 0
    for e in embs:
        tokens[start:start + len(e.tokens), :e.tokens.shape[1]] = e.tokens
        mask[start:start + len(e.mask), :e.mask.shape[1]] = e.mask
        start += len(e.tokens)
    tokens, mask = tokens.cpu().contiguous(), check_mask(mask.cpu().contiguous())  # one copy per shard
    return {"tokens": tokens, "mask": mask, "row": rows}, int(mask.sum(1).max())


def encode_caption_cache(captions, encoder: TextEncoder, folder: str | Path, shard_size: int = 50_000,
                         dtype: str = "bfloat16", batch_size: int = 256, rank: int = 0, world_size: int = 1,
                         barrier=None) -> Path:
    """Encode the captions of `captions` (one per record: a list, or any sequence that slices, such as
    `LatentShards.captions()`) with the frozen `encoder`, on its device, into `folder` (layout in the
    module docstring); returns `folder`. Shards already there are kept. With world_size > 1 every rank
    calls this; `barrier` (default: torch.distributed's) makes them wait for each other."""
    if not encoder.frozen:
        raise ValueError(f"The {encoder.name!r} encoder has trainable parameters: its embeddings change as it "
                         "trains, so they cannot be cached; give the captions to the model as strings instead.")
    if dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}.")
    barrier = resolve_barrier(barrier, world_size)
    folder, key, n = Path(folder), encoder.cache_key(), len(captions)
    hashes = _shard_hashes(captions, shard_size)  # every rank checks every caption: all refuse alike
    num_shards = len(hashes)
    counts = [min(shard_size, n - s * shard_size) for s in range(num_shards)]
    folder.mkdir(parents=True, exist_ok=True)
    was_training = encoder.training
    encoder.eval()
    try:
        for s in tqdm(range(rank, num_shards, world_size), desc="encoding captions", leave=False):
            path = folder / _shard_name(s)
            if _shard_problem(path, key, hashes[s], counts[s]) is None:
                continue
            tensors, length = _encode_shard(list(captions[s * shard_size:s * shard_size + counts[s]]), encoder,
                                            batch_size, DTYPES[dtype])
            meta = {"encoder": key, "captions_hash": hashes[s], "length": str(length)}
            atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    finally:
        encoder.train(was_training)
    barrier()  # every rank's shards are written
    if rank == 0 and not any(_shard_problem(folder / _shard_name(s), key, hashes[s], counts[s])
                             for s in range(num_shards)):
        length, rows = 0, 0
        for s in range(num_shards):  # headers only, names built
            with safe_open(str(folder / _shard_name(s)), framework="pt") as f:
                length = max(length, int(f.metadata()["length"]))
                rows += f.get_slice("tokens").get_shape()[0]
        index = {"format": FORMAT, "encoder": key, "captions_hash": _combined(hashes), "num_records": n,
                 "num_rows": rows, "shard_size": shard_size, "num_shards": num_shards, "length": length,
                 "dim": encoder.dim, "dtype": dtype}
        atomic_write(folder / "index.json", lambda tmp: Path(tmp).write_text(json.dumps(index, indent=1)))
    barrier()  # index.json is written
    return folder


class CaptionEmbeddingCache:
    """Read a folder written by `encode_caption_cache`: `take(records)` -> their captions' embeddings.

    Rows are read through memory-mapped safetensors slices, so the cache never has to fit in memory;
    files are opened lazily in each process (DataLoader workers included). `captions`, if given, are
    checked against the ones encoded (read one shard's slice at a time).
    """

    def __init__(self, folder: str | Path, encoder_key: str | None = None, captions=None):
        self.folder = Path(folder)
        try:
            self.index = json.loads((self.folder / "index.json").read_text())
        except (OSError, ValueError) as err:
            raise EmbeddingCacheError(f"{self.folder} is not a finished caption-embedding cache ({err}); "
                                      "run encode_caption_cache (or `encode-latents --text-encoder`) to finish it.")
        if self.index.get("format") != FORMAT:
            raise EmbeddingCacheError(f"{self.folder}: caption-embedding cache format {self.index.get('format')!r}; "
                                      f"this version reads format {FORMAT}. Encode the captions again "
                                      "(encode_caption_cache, or `encode-latents --text-encoder`).")
        if encoder_key is not None and self.index["encoder"] != encoder_key:
            raise EmbeddingCacheError(f"{self.folder} holds the embeddings of encoder {self.index['encoder']}, "
                                      f"not of {encoder_key}: encode the captions with this encoder.")
        self.length, self.shard_size = self.index["length"], self.index["shard_size"]
        if captions is not None and (len(captions) != self.index["num_records"] or _combined(
                _shard_hashes(captions, self.shard_size)) != self.index["captions_hash"]):
            raise EmbeddingCacheError(f"{self.folder} was encoded from other captions ({self.index['num_records']} "
                                      f"records) than these ({len(captions)}): encode them again.")
        missing = [s for s in range(self.index["num_shards"]) if not (self.folder / _shard_name(s)).is_file()]
        if missing:
            raise EmbeddingCacheError(f"{self.folder} is incomplete (shards {missing} missing): run the encoding "
                                      "again to finish it.")
        self._files = {}

    def __len__(self) -> int:
        return self.index["num_records"]

    def _file(self, s: int):
        if s not in self._files:
            self._files[s] = safe_open(str(self.folder / _shard_name(s)), framework="pt")
        return self._files[s]

    def _take(self, shard: torch.Tensor, row: torch.Tensor) -> TextEmbedding:
        """Shards [B] and rows [B] among their distinct captions -> TextEmbedding(tokens [B, L, D]
        float32, mask [B, L]), each shard's rows read in runs (`data.shards._read_rows`)."""
        tokens = torch.zeros(len(shard), self.length, self.index["dim"])
        mask = torch.zeros(len(shard), self.length, dtype=torch.bool)
        for s in shard.unique().tolist():
            at, f = (shard == s).nonzero().squeeze(1), self._file(s)
            _, length, dim = f.get_slice("tokens").get_shape()
            gap = GAP_BYTES // (length * dim * DTYPES[self.index["dtype"]].itemsize)  # rows bridged in one read
            t = _read_rows(f.get_slice("tokens"), row[at], gap)[:, :self.length]  # [b, L_s, D]
            m = _read_rows(f.get_slice("mask"), row[at], gap)[:, :self.length]
            tokens[at, :t.shape[1]], mask[at, :m.shape[1]] = t.float(), m  # a shorter shard stays padded
        return TextEmbedding(tokens, mask)

    def take(self, records: torch.Tensor) -> TextEmbedding:
        """Records [B] -> their captions' TextEmbedding (tokens [B, L, D] float32, mask [B, L])."""
        records = torch.as_tensor(records, dtype=torch.int64).reshape(-1)
        if len(records) and (records.min() < 0 or records.max() >= len(self)):
            raise IndexError(f"Record indices must be in 0..{len(self) - 1}; got {records.min()}..{records.max()}.")
        shard, i = records // self.shard_size, records % self.shard_size
        row = torch.empty_like(records)
        for s in shard.unique().tolist():
            at = (shard == s).nonzero().squeeze(1)
            row[at] = _read_rows(self._file(s).get_slice("row"), i[at], ROW_GAP)
        return self._take(shard, row)

    def null(self, batch_size: int = 1) -> TextEmbedding:
        """The embedding of "" (row 0 of every shard) for `batch_size` items: what classifier-free
        guidance drops to."""
        zeros = torch.zeros(batch_size, dtype=torch.int64)
        return self._take(zeros, zeros)

    def __getstate__(self):  # DataLoader workers: reopen the files in the worker
        return {**self.__dict__, "_files": {}}

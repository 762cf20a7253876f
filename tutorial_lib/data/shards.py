"""Any image-caption source, encoded once by any KL autoencoder into shards of latents.

Layout, one folder per encoding:

    out_root/<key>/index.json
    out_root/<key>/shard-00000.safetensors, shard-00001.safetensors, ...

key = "lat-" + sha256(VAE weights hash, source fingerprint, preprocessing fingerprint, dtype)[:16],
so that a change to any of them gives a new folder and none ever mixes latents of two encodings.
Shard s holds the records s * shard_size ... (s + 1) * shard_size - 1 of the source whose image
decodes (n of them), as tensors
    mean, std        [n, C, h, w] in the chosen dtype: the posterior q(z|x) = N(mean, std^2) in the
                     VAE's raw, unscaled latent space (so that training can sample z = mean + std * eps,
                     or take the mean, and scale either by the factors in index.json)
    label            [n] int64 (-1 where the source has no labels)
    index            [n] int64, each record's row in the source
    caption_bytes    [total] uint8, the n captions as one UTF-8 blob, and
    caption_offsets  [n + 1] int64: caption i is caption_bytes[offsets[i]:offsets[i + 1]]
and the metadata {"key": key, "records": [first, stop), "skipped": [[row, why], ...] for the images
that did not decode}. index.json holds {"format", "key", "vae": {class, config, weights_hash},
"source", "preprocess", "dtype", "num_records" (kept), "shard_size", "num_shards", "shard_records"
(kept per shard), "skipped" (a count), "latent_shape": [C, h, w], "scaling_factor", "shift_factor"}.
Format 1 kept the captions as JSON in each header, so every reader held all of them: it is refused.

Encoding is resumable and can be split across processes: each shard is written atomically
(temporary file, fsync, rename), so a shard file is whole or absent; a rerun keeps every shard
that opens and matches (key, record range, tensor shapes) and encodes the others, a damaged one
included. Shard s belongs to rank s % world_size; images are decoded and resized in DataLoader
workers, and an image that does not decode is skipped and counted, never fatal. When every rank has
passed a barrier, rank 0 checks the shards by their names (built from s, never listed: a listing
can be stale on a shared file system) and writes index.json; a second barrier lets every rank read
it. Only shard headers are checked, not a checksum of the data: rename makes partial files
impossible, and truncation shows in the header.

`LatentShards` reads an encoding lazily: a batch reads only its rows, through memory-mapped
`safetensors.safe_open` handles opened in the process that reads (a DataLoader worker opens its own).
"""

from __future__ import annotations

import collections.abc
import copy
import dataclasses
import hashlib
import itertools
import json
import math
import os
import types
from pathlib import Path

import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..paths import shown
from ..vae.autoencoder import upcast
from ..weights import atomic_write, weights_hash
from .fashion_mnist import DataError
from .sources import Preprocess, SourceSpec, _datasets, as_records

FORMAT = 2  # 1: captions as JSON in each shard's header, read whole by every reader
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
TENSORS = ("caption_bytes", "caption_offsets", "index", "label", "mean", "std")
# A batch reads each shard in runs of rows, bridging gaps up to GAP_BYTES: one read costs about 12 us
# however long it is (safetensors 0.8 slices are views of the memory map, so only the rows indexed
# out of a run are copied), while older versions copy whole runs, which this bound keeps small.
GAP_BYTES = 1 << 20
CAPTION_BYTES = 256  # a generous caption length, to turn GAP_BYTES into rows of captions


def shard_name(s: int) -> str:
    return f"shard-{s:05d}.safetensors"


def vae_identity(vae) -> dict:
    """{class, config, weights_hash} of our `AutoencoderKL` or a `diffusers.AutoencoderKL`."""
    hashed = vae
    if not dataclasses.is_dataclass(vae.config):
        # diffusers' config is a dict whose "_" keys say how the model was built, not what it computes;
        # `weights_hash` reads a dataclass, so the rest is handed over as one.
        fields = {k: v for k, v in vae.config.items() if not k.startswith("_")}
        config = dataclasses.make_dataclass("DiffusersConfig", list(fields))(**fields)
        hashed = types.SimpleNamespace(config=config, state_dict=vae.state_dict)
    return {"class": f"{type(vae).__module__}.{type(vae).__qualname__}",
            "config": json.loads(json.dumps(dataclasses.asdict(hashed.config))),  # tuples -> lists
            "weights_hash": weights_hash(hashed)}


def encoding_key(vae_hash: str, source: dict, preprocess: dict, dtype: str) -> str:
    parts = {"vae": vae_hash, "source": source, "preprocess": preprocess, "dtype": dtype}
    return "lat-" + hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _dtype_name(dtype: torch.dtype) -> str:
    names = {v: k for k, v in DTYPES.items()}
    if dtype not in names:
        raise ValueError(f"Latents are stored as torch.bfloat16, torch.float16 or torch.float32, not {dtype}.")
    return names[dtype]


def _header(path: Path) -> tuple[dict, dict]:
    """(metadata, {tensor name: shape}) of a shard: its header only, no data read."""
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}, {name: f.get_slice(name).get_shape() for name in f.keys()}


def _shard_problem(path: Path, key: str, start: int, stop: int) -> str | None:
    """Why `path` is not the shard of the encoding `key` for records start..stop-1, or None if it
    is. Reads the header only."""
    if not path.is_file():
        return "missing"
    try:
        meta, shapes = _header(path)
        if meta.get("key") != key:
            return f"from another encoding ({meta.get('key')!r}, not {key!r})"
        records, skipped = json.loads(meta["records"]), json.loads(meta["skipped"])
    except (SafetensorError, OSError, KeyError, ValueError) as err:
        return f"damaged or of an older format ({type(err).__name__}: {err})"
    if records != [start, stop]:
        return f"records {records[0]}..{records[1] - 1} instead of {start}..{stop - 1} (another shard_size?)"
    kept = stop - start - len(skipped)
    if sorted(shapes) != list(TENSORS) or [shapes[n][0] for n in ("index", "label", "mean", "std")] != [kept] * 4 \
            or shapes["caption_offsets"] != [kept + 1] or shapes["mean"] != shapes["std"]:
        return f"wrong contents (tensors {shapes}; expected {kept} records)"
    return None


def pack_captions(captions: list[str]) -> dict[str, torch.Tensor]:
    """n captions as one UTF-8 blob, caption_bytes [total] uint8, and caption_offsets [n + 1] int64:
    caption i is caption_bytes[offsets[i]:offsets[i + 1]], so a reader decodes only the rows it reads."""
    blobs = [c.encode() for c in captions]
    offsets = torch.tensor([0, *itertools.accumulate(map(len, blobs))], dtype=torch.int64)
    data = torch.frombuffer(bytearray(b"".join(blobs)), dtype=torch.uint8) if offsets[-1] else \
        torch.zeros(0, dtype=torch.uint8)
    return {"caption_bytes": data, "caption_offsets": offsets}


def _read_captions(f, rows: torch.Tensor, max_gap: int) -> list[str]:
    """Captions of `rows` [B] of an open shard, read in runs of nearby rows as `_read_rows` reads
    tensors: two reads per run, not per row (each safetensors slice call also costs a few bytes that
    safetensors 0.8 never frees, so reads per row would grow a worker's memory with every epoch)."""
    unique, inverse = torch.unique(rows, return_inverse=True)  # sorted
    u = unique.tolist()
    starts = [0] + [i for i in range(1, len(u)) if u[i] - u[i - 1] > max_gap + 1]
    found = {}
    for a, b in zip(starts, starts[1:] + [len(u)]):
        run = _read_caption_range(f, u[a], u[b - 1] + 1)
        found |= {r: run[r - u[a]] for r in u[a:b]}
    return [found[u[i]] for i in inverse.tolist()]


def _read_caption_range(f, first: int, stop: int) -> list[str]:
    """Captions of rows first..stop-1 of an open shard, read in one piece."""
    offsets = f.get_slice("caption_offsets")[first:stop + 1].tolist()
    blob = f.get_slice("caption_bytes")[offsets[0]:offsets[-1]].numpy().tobytes()
    return [blob[a - offsets[0]:b - offsets[0]].decode() for a, b in zip(offsets, offsets[1:])]


UNDECODABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)  # what PIL raises on bad bytes


class _Decoded(torch.utils.data.Dataset):
    """The records as model input, each image decoded and preprocessed where it is read: in a
    DataLoader worker. Item i is {"index": i, "x": [C, H, W], "caption", "label"}, or {"index": i,
    "bad": why} for an image that does not decode, or {"index": i, "error": message} for one that
    the preprocessing refuses (a wrong size: the user's choice to fix, not a record to skip). The
    image column is datasets' `Image` or encoded bytes (`SourceSpec.load(decode_images=False)`)."""

    def __init__(self, records, preprocess: Preprocess):
        if isinstance(records.features["image"], _datasets().Image):  # read its {bytes, path} undecoded
            records = records.cast_column("image", _datasets().Image(decode=False))
        self.records, self.preprocess = records, preprocess

    @staticmethod
    def decode(value) -> Image.Image:
        """A PIL image from datasets' {bytes, path} value, or from encoded bytes."""
        return _datasets().Image().decode_example(value if isinstance(value, dict) else {"bytes": value, "path": None})

    def __len__(self) -> int:
        return len(self.records)

    def _item(self, i: int, image, caption: str, label: int) -> dict:
        try:
            image = self.decode(image)
            image.load()
        except UNDECODABLE as err:
            return {"index": i, "bad": f"{type(err).__name__}: {err}"}
        try:
            x = self.preprocess(image, i)
        except ValueError as err:
            return {"index": i, "error": str(err)}
        return {"index": i, "x": x, "caption": caption, "label": label}

    def __getitem__(self, i: int) -> dict:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: list[int]) -> list[dict]:
        """A batch's items; its rows read from the table at once (a range in one slice: much faster
        than a row at a time)."""
        contiguous = indices == list(range(indices[0], indices[0] + len(indices)))
        rows = self.records[indices[0]:indices[-1] + 1] if contiguous else self.records[indices]
        labels = rows.get("label", [-1] * len(indices))
        return [self._item(i, *values) for i, *values in zip(indices, rows["image"], rows["caption"], labels)]


def _collate(items: list[dict]) -> dict:
    """A batch of `_Decoded` items: the good ones stacked, x [B, C, H, W], the others listed."""
    good = [item for item in items if "x" in item]
    return {"first": items[0]["index"], "x": torch.stack([item["x"] for item in good]) if good else None,
            "caption": [item["caption"] for item in good], "label": [item["label"] for item in good],
            "index": [item["index"] for item in good],
            "bad": [(item["index"], item["bad"]) for item in items if "bad" in item],
            "error": next((item["error"] for item in items if "error" in item), None)}


class _Batches:
    """Batches of record indices, `batch_size` at a time within each shard of `ranges`, made lazily
    (a DataLoader's batch_sampler: no list of every index is ever held)."""

    def __init__(self, ranges: list[tuple[int, int]], batch_size: int):
        self.ranges, self.batch_size = ranges, batch_size

    def __iter__(self):
        for start, stop in self.ranges:
            for b in range(start, stop, self.batch_size):
                yield list(range(b, min(b + self.batch_size, stop)))

    def __len__(self) -> int:
        return sum(math.ceil((stop - start) / self.batch_size) for start, stop in self.ranges)


def default_workers() -> int:
    """DataLoader workers to decode with: this machine's cores shared among the node's ranks, at most 8."""
    per_rank = (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(0, min(8, per_rank - 1))


@torch.no_grad()
def _posterior(vae, x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of q(z|x) in the storage dtype, left on the VAE's device (no host sync), from our
    VAE or diffusers' (which wraps it)."""
    parameter = next(vae.parameters())
    out = vae.encode(x.to(parameter.device, parameter.dtype, non_blocking=True))
    posterior = getattr(out, "latent_dist", out)
    return posterior.mean.to(dtype), posterior.std.to(dtype)


def _write_shard(path: Path, key: str, start: int, stop: int, parts: dict, latent_shape, dtype: torch.dtype):
    """Shard file of records start..stop-1 from its batches' `parts`, moved to the CPU in one go."""
    def cat(name):
        return torch.cat(parts[name]).cpu().contiguous() if parts[name] else torch.zeros(0, *latent_shape, dtype=dtype)
    # contiguous: mean and std are halves of one tensor, which torch.cat may keep as strided views
    tensors = {"mean": cat("mean"), "std": cat("std"), "label": torch.tensor(parts["label"], dtype=torch.int64),
               "index": torch.tensor(parts["index"], dtype=torch.int64), **pack_captions(parts["caption"])}
    metadata = {"key": key, "records": json.dumps([start, stop]), "skipped": json.dumps(parts["bad"])}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def _encode_todo(records, vae, preprocess: Preprocess, folder: Path, key: str, shard_size: int, ranges: list,
                 todo: list[int], batch_size: int, dtype: torch.dtype, num_workers: int, desc: str):
    """Encode shards `todo`: images decoded and resized by `num_workers` DataLoader workers, the VAE on
    its device (in float32 if its config sets force_upcast), each shard copied to the CPU once."""
    if not todo:
        return
    device = next(vae.parameters()).device
    loader = torch.utils.data.DataLoader(
        _Decoded(records, preprocess), batch_sampler=_Batches([ranges[s] for s in todo], batch_size),
        num_workers=num_workers, collate_fn=_collate, pin_memory=device.type == "cuda")
    h, w = preprocess.resolution
    with upcast(vae):
        latent_shape = _posterior(vae, torch.zeros(1, preprocess.channels, h, w), dtype)[0].shape[1:]
        parts, s = None, None
        with tqdm(total=sum(ranges[s][1] - ranges[s][0] for s in todo), unit="img", desc=desc) as bar:
            for batch in loader:
                if batch["error"] is not None:
                    raise ValueError(batch["error"])
                if s != batch["first"] // shard_size:  # the first batch of the next shard
                    if parts is not None:
                        _write_shard(folder / shard_name(s), key, *ranges[s], parts, latent_shape, dtype)
                    s = batch["first"] // shard_size
                    parts = {"mean": [], "std": [], "label": [], "index": [], "caption": [], "bad": []}
                if batch["x"] is not None:
                    mean, std = _posterior(vae, batch["x"], dtype)
                    parts["mean"].append(mean)
                    parts["std"].append(std)
                for name in ("label", "index", "caption", "bad"):
                    parts[name] += batch[name]
                bar.update(len(batch["index"]) + len(batch["bad"]))
            if parts is not None:
                _write_shard(folder / shard_name(s), key, *ranges[s], parts, latent_shape, dtype)


def _load_records(source):
    """(records, source fingerprint) from a `SourceSpec`, or from a `datasets.Dataset` with the
    columns image, caption and optionally label (what `load_source` returns); images of encoded bytes
    are left so (`_Decoded` decodes them), not cast for every record batch of the table."""
    if isinstance(source, SourceSpec):
        records = source.load(decode_images=False)
        return records, source.fingerprint(records)
    label = "label" if "label" in source.column_names else None
    return as_records(source, label_column=label, decode_images=False), {"kind": "dataset",
                                                                        "records": source._fingerprint}


def resolve_barrier(barrier, world_size: int):
    """The function that makes every rank wait for all: `barrier`, else torch.distributed's when a
    process group is joined; one process needs none."""
    if world_size == 1:
        return lambda: None
    if barrier is not None:
        return barrier
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.barrier
    raise ValueError(f"world_size={world_size} needs a barrier: join a process group first "
                     "(torch.distributed.init_process_group, or run under torchrun), or pass barrier=...")


def encode_shards(source, vae, out_root, preprocess: Preprocess, shard_size: int = 4096,
                  dtype: torch.dtype = torch.bfloat16, batch_size: int = 64, rank: int = 0,
                  world_size: int = 1, num_workers: int | None = None, barrier=None,
                  vae_dtype: torch.dtype | None = None) -> Path:
    """Encode `source` (a `SourceSpec` or a `datasets.Dataset` of records) with `vae` (ours or
    diffusers') into out_root/<key>, or finish or repair an earlier run; returns that folder.

    Rank `rank` of `world_size` processes encodes the shards s with s % world_size == rank, its
    images decoded and resized by `num_workers` DataLoader workers (default: `default_workers()`).
    Then every rank waits at `barrier` (default: torch.distributed's), rank 0 checks every shard by
    name and writes index.json, and all wait again, so that the encoding is readable (`LatentShards`)
    on every rank on return. An image that does not decode is skipped: the shard lists it, index.json
    counts all of them ("skipped"), and rank 0 reports them. The VAE runs in eval mode without
    gradients on its own device, in `vae_dtype` (default: its own dtype; a cast copy, since casting
    back would round `vae`'s weights) unless its config sets force_upcast (SDXL's VAE overflows in
    float16): then in its own dtype, float32 if half (`vae.autoencoder.upcast`). Its train/eval mode
    is restored afterwards. The encoding's key names the VAE by its weights as given, whatever dtype it
    computes in.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..world_size-1, got rank={rank}, world_size={world_size}.")
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size and batch_size are positive, got {shard_size} and {batch_size}.")
    dtype_name = _dtype_name(dtype)
    barrier = resolve_barrier(barrier, world_size)
    records, source_fp = _load_records(source)
    n = len(records)
    if n == 0:
        raise ValueError("The source has no records to encode.")
    if vae.config.in_channels != preprocess.channels:
        raise ValueError(f"The VAE takes {vae.config.in_channels}-channel images but preprocess gives "
                         f"{preprocess.channels}: set Preprocess(channels={vae.config.in_channels}).")
    if preprocess.resolution is None:  # resize='none': every image must be the size of record 0
        first = _Decoded(records, preprocess).records[0]["image"]  # undecoded: {bytes, path} or bytes
        preprocess = dataclasses.replace(preprocess, resolution=_Decoded.decode(first).size[::-1])
    identity = vae_identity(vae)
    key = encoding_key(identity["weights_hash"], source_fp, preprocess.fingerprint(), dtype_name)
    folder = Path(out_root) / key
    num_shards = math.ceil(n / shard_size)
    ranges = [(s * shard_size, min(n, (s + 1) * shard_size)) for s in range(num_shards)]
    finished = (folder / "index.json").is_file()
    if finished:
        try:
            LatentShards(folder)
        except DataError as err:
            finished = False
            if rank == 0:
                print(f"Repairing {folder}: {err}")
    if not finished:
        folder.mkdir(parents=True, exist_ok=True)
        todo = [s for s in range(rank, num_shards, world_size)
                if _shard_problem(folder / shard_name(s), key, *ranges[s])]
        was_training = vae.training
        vae.eval()
        cast = vae_dtype not in (None, next(vae.parameters()).dtype) and not getattr(vae.config, "force_upcast", False)
        try:
            model = copy.deepcopy(vae).to(vae_dtype) if cast and todo else vae
            _encode_todo(records, model, preprocess, folder, key, shard_size, ranges, todo, batch_size, dtype,
                         default_workers() if num_workers is None else num_workers,
                         f"encoding {key}" + (f" (rank {rank})" if world_size > 1 else ""))
        finally:
            vae.train(was_training)
    barrier()  # every rank's shards are written
    if rank == 0 and not finished and not any(_shard_problem(folder / shard_name(s), key, *ranges[s])
                                              for s in range(num_shards)):
        headers = [_header(folder / shard_name(s)) for s in range(num_shards)]  # names built, never listed
        skipped = [i for meta, _ in headers for i, _why in json.loads(meta["skipped"])]
        index = {
            "format": FORMAT, "key": key, "vae": identity, "source": source_fp,
            "preprocess": preprocess.fingerprint(), "dtype": dtype_name,
            "num_records": n - len(skipped), "shard_size": shard_size, "num_shards": num_shards,
            "shard_records": [shapes["index"][0] for _, shapes in headers], "skipped": len(skipped),
            "latent_shape": headers[0][1]["mean"][1:], "scaling_factor": float(vae.config.scaling_factor),
            "shift_factor": float(vae.config.shift_factor or 0.0),  # diffusers' SD VAEs leave it None
        }
        atomic_write(folder / "index.json", lambda tmp: Path(tmp).write_text(json.dumps(index, indent=1)))
        if skipped:
            reasons = [why for meta, _ in headers for _i, why in json.loads(meta["skipped"])]
            print(f"Skipped {len(skipped)} of {n} records whose image does not decode (records "
                  f"{', '.join(map(str, skipped[:10]))}{', ...' if len(skipped) > 10 else ''}; e.g. {reasons[0]}).")
    barrier()  # index.json is written
    return folder


class LatentShards(torch.utils.data.Dataset):
    """An encoding written by `encode_shards`, checked on opening and read lazily.

    `shards.__getitems__(indices)` gives a batch {"mean", "std": float32 [B, C, h, w], unscaled,
    "caption": list[str], "label", "index": int64 [B]}. A DataLoader calls it for each batch; give it
    `collate_fn=torch.utils.data.default_convert`, which passes the batch on as it is. Positions
    0..len-1 are the records kept (every record, unless some did not decode); "index" is each one's
    row in the source. Nothing is read whole: a batch reads its own rows, captions included.
    """

    def __init__(self, path):
        self.path = Path(path)
        try:
            self.index = json.loads((self.path / "index.json").read_text())
        except FileNotFoundError:
            written = len(list(self.path.glob("shard-*.safetensors")))
            raise DataError(f"{self.path}: no index.json, so not a finished encoding ({written} shards "
                            "written so far): run encode_shards (with every rank) to finish it.") from None
        except ValueError as err:
            raise DataError(f"{self.path}/index.json: not JSON ({err}); run encode_shards again.") from err
        if self.index.get("format") != FORMAT:
            raise DataError(f"{self.path}: encoding format {self.index.get('format')!r}; this version "
                            f"reads format {FORMAT}. Encode again (encode_shards, or the CLI's encode-latents).")
        self._check()
        counts = torch.tensor(self.index["shard_records"], dtype=torch.int64)
        self._ends = counts.cumsum(0)  # position p is in shard searchsorted(ends, p, right=True)
        self._handles, self._pid = {}, os.getpid()

    # ------------------------------------------------------------------ the encoding
    def __len__(self) -> int:
        return self.index["num_records"]

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.index["latent_shape"])

    def _range(self, s: int) -> tuple[int, int]:
        size = self.index["shard_size"]
        return s * size, min(self.index["num_records"] + self.index["skipped"], (s + 1) * size)

    def _problem(self, s: int) -> str | None:
        return _shard_problem(self.path / shard_name(s), self.index["key"], *self._range(s))

    def _check(self):
        problems = {s: self._problem(s) for s in range(self.index["num_shards"])}
        missing = ", ".join(str(s) for s, p in problems.items() if p == "missing")
        errors = [f"{shard_name(s)}: {p}" for s, p in problems.items() if p not in (None, "missing")]
        if missing:
            errors.insert(0, f"incomplete: shards {missing} missing — run encode_shards again to finish")
        if errors:
            raise DataError(f"{self.path}: " + "; ".join(errors) + ".")

    def __repr__(self):
        shape = "x".join(map(str, self.latent_shape))
        skipped = f", {self.index['skipped']} undecodable skipped" if self.index["skipped"] else ""
        return (f"LatentShards({shown(self.path)}, {len(self)} records{skipped}, latents {shape} "
                f"{self.index['dtype']}, {self.index['num_shards']} shards, source "
                f"{self.index['source'].get('location', 'dataset')})")

    # ------------------------------------------------------------------ reading
    def _shard(self, s: int):
        """Shard s's safe_open handle, opened in this process (a forked worker drops the parent's)."""
        if self._pid != os.getpid():
            self._handles, self._pid = {}, os.getpid()
        if s not in self._handles:
            self._handles[s] = safe_open(str(self.path / shard_name(s)), framework="pt")
        return self._handles[s]

    def _locate(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions [B] -> (shard [B], row in that shard [B])."""
        shard = torch.searchsorted(self._ends, positions, right=True)
        return shard, positions - (self._ends - self._ends.new_tensor(self.index["shard_records"]))[shard]

    def __getitems__(self, indices) -> dict:
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"Record indices must be in 0..{len(self) - 1}; got {idx.min()}..{idx.max()}.")
        batch = {name: torch.empty(len(idx), *self.latent_shape) for name in ("mean", "std")}
        batch |= {name: torch.empty(len(idx), dtype=torch.int64) for name in ("label", "index")}
        captions = [""] * len(idx)
        shard, row = self._locate(idx)
        row_bytes = math.prod(self.latent_shape) * DTYPES[self.index["dtype"]].itemsize
        for s in shard.unique().tolist():
            at = (shard == s).nonzero().squeeze(1)  # positions in the batch
            rows, f = row[at], self._shard(s)
            for name in ("mean", "std"):
                batch[name][at] = _read_rows(f.get_slice(name), rows, GAP_BYTES // row_bytes).float()
            for name in ("label", "index"):
                batch[name][at] = _read_rows(f.get_slice(name), rows, GAP_BYTES // 8)
            for p, caption in zip(at.tolist(), _read_captions(f, rows, GAP_BYTES // CAPTION_BYTES)):
                captions[p] = caption
        return batch | {"caption": captions}

    def __getitem__(self, i: int) -> dict:
        return {name: value[0] for name, value in self.__getitems__([i]).items()}

    def captions(self) -> "Captions":
        """Every caption, in record order, as a lazy sequence (e.g. to fill a text-embedding cache)."""
        return Captions(self)

    def __getstate__(self):  # handles are per process: a spawned worker opens its own
        return self.__dict__ | {"_handles": {}}

    # ------------------------------------------------------------------ using the latents
    def scaled(self, z: torch.Tensor) -> torch.Tensor:
        """The diffusion model's latents: z_s = (z - shift_factor) * scaling_factor, for a mean or
        a sample mean + std * eps."""
        return (z - self.index["shift_factor"]) * self.index["scaling_factor"]

    def check_channels(self, model_in_channels: int):
        """Raise if a denoiser taking `model_in_channels` channels cannot read these latents."""
        channels = self.latent_shape[0]
        if model_in_channels != channels:
            raise ValueError(f"The denoiser takes {model_in_channels} input channels but these latents "
                             f"have {channels} ({self.path}): build it with in_channels={channels}, "
                             f"or encode with a VAE of {model_in_channels} latent channels.")

    def check_vae(self, vae):
        """Raise unless `vae` is the one these latents were encoded by (to decode them, say)."""
        ours = self.index["vae"]
        if vae.config.latent_channels != self.latent_shape[0]:
            raise ValueError(f"These latents have {self.latent_shape[0]} channels; the VAE you passed "
                             f"has {vae.config.latent_channels}. Use the VAE they were encoded by "
                             f"({ours['class']}, weights {ours['weights_hash']}).")
        theirs = vae_identity(vae)["weights_hash"]
        if theirs != ours["weights_hash"]:
            raise ValueError(f"These latents were encoded by VAE {ours['weights_hash']} ({ours['class']}); "
                             f"you passed {theirs}. Use that VAE, or encode again with yours (encode_shards).")


def _read_rows(tensor_slice, rows: torch.Tensor, max_gap: int) -> torch.Tensor:
    """tensor[rows] as float32 from a safetensors slice, reading runs of nearby rows at once."""
    unique, inverse = torch.unique(rows, return_inverse=True)  # sorted
    u = unique.tolist()
    starts = [0] + [i for i in range(1, len(u)) if u[i] - u[i - 1] > max_gap + 1]
    parts = [tensor_slice[u[a]:u[b - 1] + 1][unique[a:b] - u[a]]
             for a, b in zip(starts, starts[1:] + [len(u)])]
    return torch.cat(parts)[inverse]


class Captions(collections.abc.Sequence):
    """The captions of a `LatentShards`, read from its shards when indexed: `captions[a:b]` reads
    those rows' bytes, shard by shard, and iterating reads one shard at a time, so that a million
    captions never sit in memory at once."""

    def __init__(self, shards: LatentShards):
        self.shards = shards

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, i):
        if not isinstance(i, slice):
            return self.shards.__getitems__([range(len(self))[i]])["caption"][0]
        start, stop, step = i.indices(len(self))
        if step != 1:
            return [self[j] for j in range(start, stop, step)]
        out = []
        while start < stop:
            s, row = (int(v) for v in self.shards._locate(torch.tensor([start])))
            count = min(stop - start, self.shards.index["shard_records"][s] - row)
            out += _read_caption_range(self.shards._shard(s), row, row + count)
            start += count
        return out

    def __iter__(self):
        ends = [0, *self.shards._ends.tolist()]
        for a, b in zip(ends, ends[1:]):
            yield from self[a:b]


"""Any image-caption source, encoded once by any KL autoencoder into shards of latents.

Layout, one folder per encoding:

    out_root/<key>/index.json
    out_root/<key>/shard-00000.safetensors, shard-00001.safetensors, ...

key = "lat-" + sha256(VAE weights hash, source fingerprint, preprocessing fingerprint, dtype)[:16],
so that a change to any of them gives a new folder and none ever mixes latents of two encodings.
Shard s holds records s * shard_size ... (s + 1) * shard_size - 1 of the source, as tensors
    mean, std  [n, C, h, w] in the chosen dtype: the posterior q(z|x) = N(mean, std^2) in the VAE's
               raw, unscaled latent space (so that training can sample z = mean + std * eps, or
               take the mean, and scale either by the factors in index.json)
    label      [n] int64 (-1 where the source has no labels)
    index      [n] int64, each record's row in the source
and the metadata {"key": key, "captions": a JSON list of the n captions}. index.json, written last,
holds {"format", "key", "vae": {class, config, weights_hash}, "source", "preprocess", "dtype",
"num_records", "shard_size", "num_shards", "latent_shape": [C, h, w], "scaling_factor",
"shift_factor"}.

Encoding is resumable and can be split across processes: each shard is written atomically
(temporary file, fsync, rename), so a shard file is whole or absent; a rerun keeps every shard
that opens and matches (key, record count, record range) and encodes the others, a damaged one
included. Shard s belongs to rank s % world_size; whoever finds every shard present writes
index.json (atomically, so two writing it at once is harmless). Only shard headers are checked,
not a checksum of the data: rename makes partial files impossible, and truncation shows in the header.

`LatentShards` reads an encoding lazily: a batch reads only its rows, through memory-mapped
`safetensors.safe_open` handles opened in the process that reads (a DataLoader worker opens its own).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import types
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..paths import shown
from ..weights import atomic_write, weights_hash
from .fashion_mnist import DataError
from .sources import Preprocess, SourceSpec, as_records

FORMAT = 1
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
TENSORS = ("index", "label", "mean", "std")
# A batch reads each shard in runs of rows, bridging gaps up to GAP_BYTES: one read costs about 12 us
# however long it is (safetensors 0.8 slices are views of the memory map, so only the rows indexed
# out of a run are copied), while older versions copy whole runs, which this bound keeps small.
GAP_BYTES = 1 << 20


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


def _shard_problem(path: Path, key: str, start: int, stop: int) -> str | None:
    """Why `path` is not the shard of the encoding `key` holding records start..stop-1, or None if
    it is. Reads the header and two index values only."""
    count = stop - start
    if not path.is_file():
        return "missing"
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("key") != key:
                return f"from another encoding ({meta.get('key')!r}, not {key!r})"
            shapes = {name: f.get_slice(name).get_shape() for name in f.keys()}
            if sorted(shapes) != list(TENSORS) or shapes["index"] != [count]:
                return f"wrong contents (tensors {shapes}; expected {count} records)"
            index = f.get_slice("index")
            ends = [int(index[i:i + 1]) for i in (0, count - 1)]
            captions = len(json.loads(meta["captions"]))
    except (SafetensorError, OSError, KeyError, ValueError) as err:
        return f"damaged ({type(err).__name__}: {err})"
    if shapes["label"] != [count] or shapes["std"] != shapes["mean"] or shapes["mean"][0] != count \
            or captions != count:
        return f"wrong contents (tensors {shapes}, {captions} captions; expected {count} records)"
    if ends != [start, stop - 1]:
        return f"records {ends[0]}..{ends[1]} instead of {start}..{stop - 1} (another shard_size?)"
    return None


@torch.no_grad()
def _posterior(vae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of q(z|x), float32 on the CPU, from our VAE or diffusers' (which wraps it)."""
    parameter = next(vae.parameters())
    out = vae.encode(x.to(parameter.device, parameter.dtype))
    posterior = getattr(out, "latent_dist", out)
    return posterior.mean.float().cpu(), posterior.std.float().cpu()


def _encode_shard(records, vae, preprocess: Preprocess, start: int, stop: int, batch_size: int,
                  dtype: torch.dtype, bar) -> tuple[dict, list[str]]:
    """Tensors and captions of records start..stop-1, encoded `batch_size` at a time."""
    means, stds, labels, captions = [], [], [], []
    for b in range(start, stop, batch_size):
        batch = records[b:min(b + batch_size, stop)]
        x = torch.stack([preprocess(image, b + i) for i, image in enumerate(batch["image"])])
        mean, std = _posterior(vae, x)
        means.append(mean.to(dtype))
        stds.append(std.to(dtype))
        labels += batch.get("label", [-1] * len(x))
        captions += batch["caption"]
        bar.update(len(x))
    # contiguous: mean and std are halves of one tensor, which torch.cat may keep as strided views
    tensors = {"mean": torch.cat(means).contiguous(), "std": torch.cat(stds).contiguous(),
               "label": torch.tensor(labels, dtype=torch.int64), "index": torch.arange(start, stop)}
    return tensors, captions


def _load_records(source):
    """(records, source fingerprint) from a `SourceSpec`, or from a `datasets.Dataset` with the
    columns image, caption and optionally label (what `load_source` returns)."""
    if isinstance(source, SourceSpec):
        records = source.load()
        return records, source.fingerprint(records)
    label = "label" if "label" in source.column_names else None
    return as_records(source, label_column=label), {"kind": "dataset", "records": source._fingerprint}


def encode_shards(source, vae, out_root, preprocess: Preprocess, shard_size: int = 4096,
                  dtype: torch.dtype = torch.bfloat16, batch_size: int = 64, rank: int = 0,
                  world_size: int = 1) -> Path:
    """Encode `source` (a `SourceSpec` or a `datasets.Dataset` of records) with `vae` (ours or
    diffusers') into out_root/<key>, or finish or repair an earlier run; returns that folder.

    Rank `rank` of `world_size` processes encodes the shards s with s % world_size == rank; the
    encoding is readable (`LatentShards`) once every rank has finished. The VAE runs in eval mode
    without gradients on its own device; its train/eval mode is restored afterwards.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..world_size-1, got rank={rank}, world_size={world_size}.")
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size and batch_size are positive, got {shard_size} and {batch_size}.")
    dtype_name = _dtype_name(dtype)
    records, source_fp = _load_records(source)
    n = len(records)
    if n == 0:
        raise ValueError("The source has no records to encode.")
    if vae.config.in_channels != preprocess.channels:
        raise ValueError(f"The VAE takes {vae.config.in_channels}-channel images but preprocess gives "
                         f"{preprocess.channels}: set Preprocess(channels={vae.config.in_channels}).")
    if preprocess.resolution is None:  # resize='none': every image must be the size of record 0
        preprocess = dataclasses.replace(preprocess, resolution=records[0]["image"].size[::-1])
    identity = vae_identity(vae)
    key = encoding_key(identity["weights_hash"], source_fp, preprocess.fingerprint(), dtype_name)
    folder = Path(out_root) / key
    if (folder / "index.json").is_file():
        try:
            LatentShards(folder)
            return folder
        except DataError as err:
            print(f"Repairing {folder}: {err}")
    folder.mkdir(parents=True, exist_ok=True)

    num_shards = math.ceil(n / shard_size)
    ranges = [(s * shard_size, min(n, (s + 1) * shard_size)) for s in range(num_shards)]
    todo = [s for s in range(rank, num_shards, world_size)
            if _shard_problem(folder / shard_name(s), key, *ranges[s])]
    was_training = vae.training
    vae.eval()
    try:
        with tqdm(total=sum(ranges[s][1] - ranges[s][0] for s in todo), unit="img",
                  desc=f"encoding {key}" + (f" (rank {rank})" if world_size > 1 else "")) as bar:
            for s in todo:
                tensors, captions = _encode_shard(records, vae, preprocess, *ranges[s], batch_size, dtype, bar)
                metadata = {"key": key, "captions": json.dumps(captions)}
                atomic_write(folder / shard_name(s), lambda tmp: save_file(tensors, tmp, metadata=metadata))
    finally:
        vae.train(was_training)

    if any(_shard_problem(folder / shard_name(s), key, *ranges[s]) for s in range(num_shards)):
        return folder  # other ranks are still encoding; the last to finish writes index.json
    with safe_open(str(folder / shard_name(0)), framework="pt") as f:
        latent_shape = f.get_slice("mean").get_shape()[1:]
    index = {
        "format": FORMAT, "key": key, "vae": identity, "source": source_fp,
        "preprocess": preprocess.fingerprint(), "dtype": dtype_name, "num_records": n,
        "shard_size": shard_size, "num_shards": num_shards, "latent_shape": latent_shape,
        "scaling_factor": float(vae.config.scaling_factor),
        "shift_factor": float(vae.config.shift_factor or 0.0),  # diffusers' SD VAEs leave it None
    }
    atomic_write(folder / "index.json", lambda tmp: Path(tmp).write_text(json.dumps(index, indent=1)))
    return folder


class LatentShards(torch.utils.data.Dataset):
    """An encoding written by `encode_shards`, checked on opening and read lazily.

    `shards.__getitems__(indices)` gives a batch {"mean", "std": float32 [B, C, h, w], unscaled,
    "caption": list[str], "label", "index": int64 [B]}. A DataLoader calls it for each batch; give it
    `collate_fn=torch.utils.data.default_convert`, which passes the batch on as it is.
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
                            f"reads format {FORMAT}. Encode again.")
        self._check()
        self._handles, self._per_record, self._pid = {}, {}, os.getpid()

    # ------------------------------------------------------------------ the encoding
    def __len__(self) -> int:
        return self.index["num_records"]

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.index["latent_shape"])

    def _range(self, s: int) -> tuple[int, int]:
        size = self.index["shard_size"]
        return s * size, min(len(self), (s + 1) * size)

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
        return (f"LatentShards({shown(self.path)}, {len(self)} records, latents {shape} {self.index['dtype']}, "
                f"{self.index['num_shards']} shards, source {self.index['source'].get('location', 'dataset')})")

    # ------------------------------------------------------------------ reading
    def _shard(self, s: int):
        """Shard s's safe_open handle, opened in this process (a forked worker drops the parent's)."""
        if self._pid != os.getpid():
            self._handles, self._per_record, self._pid = {}, {}, os.getpid()
        if s not in self._handles:
            self._handles[s] = safe_open(str(self.path / shard_name(s)), framework="pt")
        return self._handles[s]

    def _records(self, s: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """Shard s's (captions, labels, indices): small, so read whole once per process."""
        if s not in self._per_record:
            f = self._shard(s)
            self._per_record[s] = (json.loads(f.metadata()["captions"]), f.get_tensor("label"),
                                   f.get_tensor("index"))
        return self._per_record[s]

    def __getitems__(self, indices) -> dict:
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"Record indices must be in 0..{len(self) - 1}; got {idx.min()}..{idx.max()}.")
        batch = {name: torch.empty(len(idx), *self.latent_shape) for name in ("mean", "std")}
        batch |= {name: torch.empty(len(idx), dtype=torch.int64) for name in ("label", "index")}
        captions = [""] * len(idx)
        shard, row = idx // self.index["shard_size"], idx % self.index["shard_size"]
        row_bytes = math.prod(self.latent_shape) * DTYPES[self.index["dtype"]].itemsize
        for s in shard.unique().tolist():
            at = (shard == s).nonzero().squeeze(1)  # positions in the batch
            rows = row[at]
            for name in ("mean", "std"):
                batch[name][at] = _read_rows(self._shard(s).get_slice(name), rows, GAP_BYTES // row_bytes)
            shard_captions, labels, index = self._records(s)
            batch["label"][at], batch["index"][at] = labels[rows], index[rows]
            for p, r in zip(at.tolist(), rows.tolist()):
                captions[p] = shard_captions[r]
        return batch | {"caption": captions}

    def __getitem__(self, i: int) -> dict:
        return {name: value[0] for name, value in self.__getitems__([i]).items()}

    def captions(self):
        """Every caption, in record order (e.g. to fill a text-embedding cache)."""
        for s in range(self.index["num_shards"]):
            yield from self._records(s)[0]

    def __getstate__(self):  # handles are per process: a spawned worker opens its own
        return self.__dict__ | {"_handles": {}, "_per_record": {}}

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
    return torch.cat(parts).float()[inverse]

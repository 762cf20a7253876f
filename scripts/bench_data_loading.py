"""Reading latent records: our safetensors shards against `datasets` (Arrow), MosaicML `streaming`
(MDS) and `webdataset` (tar), measured on the same synthetic records.

One set of `--records` records like the ones `encode_shards` writes: a posterior mean and std of
`--latent-shape` (default 4,8,8) in bfloat16, an int64 label, the record's int64 index and a caption
of about 40 characters. Each format stores exactly the same bytes: where it has no bfloat16 (Arrow,
MDS, webdataset) the latents are stored as their uint16 bit patterns and viewed back as bfloat16 on
reading. Every format is written with about `--shard-records` records per shard (the default, 4096,
is encode_shards' shard_size) into a temporary folder, and every reader hands out the same batch:
{"mean", "std": float32 [B, C, h, w], "label", "index": int64 [B], "caption": list[str]} (what
`LatentShards.__getitems__` gives). Each pass checks its first batch against the records and
counts the records it read (every one once; the table flags a pass that read others).

Modes (records/s, median and range over `--repeats` passes over all records):
  random      random-access batches of `--batch-size` in a fresh shuffled global order each pass,
              read in the main process: what our Trainer's sampler (MicroBatches) asks a map-style
              dataset for;
  random-dl   the same batches through `torch.utils.data.DataLoader(batch_sampler=...,
              num_workers=--workers)`, collation done in the workers;
  stream      one pass in the format's own shuffled order, read in the main process (streaming's
              StreamingDataset(shuffle=True), webdataset's shard shuffle + shuffle buffer,
              datasets' to_iterable_dataset(num_shards).shuffle(buffer_size));
  stream-dl   the same pipeline through a DataLoader with `--workers` workers, which split the
              shards between them (each format's own worker splitting).
Our shards are map-style only and have no shuffled sequential reader of their own (the Trainer's
shuffled batches are `random`), webdataset has no random access: those cells are "-".

Formats: ours (LatentShards over shards written in encode_shards' layout), arrow (datasets'
save_to_disk, each latent a flat fixed-length uint16 list), arrow3d (the same with datasets.Array3D,
random batches only: the obvious feature for a [C, h, w] array, and a slow one to read), mds
(MosaicML streaming's MDSWriter / StreamingDataset, local only) and wds (webdataset tar shards,
one tar member per field: mean, std, label, caption).

Throughput counts from the first batch on (records after the first batch / time after it), so
that it is the steady rate a long training run sees; how long the first batch took (opening files,
starting workers, building shuffles) is in the JSON as first_batch_s. Formats and modes are
interleaved within each repeat so that load from elsewhere on the machine hits them alike.

What this measures, and what it does not: one machine, local disk, files just written (so in the
page cache: a cold disk or a network file system makes random access costlier than sequential
reads, which this benchmark cannot show), CPU only, one process (plus its loader workers). It does
not measure remote object storage, multi-node sharding or resumption, which is what streaming and
webdataset are built for.

    python scripts/bench_data_loading.py                                   # 20000 records, 4x8x8
    python scripts/bench_data_loading.py --records 5000 --latent-shape 4,32,32
    python scripts/bench_data_loading.py --formats ours,arrow --modes random,random-dl

Needs `datasets` (tutorial_lib[hf]) for arrow, `mosaicml-streaming` for mds, `webdataset` for wds;
a format whose package is missing is skipped with a note.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import math
import os
import platform
import random
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

FORMATS = ("ours", "arrow", "arrow3d", "mds", "wds")
MODES = ("random", "random-dl", "stream", "stream-dl")
PACKAGES = {"ours": "safetensors", "arrow": "datasets", "arrow3d": "datasets", "mds": "streaming",
            "wds": "webdataset"}
STORAGE = {"ours": "bfloat16 (safetensors BF16)",
           "arrow": "uint16 bits (fixed-length Sequence(uint16) of C*h*w; read back as int64, cast)",
           "arrow3d": "uint16 bits (Array3D uint16; read back as int64, cast)",
           "mds": "uint16 bits (ndarray:uint16 column)",
           "wds": "uint16 bits (raw little-endian bytes per tensor)"}

ADJECTIVES = ["small", "large", "bright", "dark", "faded", "striped", "plain", "shiny", "soft", "worn",
              "tiny", "heavy", "light", "old", "new", "patterned", "crumpled", "neat", "dotted", "long"]
COLOURS = ["red", "blue", "green", "black", "white", "grey", "yellow", "brown", "pink", "navy", "beige", "teal"]
NOUNS = ["shirt", "sneaker", "coat", "dress", "bag", "sandal", "pullover", "trouser", "boot", "hat",
         "scarf", "jacket", "skirt", "sock", "glove"]
PLACES = ["on a table", "on white", "in a shop", "on grass", "by a window", "on a bed", "in the rain",
          "on a shelf", "in sunlight", "on a chair"]


# ---------------------------------------------------------------------------------------------- records
def make_records(n: int, shape: tuple[int, ...], seed: int = 0) -> dict:
    """n synthetic records: mean, std bfloat16 [n, *shape], label, index int64 [n], caption list[str]."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(n, *shape, generator=g).to(torch.bfloat16)
    std = (0.05 + 0.2 * torch.rand(n, *shape, generator=g)).to(torch.bfloat16)
    rng = random.Random(seed)
    captions = [f"a {rng.choice(ADJECTIVES)} {rng.choice(COLOURS)} {rng.choice(NOUNS)} {rng.choice(PLACES)}"
                + (f", photo {rng.randrange(1000)}" if rng.random() < 0.5 else "") for _ in range(n)]
    return {"mean": mean, "std": std, "label": torch.randint(0, 10, (n,), generator=g),
            "index": torch.arange(n), "caption": captions}


def bits(t: torch.Tensor) -> np.ndarray:
    """A bfloat16 tensor's bit patterns as a uint16 array (the bytes every non-bf16 format stores)."""
    return t.view(torch.int16).numpy().view(np.uint16)


def from_bits(a: np.ndarray) -> torch.Tensor:
    """uint16 bit patterns [B, ...] -> float32 tensor of the bfloat16 values they encode."""
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.uint16).view(np.int16)).view(torch.bfloat16).float()


def collate_rows(rows: list[dict]) -> dict:
    """Rows {"mean", "std": uint16 [C, h, w], "label", "index": int, "caption": str} -> one batch."""
    return {"mean": from_bits(np.stack([r["mean"] for r in rows])),
            "std": from_bits(np.stack([r["std"] for r in rows])),
            "label": torch.tensor([int(r["label"]) for r in rows], dtype=torch.int64),
            "index": torch.tensor([int(r["index"]) for r in rows], dtype=torch.int64),
            "caption": [str(r["caption"]) for r in rows]}


def check_batch(batch: dict, records: dict):
    """Raise unless `batch` holds exactly the records its "index" names."""
    idx = batch["index"]
    for name in ("mean", "std"):
        if not torch.equal(batch[name], records[name][idx].float()):
            raise AssertionError(f"{name} differs from the records")
    if not torch.equal(batch["label"], records["label"][idx]):
        raise AssertionError("label differs from the records")
    if batch["caption"] != [records["caption"][i] for i in idx.tolist()]:
        raise AssertionError("caption differs from the records")


def whole(batch):
    """A DataLoader collate_fn for readers that hand out whole batches (module level: picklable)."""
    return batch


def shuffled_batches(n: int, batch_size: int, seed: int) -> list[list[int]]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


class BatchReader(torch.utils.data.Dataset):
    """A map-style dataset whose __getitems__ is one format's batch reader, for a DataLoader with a
    batch_sampler (what our Trainer builds)."""

    def __init__(self, n: int, read):
        self.n, self.read = n, read

    def __len__(self):
        return self.n

    def __getitems__(self, indices):
        return self.read(indices)

    def __getitem__(self, i):
        return self.read([i])


# ---------------------------------------------------------------------------------------------- formats
class Format:
    """Write the records; then `read(indices)` (random access, or None), `stream(epoch)` (the format's
    own shuffled pass, main process, or None) and `loader(kind, epoch)` (a DataLoader)."""
    name = ""
    random_access = True  # random and random-dl
    random_dl = True
    streams = True  # stream and stream-dl

    def __init__(self, folder: Path, args):
        self.folder, self.args = folder, args
        self.workers, self.batch_size = args.workers, args.batch_size

    def batches_loader(self, epoch: int):
        ds = BatchReader(self.n, self.read)
        return torch.utils.data.DataLoader(
            ds, batch_sampler=shuffled_batches(self.n, self.batch_size, epoch), collate_fn=whole,
            num_workers=self.workers)

    def files(self) -> list[Path]:
        return [p for p in self.folder.rglob("*") if p.is_file()]


class Ours(Format):
    """tutorial_lib.data.shards: safetensors shards + index.json, read by LatentShards."""
    name, streams = "ours", False

    def write(self, records: dict):
        from tutorial_lib.data.shards import FORMAT, pack_captions, shard_name
        n, size = len(records["caption"]), self.args.shard_records
        key = "lat-bench0000000000"
        self.folder.mkdir(parents=True)
        num_shards = math.ceil(n / size)
        for s in range(num_shards):
            a, b = s * size, min(n, (s + 1) * size)
            tensors = {"mean": records["mean"][a:b].contiguous(), "std": records["std"][a:b].contiguous(),
                       "label": records["label"][a:b].contiguous(), "index": records["index"][a:b].contiguous(),
                       **pack_captions(records["caption"][a:b])}
            save_file(tensors, str(self.folder / shard_name(s)),
                      metadata={"key": key, "records": json.dumps([a, b]), "skipped": "[]"})
        index = {"format": FORMAT, "key": key,
                 "vae": {"class": "synthetic", "config": {}, "weights_hash": "none"},
                 "source": {"kind": "synthetic", "records": n}, "preprocess": {}, "dtype": "bfloat16",
                 "num_records": n, "shard_size": size, "num_shards": num_shards, "skipped": 0,
                 "shard_records": [min(n, (s + 1) * size) - s * size for s in range(num_shards)],
                 "latent_shape": list(records["mean"].shape[1:]), "scaling_factor": 1.0, "shift_factor": 0.0}
        (self.folder / "index.json").write_text(json.dumps(index, indent=1))

    def open(self):
        from tutorial_lib.data.shards import LatentShards
        self.ds = LatentShards(self.folder)
        self.n = len(self.ds)
        return {"shards": self.ds.index["num_shards"]}

    def read(self, indices):
        return self.ds.__getitems__(indices)

    def batches_loader(self, epoch: int):  # LatentShards is the map-style dataset itself
        return torch.utils.data.DataLoader(
            self.ds, batch_sampler=shuffled_batches(self.n, self.batch_size, epoch), collate_fn=whole,
            num_workers=self.workers)


class Arrow(Format):
    """Hugging Face datasets: save_to_disk / load_from_disk (Arrow, memory-mapped). Each latent is a
    flat fixed-length list of C*h*w uint16, reshaped on reading: `datasets.Array3D` is the obvious
    feature for a [C, h, w] array but its numpy formatting was ~25x slower per random batch in a
    probe (15 ms against 0.6 ms for 128 records of 4x8x8), which the arrow3d format measures."""
    name = "arrow"

    def features(self, shape):
        import datasets
        latent = datasets.Sequence(datasets.Value("uint16"), length=math.prod(shape))
        return latent, lambda a: a.reshape(len(a), -1)

    def write(self, records: dict):
        import datasets
        shape = tuple(records["mean"].shape[1:])
        latent, layout = self.features(shape)
        features = datasets.Features({"mean": latent, "std": latent, "label": datasets.Value("int64"),
                                      "index": datasets.Value("int64"), "caption": datasets.Value("string")})
        n = len(records["caption"])
        with _quiet():
            ds = datasets.Dataset.from_dict(
                {"mean": layout(bits(records["mean"])), "std": layout(bits(records["std"])),
                 "label": records["label"].numpy(),
                 "index": records["index"].numpy(), "caption": records["caption"]}, features=features)
            ds.save_to_disk(str(self.folder), num_shards=math.ceil(n / self.args.shard_records))

    def open(self):
        import datasets
        with _quiet():
            self.ds = datasets.load_from_disk(str(self.folder))
        self.n = len(self.ds)
        # numpy, not torch: both give Array3D uint16 back as int64 (the torch formatter makes every
        # integer but uint8 int64), and the two took the same time per batch in a probe.
        self.np_ds = self.ds.with_format("numpy")
        self.num_shards = len(self.ds.cache_files)
        return {"shards": self.num_shards}

    def _latents(self, a: np.ndarray) -> torch.Tensor:
        return from_bits(a.astype(np.uint16).reshape(len(a), *self.args.latent_shape))

    def read(self, indices):
        b = self.np_ds[list(indices)]
        return {"mean": self._latents(b["mean"]), "std": self._latents(b["std"]),
                "label": torch.from_numpy(b["label"]), "index": torch.from_numpy(b["index"]),
                "caption": b["caption"].tolist()}

    def _iterable(self, epoch: int):
        ids = self.ds.to_iterable_dataset(num_shards=self.num_shards)
        ids = ids.shuffle(seed=self.args.seed, buffer_size=self.args.shuffle_buffer)
        ids.set_epoch(epoch)
        return ids.with_format("numpy")

    def _batches(self, ids):
        # .iter(batch_size) takes datasets' Arrow fast path (whole Arrow batches formatted at once);
        # ids.batch(B) in the DataLoader formats row by row and was ~20x slower in a probe.
        for b in ids.iter(batch_size=self.batch_size):
            yield {"mean": self._latents(b["mean"]), "std": self._latents(b["std"]),
                   "label": torch.from_numpy(b["label"]), "index": torch.from_numpy(b["index"]),
                   "caption": b["caption"].tolist()}

    def stream(self, epoch: int):
        return self._batches(self._iterable(epoch))

    def stream_loader(self, epoch: int):
        return torch.utils.data.DataLoader(_ArrowWorkerStream(self, epoch), batch_size=None,
                                           num_workers=self.workers)


class Arrow3D(Arrow):
    """The same with each latent a `datasets.Array3D((C, h, w), "uint16")`, random batches in the main
    process only (the mode where the layout shows; its shuffled stream formats whole Arrow batches)."""
    name, streams, random_dl = "arrow3d", False, False

    def features(self, shape):
        import datasets
        return datasets.Array3D(shape, "uint16"), lambda a: a


class _ArrowWorkerStream(torch.utils.data.IterableDataset):
    """Each DataLoader worker reads its share of the shards: datasets' split_dataset_by_node with the
    worker as the node (num_shards divisible by the workers: whole shards, else every k-th record)."""

    def __init__(self, fmt: Arrow, epoch: int):
        self.fmt, self.epoch = fmt, epoch

    def __iter__(self):
        from datasets.distributed import split_dataset_by_node
        info = torch.utils.data.get_worker_info()
        ids = self.fmt._iterable(self.epoch)
        if info is not None:
            ids = split_dataset_by_node(ids, rank=info.id, world_size=info.num_workers)
        return self.fmt._batches(ids)


class MDS(Format):
    """MosaicML streaming: MDSWriter, StreamingDataset(local=...) (no remote: files already local)."""
    name = "mds"

    def write(self, records: dict):
        from streaming import MDSWriter
        shape = ",".join(map(str, records["mean"].shape[1:]))
        columns = {"mean": f"ndarray:uint16:{shape}", "std": f"ndarray:uint16:{shape}", "label": "int64",
                   "index": "int64", "caption": "str"}
        mean, std = bits(records["mean"]), bits(records["std"])
        # MDS cuts shards by bytes, not records: a record is its columns plus a 4-byte offset and a
        # 4-byte length for the caption, so this gives about --shard-records records a shard.
        caption_bytes = sum(len(c.encode()) for c in records["caption"]) / len(records["caption"])
        row_bytes = 2 * mean[0].nbytes + 16 + 8 + math.ceil(caption_bytes)
        with MDSWriter(out=str(self.folder), columns=columns, compression=None,
                       size_limit=row_bytes * self.args.shard_records) as out:
            for i in range(len(records["caption"])):
                out.write({"mean": mean[i], "std": std[i], "label": int(records["label"][i]),
                           "index": i, "caption": records["caption"][i]})

    def open(self):
        from streaming import StreamingDataset
        # Two instances of the same dataset: one read in this process, one only ever iterated by
        # DataLoader workers. Once this process has iterated an instance, its inter-process barrier's
        # FileLock has been used here, and filelock >= 4 refuses a lock that a forked worker inherits
        # ("inherited across fork; construct a new instance").
        with _quiet():
            self.ds, self.loader_ds = (
                StreamingDataset(local=str(self.folder), shuffle=True, batch_size=self.batch_size,
                                 shuffle_seed=self.args.seed) for _ in range(2))
        self.n = self.ds.num_samples
        return {"shards": len(self.ds.shards), "shuffle_algo": self.ds.shuffle_algo,
                "num_canonical_nodes": self.ds.num_canonical_nodes}

    def read(self, indices):
        return collate_rows([self.ds[i] for i in indices])

    def stream(self, epoch: int):
        # Each iteration of a StreamingDataset is its next epoch (its shuffle is seeded by seed + epoch).
        it = iter(self.ds)
        while rows := [r for _, r in zip(range(self.batch_size), it)]:
            yield collate_rows(rows)

    def stream_loader(self, epoch: int):
        return torch.utils.data.DataLoader(self.loader_ds, batch_size=self.batch_size, collate_fn=collate_rows,
                                           num_workers=self.workers)


class WDS(Format):
    """webdataset: tar shards written by ShardWriter; sequential only (shard shuffle + buffer)."""
    name, random_access = "wds", False

    def write(self, records: dict):
        import webdataset as wds
        self.folder.mkdir(parents=True)
        mean, std = bits(records["mean"]), bits(records["std"])
        with wds.ShardWriter(str(self.folder / "shard-%05d.tar"), maxcount=self.args.shard_records,
                             verbose=0) as sink:
            for i in range(len(records["caption"])):
                sink.write({"__key__": f"{i:09d}", "mean.u16": mean[i].tobytes(), "std.u16": std[i].tobytes(),
                            "cls": int(records["label"][i]), "txt": records["caption"][i]})

    def open(self):
        self.urls = sorted(str(p) for p in self.folder.glob("shard-*.tar"))
        self.shape = self.args.latent_shape
        self.n = self.args.records
        return {"shards": len(self.urls)}

    def _pipeline(self, epoch: int):
        import webdataset as wds
        shape = self.shape

        def decode(s):
            return {"mean": np.frombuffer(s["mean.u16"], np.uint16).reshape(shape),
                    "std": np.frombuffer(s["std.u16"], np.uint16).reshape(shape),
                    "label": int(s["cls"]), "index": int(s["__key__"]), "caption": s["txt"].decode()}

        seed = self.args.seed + epoch
        return (wds.WebDataset(self.urls, shardshuffle=len(self.urls), seed=seed, empty_check=False)
                .shuffle(self.args.shuffle_buffer, seed=seed).map(decode)
                .batched(self.batch_size, collation_fn=collate_rows, partial=True))

    def stream(self, epoch: int):
        return iter(self._pipeline(epoch))

    def stream_loader(self, epoch: int):
        return torch.utils.data.DataLoader(self._pipeline(epoch), batch_size=None, num_workers=self.workers)


CLASSES = {"ours": Ours, "arrow": Arrow, "arrow3d": Arrow3D, "mds": MDS, "wds": WDS}


@contextlib.contextmanager
def _quiet():
    """Silence progress bars and warnings of the libraries while writing and opening."""
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


# ---------------------------------------------------------------------------------------------- timing
def batches_for(fmt: Format, mode: str, epoch: int):
    """The batches of one pass of `mode`, or None where the format does not offer it."""
    if mode == "random" and fmt.random_access:
        return (fmt.read(b) for b in shuffled_batches(fmt.n, fmt.batch_size, epoch))
    if mode == "random-dl" and fmt.random_access and fmt.random_dl:
        return fmt.batches_loader(epoch)
    if mode == "stream" and fmt.streams:
        return fmt.stream(epoch)
    if mode == "stream-dl" and fmt.streams:
        return fmt.stream_loader(epoch)
    return None


def time_pass(batches, records: dict, check: bool) -> dict:
    """Read one pass; records/s after the first batch, the first batch's latency, coverage."""
    start = time.perf_counter()
    it = iter(batches)
    first = next(it)
    t_first = time.perf_counter()
    after, seen = 0, [first["index"]]
    if check:
        check_batch(first, records)
    for batch in it:
        after += len(batch["index"])
        seen.append(batch["index"])
    end = time.perf_counter()
    seen = torch.cat(seen)
    return {"records_per_s": after / (end - t_first) if after else float("nan"),
            "first_batch_s": t_first - start, "seconds": end - start, "records": len(seen),
            "unique": len(torch.unique(seen))}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def available(name: str) -> str | None:
    """The version of the package a format needs, or None if it is not installed."""
    try:
        module = importlib.import_module(PACKAGES[name])
    except ImportError:
        return None
    return getattr(module, "__version__", "?")


def run(args) -> dict:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    shape = tuple(args.latent_shape)
    records = make_records(args.records, shape, args.seed)
    raw = 2 * records["mean"][0].numel() * 2 + 16 + sum(len(c.encode()) for c in records["caption"]) / args.records
    result = {"config": {k: v for k, v in vars(args).items() if k != "out"},
              "machine": {"python": platform.python_version(), "platform": platform.platform(),
                          "cpus": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads()},
              "raw_bytes_per_record": raw, "versions": {}, "skipped": {}, "formats": {}}
    root = Path(tempfile.mkdtemp(prefix="bench-data-", dir=args.tmp))
    fmts = {}
    try:
        if "mds" in args.formats and available("mds"):
            from streaming.base.util import clean_stale_shared_memory
            clean_stale_shared_memory()
        for name in args.formats:
            version = available(name)
            if version is None:
                result["skipped"][name] = f"package {PACKAGES[name]!r} not installed"
                print(f"skipping {name}: {result['skipped'][name]}")
                continue
            result["versions"][PACKAGES[name]] = version
            fmt = CLASSES[name](root / name, args)
            t = time.perf_counter()
            fmt.write(records)
            write_s = time.perf_counter() - t
            info = fmt.open()
            if fmt.n != args.records:
                raise AssertionError(f"{name}: {fmt.n} records, wrote {args.records}")
            size = folder_bytes(fmt.folder)
            result["formats"][name] = {"storage": STORAGE[name], "write_s": write_s, "bytes": size,
                                       "bytes_per_record": size / args.records, **info, "modes": {}}
            print(f"{name}: wrote {args.records} records in {write_s:.2f} s, {size / 2**20:.1f} MiB, {info}")
            fmts[name] = fmt
        for r in range(-1 if args.warmup else 0, args.repeats):  # r = -1: the untimed warm-up pass
            for name, fmt in fmts.items():
                for mode in args.modes:
                    batches = batches_for(fmt, mode, epoch=max(r, 0) + 1)
                    if batches is None:
                        continue
                    with _quiet() if name in ("mds", "wds") else contextlib.nullcontext():
                        timing = time_pass(batches, records, check=True)
                    if r < 0:
                        continue
                    modes = result["formats"][name]["modes"].setdefault(mode, {"passes": []})
                    modes["passes"].append(timing)
            if r >= 0:
                print(f"repeat {r + 1}/{args.repeats} done")
        for name, entry in result["formats"].items():
            for mode, m in entry["modes"].items():
                rates = [p["records_per_s"] for p in m["passes"]]
                m |= {"median": statistics.median(rates), "min": min(rates), "max": max(rates),
                      "first_batch_s": statistics.median(p["first_batch_s"] for p in m["passes"]),
                      "records": m["passes"][0]["records"],
                      "unique_fraction": m["passes"][0]["unique"] / args.records}
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return result


def table(result: dict) -> str:
    cfg = result["config"]
    shape = "x".join(map(str, cfg["latent_shape"]))
    head = (f"{cfg['records']} records, latents {shape} (mean + std), batch {cfg['batch_size']}, "
            f"{cfg['workers']} loader workers, thousand records/s: median (min-max) of {cfg['repeats']} passes")
    rows = ["| format | stores bf16 as | write s | MiB on disk | " + " | ".join(MODES) + " |",
            "|---|---|---|---|" + "---|" * len(MODES)]
    for name, entry in result["formats"].items():
        cells = []
        for mode in MODES:
            m = entry["modes"].get(mode)
            if m is None:
                cells.append("-")
            else:
                note = "" if m["unique_fraction"] == 1 and m["records"] == cfg["records"] else \
                    f" [{m['records']} read, {m['unique_fraction']:.0%} unique]"
                cells.append(f"{m['median'] / 1e3:.1f} ({m['min'] / 1e3:.1f}-{m['max'] / 1e3:.1f}){note}")
        storage = entry["storage"].split(" (")[0]
        rows.append(f"| {name} | {storage} | {entry['write_s']:.2f} | {entry['bytes'] / 2**20:.1f} | "
                    + " | ".join(cells) + " |")
    return head + "\n\n" + "\n".join(rows)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=20000)
    p.add_argument("--latent-shape", type=lambda s: tuple(int(x) for x in s.split(",")), default=(4, 8, 8))
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers for random-dl and stream-dl")
    p.add_argument("--shard-records", type=int, default=4096, help="records per shard, every format")
    p.add_argument("--shuffle-buffer", type=int, default=1000, help="arrow's and webdataset's shuffle buffer")
    p.add_argument("--formats", type=lambda s: s.split(","), default=list(FORMATS))
    p.add_argument("--modes", type=lambda s: s.split(","), default=list(MODES))
    p.add_argument("--threads", type=int, default=1, help="torch threads in the main process (0: default)")
    p.add_argument("--warmup", action="store_true", help="an untimed pass first (the files are in the page "
                   "cache anyway, having just been written, and each pass's first batch is not timed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tmp", default=None, help="folder for the temporary files (default: the system's)")
    p.add_argument("--keep", action="store_true", help="keep the written files")
    p.add_argument("--out", default=None, help="write the results here as JSON")
    args = p.parse_args(argv)
    for name in args.formats:
        if name not in FORMATS:
            p.error(f"unknown format {name!r}; choose from {', '.join(FORMATS)}")
    for mode in args.modes:
        if mode not in MODES:
            p.error(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    t = time.perf_counter()
    result = run(args)
    result["total_s"] = time.perf_counter() - t
    print()
    print(table(result))
    print(f"\nversions: {result['versions']}; total {result['total_s']:.0f} s")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()

"""Data preparation at scale: peak memory and records/s of `encode_shards` (encode-latents) and of the
caption-embedding cache over synthetic records with distinct captions, at several dataset sizes.

For each size N in `--records` (default 100,000 and 1,000,000) a parquet file of N records is written:
tiny RGB PNGs (`--image-size`, default 8x8, drawn from a pool of 64), one distinct caption per record
("record 12345: a red circle at the top left, ...", about 60 characters) and, every 100,000th record,
bytes that are not an image (skipped and counted, never fatal). Then each stage runs in a fresh Python
process (after `arrow`, datasets' one-time conversion of the parquet file into its Arrow cache,
measured apart), so that its peak resident memory (`resource.getrusage(RUSAGE_SELF).ru_maxrss`, and for the
DataLoader workers that decode the images `RUSAGE_CHILDREN`, the largest worker) is its own:

  latents   `encode_shards` with a tiny VAE of ours (widths 8, 16: 3x8x8 -> 4x4x4), shard_size 4096,
            batch 256, `--workers` decode workers, CPU, float32 weights, bfloat16 storage (the
            time includes opening datasets' Arrow cache and checking every caption, `load_s`)
  captions  `encode_caption_cache` over the encoding's captions (`LatentShards.captions()`, read one
            shard at a time) with a stand-in frozen text encoder, `BytesEncoder`: its first 16 UTF-8
            bytes, each looked up in a fixed random 256 x 8 table. It costs about nothing, so the
            figure is the data path's (reading captions, dedup, writing shards, checking, indexing),
            not an encoder's: MiniLM or CLIP on a GPU are far slower per caption. Then the cache is
            opened with the captions checked against it and one random batch of 256 is read.

`baseline_rss_mb` is the process's resident memory after its imports, before the stage; the peak
beyond it is what the stage itself holds. ru_maxrss counts the pages of memory-mapped files that were
read (datasets' Arrow table, the shards), which the kernel can drop at will, together with the
process's own heap; a thread therefore also samples /proc every 50 ms for the peaks of RssAnon (the
heap: what must not grow with the records) and RssFile (mapped files), of the process and of its
largest DataLoader worker. Both numbers are measured, never asserted (nothing here
fails on a slow machine). Written as JSON to `--out`:

    nice -n 10 python scripts/bench_data_prep.py                      # 100,000 and 1,000,000 records
    python scripts/bench_data_prep.py --records 20000 --out /tmp/prep.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
POOL = 64  # distinct images, cycled
BAD_EVERY = 100_000  # one record in this many holds bytes that are not an image
COLORS, SHAPES = ("red", "green", "blue", "yellow"), ("circle", "square", "triangle")
PLACES = ("top left", "top right", "bottom left", "bottom right", "centre")


def caption(i: int) -> str:
    """A distinct caption for record i."""
    return (f"record {i}: a {COLORS[i % 4]} {SHAPES[i // 4 % 3]} at the {PLACES[i // 12 % 5]}, "
            f"seen {i % 997} times")


def write_parquet(path: Path, n: int, size: int, chunk: int = 10_000) -> Path:
    """n records in row groups of `chunk`: never the whole table in memory."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    pool = []
    for k in range(POOL):
        g = torch.Generator().manual_seed(k)
        pixels = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        pool.append(buffer.getvalue())
    schema = pa.schema([("image", pa.binary()), ("caption", pa.string())])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, n, chunk):
            rows = range(start, min(n, start + chunk))
            images = [b"not an image" if i % BAD_EVERY == BAD_EVERY - 1 else pool[i % POOL] for i in rows]
            writer.write_table(pa.table({"image": images, "caption": [caption(i) for i in rows]}, schema=schema))
    return path


def bytes_encoder():
    """The stand-in frozen encoder (see the module docstring), built here so that tests can use it too."""
    from tutorial_lib.text.base import TextEmbedding, TextEncoder

    class BytesEncoder(TextEncoder):
        name, length = "bytes", 16

        def __init__(self):
            super().__init__()
            self.register_buffer("table", torch.randn(256, 8, generator=torch.Generator().manual_seed(0)))

        @property
        def dim(self) -> int:
            return 8

        def encode(self, prompt) -> TextEmbedding:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            codes = torch.zeros(len(prompts), self.length, dtype=torch.int64)
            mask = torch.zeros(len(prompts), self.length, dtype=torch.bool)
            for b, p in enumerate(prompts):
                data = torch.frombuffer(bytearray(p.encode()[:self.length]), dtype=torch.uint8) if p else None
                if data is not None:
                    codes[b, :len(data)], mask[b, :len(data)] = data.long(), True
            mask[:, 0] = True  # "" keeps one token, as real encoders keep their special tokens
            return TextEmbedding(self.table[codes.to(self.table.device)], mask.to(self.table.device))

    return BytesEncoder()


def tiny_vae():
    from tutorial_lib.vae.autoencoder import AutoencoderKL, VAEConfig

    torch.manual_seed(0)
    return AutoencoderKL(VAEConfig(in_channels=3, channels=(8, 16), latent_channels=4, norm_groups=8)).eval()


def rss_mb(pid="self", field: str = "VmRSS") -> float:
    """A process's resident memory now, from /proc (Linux): VmRSS (all), RssAnon (its own heap and
    stacks) or RssFile (pages of memory-mapped files: the page cache's, which the kernel can drop)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024
    except (OSError, StopIteration):  # the process has ended
        return 0.0


class Sampler(threading.Thread):
    """Peak RssAnon and RssFile of this process and, separately, of its largest child (a DataLoader
    worker), sampled every 50 ms: ru_maxrss alone cannot tell a heap that grows from mapped files read."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak = {"anon_mb": 0.0, "file_mb": 0.0, "worker_anon_mb": 0.0, "worker_file_mb": 0.0}
        self.done = threading.Event()

    def children(self) -> list[str]:
        pids = []
        for task in Path("/proc/self/task").iterdir():
            with contextlib.suppress(OSError):
                pids += (task / "children").read_text().split()
        return pids

    def run(self):
        while not self.done.wait(0.05):
            self.sample()

    def sample(self):
        self.peak["anon_mb"] = max(self.peak["anon_mb"], rss_mb(field="RssAnon"))
        self.peak["file_mb"] = max(self.peak["file_mb"], rss_mb(field="RssFile"))
        for pid in self.children():
            self.peak["worker_anon_mb"] = max(self.peak["worker_anon_mb"], rss_mb(pid, "RssAnon"))
            self.peak["worker_file_mb"] = max(self.peak["worker_file_mb"], rss_mb(pid, "RssFile"))

    def stop(self) -> dict:
        self.done.set()
        self.join()
        self.sample()  # a stage shorter than one period is sampled at its end
        return {f"peak_{k}": v for k, v in self.peak.items()}


def peak_mb(who=resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # kilobytes on Linux


def stage_latents(args) -> dict:
    from tutorial_lib.data.shards import LatentShards, encode_shards
    from tutorial_lib.data.sources import Preprocess, SourceSpec

    vae, baseline, sampler = tiny_vae(), rss_mb(), Sampler()
    spec = SourceSpec.resolve(args.data)
    sampler.start()
    start = time.perf_counter()
    spec.load(decode_images=False)  # as encode_shards loads it, from the Arrow cache that "arrow" made
    load_s = time.perf_counter() - start
    folder = encode_shards(spec, vae, args.root, Preprocess(args.image_size, "center_crop", 3), shard_size=4096,
                           batch_size=256, num_workers=args.workers)
    seconds = time.perf_counter() - start
    peaks = sampler.stop()
    shards = LatentShards(folder)
    return {**peaks, "folder": str(folder), "records": len(shards) + shards.index["skipped"], "kept": len(shards),
            "skipped": shards.index["skipped"], "seconds": seconds, "load_s": load_s,
            "records_per_s": (len(shards) + shards.index["skipped"]) / seconds, "baseline_rss_mb": baseline,
            "peak_rss_mb": peak_mb(), "peak_worker_rss_mb": peak_mb(resource.RUSAGE_CHILDREN)}


def stage_arrow(args) -> dict:
    """datasets' one-time conversion of the parquet file into its memory-mapped Arrow cache: its
    memory follows the file's row groups (`write_parquet` writes 10,000 rows each), not ours."""
    from tutorial_lib.data.sources import SourceSpec

    baseline, sampler = rss_mb(), Sampler()
    sampler.start()
    start = time.perf_counter()
    SourceSpec.resolve(args.data).load(decode_images=False)
    return {**sampler.stop(), "seconds": time.perf_counter() - start, "baseline_rss_mb": baseline,
            "peak_rss_mb": peak_mb()}


def stage_captions(args) -> dict:
    from tutorial_lib.data.shards import LatentShards
    from tutorial_lib.text.embedding_cache import CaptionEmbeddingCache, encode_caption_cache

    shards, encoder = LatentShards(args.folder), bytes_encoder()
    baseline, sampler = rss_mb(), Sampler()
    sampler.start()
    start = time.perf_counter()
    folder = encode_caption_cache(shards.captions(), encoder, Path(args.folder) / "text-bench",
                                  shard_size=args.caption_shard_size)
    seconds = time.perf_counter() - start
    cache = CaptionEmbeddingCache(folder, encoder.cache_key(), shards.captions())
    open_s = time.perf_counter() - start - seconds
    batch = cache.take(torch.randint(0, len(cache), (256,), generator=torch.Generator().manual_seed(0)))
    return {**sampler.stop(), "records": len(cache), "rows": cache.index["num_rows"], "seconds": seconds,
            "records_per_s": len(cache) / seconds, "open_and_check_s": open_s,
            "batch_shape": list(batch.tokens.shape), "baseline_rss_mb": baseline, "peak_rss_mb": peak_mb()}


STAGES = {"arrow": stage_arrow, "latents": stage_latents, "captions": stage_captions}


def run_stage(name: str, *flags: str) -> dict:
    """One stage in a fresh process (its own peak memory); its JSON result."""
    env = {**os.environ, "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run([sys.executable, __file__, "--stage", name, *flags], env=env, check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", default="100000,1000000", help="dataset sizes, comma-separated")
    p.add_argument("--image-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers that decode (default: %(default)s)")
    p.add_argument("--caption-shard-size", type=int, default=50_000)
    p.add_argument("--tmp", type=Path, help="where the data and encodings go (default: a new temporary folder)")
    p.add_argument("--out", type=Path, default=Path("bench_data_prep.json"))
    p.add_argument("--stage", choices=tuple(STAGES), help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.stage:  # inside a stage's own process
        print(json.dumps(STAGES[args.stage](args)))
        return {}

    tmp = Path(tempfile.mkdtemp(dir=args.tmp))
    os.environ["HF_DATASETS_CACHE"] = str(tmp / "hf")  # datasets' Arrow cache of the parquet files
    result = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "cpus": os.cpu_count(),
              "torch": torch.__version__, "image_size": args.image_size, "workers": args.workers, "sizes": {}}
    try:
        for n in (int(v) for v in args.records.split(",")):
            start = time.perf_counter()
            data = write_parquet(tmp / f"records-{n}.parquet", n, args.image_size)
            entry = {"write_parquet_s": time.perf_counter() - start}
            entry["arrow"] = run_stage("arrow", "--data", str(data))
            entry["latents"] = run_stage("latents", "--data", str(data), "--root", str(tmp / f"shards-{n}"),
                                         "--image-size", str(args.image_size), "--workers", str(args.workers))
            entry["captions"] = run_stage("captions", "--folder", entry["latents"]["folder"],
                                          "--caption-shard-size", str(args.caption_shard_size))
            result["sizes"][n] = entry
            print(json.dumps({n: entry}, indent=1), flush=True)
            shutil.rmtree(tmp / f"shards-{n}")
            data.unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()

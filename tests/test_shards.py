"""tutorial_lib.data.shards: encoding sources into latent shards once, resuming, splitting, reading.

Sources are the drawn shapes of test_sources (12 records, 64x64 RGB) with a tiny diffusers VAE,
and the first records of Fashion-MNIST with the course's shipped VAE; all written under tmp_path.
"""

from __future__ import annotations

import concurrent.futures
import copy
import json
import pickle
import shutil
import threading

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tutorial_lib.data import shards as shards_mod
from tutorial_lib.data.fashion_mnist import DataError, find_data_dir, load_fashion_mnist, to_model_images
from tutorial_lib.data.shards import LatentShards, encode_shards, shard_name, vae_identity
from tutorial_lib.data.sources import Preprocess, SourceSpec, load_source
from tutorial_lib.vae.diffusers_interop import from_diffusers
from tutorial_lib.weights import weights_hash

# hf_cache is an autouse fixture: importing it puts datasets' cache under tmp_path here too.
from tests.test_sources import hf_cache, make_imagefolder, make_parquet, png_bytes, shape_records  # noqa: F401

diffusers = pytest.importorskip("diffusers")
PRE = Preprocess(16, "center_crop", channels=3)  # 16x16 images -> 4x8x8 latents (f = 2)
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=2 ** -8, atol=1e-5),
             torch.float16: dict(rtol=2 ** -11, atol=1e-6)}


def tiny_diffusers_vae(latent_channels: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=8, sample_size=64).eval()


@pytest.fixture
def vae():
    return tiny_diffusers_vae()


@pytest.fixture
def shapes(tmp_path) -> SourceSpec:
    return SourceSpec.resolve(make_imagefolder(tmp_path / "shapes"), label_column="shape")


def encode(source, vae, root, **kwargs):
    return encode_shards(source, vae, root, kwargs.pop("preprocess", PRE),
                         **({"shard_size": 5, "num_workers": 0} | kwargs))


def as_ranks(world_size: int, fn):
    """fn(rank, barrier) for every rank at once, in threads that share a barrier (as torchrun's
    processes share torch.distributed's); returns their results in rank order."""
    wall = threading.Barrier(world_size, timeout=120)
    with concurrent.futures.ThreadPoolExecutor(world_size) as pool:
        return [f.result() for f in [pool.submit(fn, rank, wall.wait) for rank in range(world_size)]]


def expected_posterior(vae, source: SourceSpec, preprocess: Preprocess = PRE):
    records = source.load()
    x = torch.stack([preprocess(image, i) for i, image in enumerate(records["image"])])
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
    return posterior.mean, posterior.std


def shard_tensors(folder) -> dict:
    """Every shard's tensors, concatenated in record order (read whole: for checking only)."""
    parts = [load_file(str(p)) for p in sorted(folder.glob("shard-*.safetensors"))]
    return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}


# ----------------------------------------------------------------------------- layout
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_layout_and_the_stored_posterior(vae, shapes, tmp_path, dtype):
    folder = encode(shapes, vae, tmp_path / "latents", dtype=dtype, batch_size=4)
    assert folder.parent == tmp_path / "latents" and folder.name.startswith("lat-") and len(folder.name) == 20
    index = json.loads((folder / "index.json").read_text())
    dtype_name = str(dtype).removeprefix("torch.")
    assert index["format"] == 2 and index["key"] == folder.name and index["dtype"] == dtype_name
    assert (index["num_records"], index["shard_size"], index["num_shards"]) == (12, 5, 3)
    assert index["shard_records"] == [5, 5, 2] and index["skipped"] == 0
    assert index["latent_shape"] == [4, 8, 8]
    assert index["scaling_factor"] == pytest.approx(0.18215) and index["shift_factor"] == 0.0
    assert index["vae"] == vae_identity(vae) and index["vae"]["class"] == "diffusers.models." \
        "autoencoders.autoencoder_kl.AutoencoderKL" and "_use_default_values" not in index["vae"]["config"]
    assert index["source"] == shapes.fingerprint() and index["preprocess"] == PRE.fingerprint()
    assert sorted(p.name for p in folder.iterdir()) == ["index.json"] + [shard_name(s) for s in range(3)]

    records = shape_records()
    for s, count in enumerate((5, 5, 2)):
        with safe_open(str(folder / shard_name(s)), framework="pt") as f:
            assert f.metadata() == {"key": folder.name, "records": f"[{5 * s}, {5 * s + count}]", "skipped": "[]"}
            text = f.get_tensor("caption_bytes").numpy().tobytes().decode()  # the captions, one UTF-8 blob
            bounds = f.get_tensor("caption_offsets").tolist()
            assert [text[a:b] for a, b in zip(bounds, bounds[1:])] == [r[1] for r in records[5 * s:5 * s + count]]
            assert f.get_slice("mean").get_shape() == [count, 4, 8, 8] == f.get_slice("std").get_shape()
    stored = shard_tensors(folder)
    assert stored["mean"].dtype == dtype == stored["std"].dtype and stored["label"].dtype == torch.int64
    assert stored["label"].tolist() == [r[2] for r in records] and stored["index"].tolist() == list(range(12))
    mean, std = expected_posterior(vae, shapes)
    torch.testing.assert_close(stored["mean"].float(), mean, **TOLERANCE[dtype])
    torch.testing.assert_close(stored["std"].float(), std, **TOLERANCE[dtype])


def test_course_vae_on_fashion_mnist(shipped_vae, tmp_path):
    try:
        find_data_dir(download=False)
    except DataError:
        pytest.skip("Fashion-MNIST is not installed")
    spec = SourceSpec.resolve("fashion-mnist", split="test", label_column="label", limit=64)
    folder = encode_shards(spec, shipped_vae, tmp_path, Preprocess(32, "pad", channels=1),
                           shard_size=40, dtype=torch.float32, batch_size=32)
    shards = LatentShards(folder)
    assert len(shards) == 64 and shards.latent_shape == (4, 8, 8) and shards.index["num_shards"] == 2
    assert shards.index["vae"]["weights_hash"] == weights_hash(shipped_vae)
    assert shards.index["scaling_factor"] == shipped_vae.config.scaling_factor
    images, labels = load_fashion_mnist("test")
    x = to_model_images(images[:64])
    with torch.no_grad():
        posterior = shipped_vae.encode(x)
    batch = shards.__getitems__(list(range(64)))
    torch.testing.assert_close(batch["mean"], posterior.mean, **TOLERANCE[torch.float32])
    torch.testing.assert_close(batch["std"], posterior.std, **TOLERANCE[torch.float32])
    torch.testing.assert_close(shards.scaled(batch["mean"]), shipped_vae.encode_to_latents(x),
                               **TOLERANCE[torch.float32])
    assert batch["label"].tolist() == labels[:64].tolist()
    shards.check_vae(shipped_vae)
    shards.check_channels(4)


# ----------------------------------------------------------------------------- resuming, ranks
@pytest.fixture
def encoded_starts(monkeypatch):
    """The first record of every shard that is encoded from here on."""
    starts, write_shard = [], shards_mod._write_shard

    def counted(path, key, start, *args):
        starts.append(start)
        return write_shard(path, key, start, *args)

    monkeypatch.setattr(shards_mod, "_write_shard", counted)
    return starts


def test_resume_reencodes_only_the_missing_and_damaged_shards(vae, shapes, tmp_path, encoded_starts):
    folder = encode(shapes, vae, tmp_path)
    before = shard_tensors(folder)
    untouched = (folder / shard_name(0)).stat().st_mtime_ns
    assert encode(shapes, vae, tmp_path) == folder and encoded_starts == [0, 5, 10]  # nothing to redo

    (folder / shard_name(1)).unlink()
    damaged = folder / shard_name(2)
    damaged.write_bytes(damaged.read_bytes()[:-7])
    with pytest.raises(DataError, match=r"incomplete: shards 1 missing — run encode_shards again to finish;"
                                        r" shard-00002.safetensors: damaged"):
        LatentShards(folder)
    assert encode(shapes, vae, tmp_path) == folder
    assert encoded_starts == [0, 5, 10, 5, 10]
    assert (folder / shard_name(0)).stat().st_mtime_ns == untouched
    after = shard_tensors(folder)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert len(LatentShards(folder)) == 12


def test_a_shard_from_another_encoding_is_refused_then_replaced(vae, shapes, tmp_path):
    folder = encode(shapes, vae, tmp_path / "a")
    other = encode(shapes, vae, tmp_path / "b", dtype=torch.float16)
    shutil.copy(other / shard_name(1), folder / shard_name(1))
    with pytest.raises(DataError, match=f"shard-00001.safetensors: from another encoding \\('{other.name}', "
                                        f"not '{folder.name}'\\)"):
        LatentShards(folder)
    encode(shapes, vae, tmp_path / "a")
    assert LatentShards(folder)[7]["caption"] == shape_records()[7][1]


def test_two_ranks_write_what_one_process_writes(vae, shapes, tmp_path, encoded_starts):
    split = as_ranks(2, lambda rank, barrier: encode(shapes, copy.deepcopy(vae), tmp_path / "split", rank=rank,
                                                     world_size=2, barrier=barrier))
    assert split[0] == split[1] and sorted(encoded_starts) == [0, 5, 10]
    split = split[0]
    whole = encode(shapes, vae, tmp_path / "whole")
    assert whole.name == split.name
    assert (whole / "index.json").read_text() == (split / "index.json").read_text()
    for s in range(3):
        a, b = (safe_open(str(f / shard_name(s)), framework="pt") for f in (whole, split))
        assert a.metadata() == b.metadata()
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())


def test_rank_0_writes_the_index_after_the_barrier_and_only_if_every_shard_is_there(vae, shapes, tmp_path):
    calls = []

    def rank_0_alone():  # rank 1 never encodes its shard 1
        calls.append("barrier")
        return None

    folder = encode(shapes, vae, tmp_path, rank=0, world_size=2, barrier=rank_0_alone)
    assert calls == ["barrier", "barrier"] and not (folder / "index.json").exists()
    with pytest.raises(DataError, match=r"no index.json, so not a finished encoding \(2 shards written so far\)"):
        LatentShards(folder)
    with pytest.raises(ValueError, match="world_size=2 needs a barrier: join a process group first"):
        encode(shapes, vae, tmp_path, rank=1, world_size=2)


def test_undecodable_images_are_skipped_counted_and_reported(vae, tmp_path, capsys):
    """Broken bytes in records 1 and 7 of 12 (shards of 5): every other record is encoded, in workers."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = shape_records()
    images = [png_bytes(r[0]) for r in records]
    images[1], images[7] = b"not an image", images[7][:40]  # garbage, and a truncated PNG
    path = tmp_path / "broken.parquet"
    pq.write_table(pa.table({"image": images, "caption": [r[1] for r in records]}), path)
    spec = SourceSpec.resolve(path)
    folder = encode(spec, vae, tmp_path / "latents", num_workers=2)
    assert "Skipped 2 of 12 records whose image does not decode (records 1, 7; e.g. " in capsys.readouterr().out
    shards = LatentShards(folder)
    assert len(shards) == 10 and shards.index["skipped"] == 2 and shards.index["shard_records"] == [4, 4, 2]
    kept = [i for i in range(12) if i not in (1, 7)]
    batch = shards.__getitems__(list(range(10)))
    assert batch["index"].tolist() == kept and batch["caption"] == [records[i][1] for i in kept]
    mean, _ = expected_posterior(vae, SourceSpec.resolve(make_parquet(tmp_path / "whole.parquet", records),
                                                         image_column="png", text_column="txt"))
    torch.testing.assert_close(batch["mean"], mean[kept], **TOLERANCE[torch.bfloat16])
    assert list(shards.captions()) == [records[i][1] for i in kept] == shards.captions()[0:10]
    assert encode(spec, vae, tmp_path / "latents") == folder  # finished: nothing to redo


def test_what_changes_the_key(vae, shapes, tmp_path):
    base = encode(shapes, vae, tmp_path).name
    assert encode(shapes, vae, tmp_path, shard_size=4, batch_size=3).name == base  # layout only
    other_vae = copy.deepcopy(vae)
    with torch.no_grad():
        other_vae.encoder.conv_in.bias.add_(0.01)
    keys = {
        "vae": encode(shapes, other_vae, tmp_path).name,
        "preprocess": encode(shapes, vae, tmp_path, preprocess=Preprocess(16, "resize")).name,
        "source": encode(SourceSpec.resolve(shapes.location, label_column="shape", limit=6), vae, tmp_path).name,
        "dtype": encode(shapes, vae, tmp_path, dtype=torch.float32).name,
    }
    assert len(set(keys.values()) | {base}) == 5, keys


def test_a_dataset_of_records_is_a_source(vae, shapes, tmp_path):
    records = load_source(shapes.location, label_column="shape")
    shards = LatentShards(encode(records, vae, tmp_path))
    assert shards.index["source"] == {"kind": "dataset", "records": records._fingerprint}
    assert shards.__getitems__([3, 11])["label"].tolist() == [shape_records()[i][2] for i in (3, 11)]


def test_resize_none_takes_record_0s_size_and_refuses_others(vae, tmp_path):
    records = shape_records(4)
    folder = make_imagefolder(tmp_path / "same", records)
    shards = LatentShards(encode(SourceSpec.resolve(folder), vae, tmp_path, preprocess=Preprocess(None, "none")))
    assert shards.index["preprocess"]["resolution"] == [64, 64] and shards.latent_shape == (4, 32, 32)
    assert shards.__getitems__([0])["label"].tolist() == [-1]  # no label column
    records[2] = (records[2][0].resize((48, 40)), records[2][1], records[2][2])
    mixed = make_imagefolder(tmp_path / "mixed", records)
    with pytest.raises(ValueError, match=r"record 2 is 40x48 \(HxW\), but 64x64 is expected"):
        encode(SourceSpec.resolve(mixed), vae, tmp_path, preprocess=Preprocess(None, "none"))


def test_bad_arguments(vae, shapes, tmp_path):
    with pytest.raises(ValueError, match="torch.bfloat16, torch.float16 or torch.float32"):
        encode(shapes, vae, tmp_path, dtype=torch.int8)
    with pytest.raises(ValueError, match=r"3-channel images but preprocess gives 1: set Preprocess\(channels=3\)"):
        encode(shapes, vae, tmp_path, preprocess=Preprocess(16, channels=1))
    with pytest.raises(ValueError, match="rank must be in 0..world_size-1"):
        encode(shapes, vae, tmp_path, rank=2, world_size=2)
    with pytest.raises(DataError, match=r"no index.json, so not a finished encoding \(0 shards"):
        LatentShards(tmp_path)


# ----------------------------------------------------------------------------- reading
@pytest.fixture
def parquet_shards(vae, tmp_path) -> LatentShards:
    path = make_parquet(tmp_path / "shapes.parquet")
    spec = SourceSpec.resolve(path, image_column="png", text_column="txt", label_column="label")
    return LatentShards(encode(spec, vae, tmp_path / "latents", dtype=torch.bfloat16))


def test_getitems_reads_the_right_rows_across_shards(parquet_shards):
    shards, records = parquet_shards, shape_records()
    stored = shard_tensors(shards.path)
    indices = [11, 0, 4, 5, 6, 10, 4, 9]
    batch = shards.__getitems__(indices)
    assert batch["mean"].dtype == torch.float32 and batch["mean"].shape == (8, 4, 8, 8)
    assert torch.equal(batch["mean"], stored["mean"][indices].float())
    assert torch.equal(batch["std"], stored["std"][indices].float())
    assert batch["caption"] == [records[i][1] for i in indices]
    assert batch["label"].tolist() == [records[i][2] for i in indices] and batch["index"].tolist() == indices
    one = shards[7]
    assert one["mean"].shape == (4, 8, 8) and one["caption"] == records[7][1] and int(one["index"]) == 7
    assert len(shards) == 12 and list(shards.captions()) == [r[1] for r in records]
    assert "12 records, latents 4x8x8 bfloat16, 3 shards" in repr(shards)
    for bad in ([12], [-1]):
        with pytest.raises(IndexError, match=r"in 0\.\.11"):
            shards.__getitems__(bad)


def test_rows_far_apart_are_read_alone(parquet_shards, monkeypatch):
    stored = shard_tensors(parquet_shards.path)
    monkeypatch.setattr(shards_mod, "GAP_BYTES", 0)  # no run is bridged
    assert torch.equal(parquet_shards.__getitems__([4, 0, 2])["mean"], stored["mean"][[4, 0, 2]].float())


def test_sampling_the_posterior(parquet_shards):
    batch = parquet_shards.__getitems__(list(range(12)))
    assert (batch["std"] > 0).all()
    generator = torch.Generator().manual_seed(0)
    z = batch["mean"] + batch["std"] * torch.randn(batch["mean"].shape, generator=generator)
    z_s = parquet_shards.scaled(z)
    torch.testing.assert_close(z_s, z * 0.18215)
    assert not torch.equal(z, batch["mean"]) and torch.isfinite(z_s).all()


def test_dataloader_workers_and_pickling(parquet_shards):
    expected = parquet_shards.__getitems__([0, 1, 2, 3])  # the parent has open handles now
    loader = torch.utils.data.DataLoader(parquet_shards, batch_size=4, num_workers=1,
                                         collate_fn=torch.utils.data.default_convert)
    first = next(iter(loader))
    assert torch.equal(first["mean"], expected["mean"]) and first["caption"] == expected["caption"]
    copied = pickle.loads(pickle.dumps(parquet_shards))
    assert copied._handles == {} and torch.equal(copied.__getitems__([0, 1, 2, 3])["std"], expected["std"])


def test_checks_against_a_vae_and_a_denoiser(vae, parquet_shards):
    parquet_shards.check_vae(vae)
    stranger = tiny_diffusers_vae(seed=1)
    ours, theirs = vae_identity(vae)["weights_hash"], vae_identity(stranger)["weights_hash"]
    with pytest.raises(ValueError, match=f"encoded by VAE {ours} .*; you passed {theirs}"):
        parquet_shards.check_vae(stranger)
    with pytest.raises(ValueError, match="latents have 4 channels; the VAE you passed has 2"):
        parquet_shards.check_vae(tiny_diffusers_vae(latent_channels=2))
    parquet_shards.check_channels(4)
    with pytest.raises(ValueError, match="takes 3 input channels but these latents have 4.*in_channels=4"):
        parquet_shards.check_channels(3)


# ----------------------------------------------------------------------------- memory, bounded
def synthetic_encoding(folder, n: int, shard_size: int = 1000) -> LatentShards:
    """n records of 1x1x1 latents and distinct captions, written as encode_shards writes them (no VAE)."""
    folder.mkdir(parents=True)
    num_shards = -(-n // shard_size)
    for s in range(num_shards):
        a, b = s * shard_size, min(n, (s + 1) * shard_size)
        z = torch.arange(a, b, dtype=torch.float32).reshape(-1, 1, 1, 1)
        parts = {"mean": [z], "std": [z], "label": [-1] * (b - a), "index": list(range(a, b)),
                 "caption": [f"record {i}: a red circle at the top left, number {i}" for i in range(a, b)], "bad": []}
        shards_mod._write_shard(folder / shard_name(s), "lat-synthetic", a, b, parts, (1, 1, 1), torch.float32)
    index = {"format": shards_mod.FORMAT, "key": "lat-synthetic", "source": {}, "dtype": "float32", "num_records": n,
             "shard_size": shard_size, "num_shards": num_shards, "skipped": 0, "latent_shape": [1, 1, 1],
             "shard_records": [min(n, (s + 1) * shard_size) - s * shard_size for s in range(num_shards)]}
    (folder / "index.json").write_text(json.dumps(index))
    return LatentShards(folder)


def traced(fn) -> tuple[int, int]:
    """(peak, retained) bytes that Python allocated while running fn()."""
    import gc
    import tracemalloc

    gc.collect()
    tracemalloc.start()
    try:
        fn()
        gc.collect()
        retained, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, retained


def test_reading_every_record_holds_one_shards_worth_whatever_the_number_of_records(tmp_path):
    """A reader (a DataLoader worker) that reads every record, and one that iterates every caption, hold
    about one shard's captions at a time, at 5,000 and at 50,000 records alike: format 1 kept every
    shard's captions it had read (and its header held them all), about 100 bytes a record. (What is
    kept, a few bytes per read, is safetensors 0.8's: each slice call leaks an int.)"""
    def read_all(shards):
        for start in range(0, len(shards), 500):
            shards.__getitems__(list(range(start, min(len(shards), start + 500))))
        assert sum(1 for _ in shards.captions()) == len(shards)

    small, large = (synthetic_encoding(tmp_path / str(n), n) for n in (5_000, 50_000))
    assert large.captions()[49_998:50_000] == [f"record {i}: a red circle at the top left, number {i}"
                                              for i in (49_998, 49_999)]
    (small_peak, small_kept), (large_peak, large_kept) = (traced(lambda: read_all(s)) for s in (small, large))
    assert large_kept < 500_000 and small_kept < 500_000  # nothing kept per record (50,000 records: ~5 MB)
    assert large_peak < small_peak + 500_000, (small_peak, large_peak)  # holding all 50,000 captions: ~5 MB


def test_a_vae_computing_in_bfloat16_keeps_its_key_and_dtype(vae, shapes, tmp_path):
    ours = from_diffusers(vae)  # force_upcast as diffusers' default: True, so it stays in float32
    folder = encode(shapes, ours, tmp_path / "a", vae_dtype=torch.bfloat16)
    assert folder.name == encode(shapes, ours, tmp_path / "b").name and next(ours.parameters()).dtype == torch.float32
    assert torch.equal(shard_tensors(folder)["mean"], shard_tensors(tmp_path / "b" / folder.name)["mean"])
    ours.config.force_upcast = False  # now it computes in bfloat16: close to float32, not equal
    half = shard_tensors(encode(shapes, ours, tmp_path / "c", vae_dtype=torch.bfloat16, dtype=torch.float32))
    full = shard_tensors(encode(shapes, ours, tmp_path / "d", dtype=torch.float32))
    assert not torch.equal(half["mean"], full["mean"])
    torch.testing.assert_close(half["mean"], full["mean"], rtol=0.05, atol=0.05)

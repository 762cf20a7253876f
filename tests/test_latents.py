"""The latent cache: built once per VAE, reused, and invalidated when the VAE's weights change.

Every test builds its cache under tmp_path with a tiny VAE and a few dozen real images per split
(the repository's own cache under data/latents/ is never touched).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tutorial_lib.data import latents as latents_mod
from tutorial_lib.data.fashion_mnist import to_model_images
from tutorial_lib.data.latents import LatentCache, latent_cache
from tutorial_lib.weights import weights_hash

# The tiny VAE (f = 2) needs images whose size is even; Fashion-MNIST's 32x32 is.
N = {"train": 40, "test": 24}


@pytest.fixture
def few_images(monkeypatch, real_test):
    images, labels = real_test
    data = {"train": (images[:40], labels[:40]), "test": (images[40:64], labels[40:64])}
    calls = []

    def fake_load(split="train", root=None):
        calls.append(split)
        return data[split]

    monkeypatch.setattr(latents_mod, "load_fashion_mnist", fake_load)
    return data, calls


def test_cache_shapes_and_meta(tiny_vae, tmp_path, few_images):
    data, _ = few_images
    cache = latent_cache(vae=tiny_vae, root=tmp_path, batch_size=16)
    key = weights_hash(tiny_vae)
    assert cache.path == tmp_path / f"vae-{key}"
    for split in ("train", "test"):
        z = cache.latents(split)
        assert z.shape == (N[split], 4, 16, 16) and z.dtype == np.float32
        assert np.array_equal(cache.labels(split), data[split][1])
        zt, yt = cache.tensors(split)
        assert isinstance(zt, torch.Tensor) and zt.shape == z.shape and yt.shape == (N[split],)
    meta = cache.meta
    assert meta["vae_hash"] == key
    assert meta["shape"] == [4, 16, 16]
    assert meta["counts"] == N
    assert meta["scaling_factor"] == 1.5 and meta["shift_factor"] == 0.1
    train = np.asarray(cache.latents("train"))
    assert meta["train_mean"] == pytest.approx(float(train.mean()), abs=1e-5)
    assert meta["train_std"] == pytest.approx(float(train.std()), rel=1e-4)
    assert json.loads((cache.path / "meta.json").read_text()) == meta
    assert "LatentCache(" in repr(cache)


def test_cached_latents_are_the_scaled_posterior_means(tiny_vae, tmp_path, few_images):
    data, _ = few_images
    cache = latent_cache(vae=tiny_vae, root=tmp_path, batch_size=16)
    x = to_model_images(data["test"][0])
    with torch.no_grad():
        expected = (tiny_vae.encode(x).mean - 0.1) * 1.5
    torch.testing.assert_close(torch.from_numpy(np.array(cache.latents("test"))), expected,
                               rtol=1e-5, atol=1e-5)


def test_cache_is_memory_mapped_and_read_only(tiny_vae, tmp_path, few_images):
    z = latent_cache(vae=tiny_vae, root=tmp_path).latents("train")
    assert isinstance(z, np.memmap) and not z.flags.writeable


def test_second_call_reuses_the_cache(tiny_vae, tmp_path, few_images, monkeypatch):
    _, calls = few_images
    first = latent_cache(vae=tiny_vae, root=tmp_path)
    before = np.array(first.latents("train"))
    assert sorted(calls) == ["test", "train"]

    def must_not_encode(*args, **kwargs):
        raise AssertionError("the cache was rebuilt although the VAE did not change")

    monkeypatch.setattr(latents_mod, "_encode", must_not_encode)
    second = latent_cache(vae=tiny_vae, root=tmp_path)
    assert second.path == first.path
    assert np.array_equal(np.array(second.latents("train")), before)
    assert sorted(calls) == ["test", "train"]  # the data was not even loaded again
    assert LatentCache(first.path).meta == first.meta


def test_changed_weights_get_a_new_cache_and_the_old_one_is_removed(tiny_vae, tmp_path, few_images):
    old = latent_cache(vae=tiny_vae, root=tmp_path)
    old_latents = np.array(old.latents("train"))
    with torch.no_grad():
        tiny_vae.encoder.conv_in.bias.add_(0.05)
    new = latent_cache(vae=tiny_vae, root=tmp_path)
    assert new.path != old.path and new.path.name == f"vae-{weights_hash(tiny_vae)}"
    assert not old.path.exists()
    assert sorted(p.name for p in tmp_path.glob("vae-*")) == [new.path.name]
    assert not np.array_equal(np.array(new.latents("train")), old_latents)


def test_changed_scaling_factor_gets_a_new_cache(tiny_vae, tmp_path, few_images):
    old = latent_cache(vae=tiny_vae, root=tmp_path)
    old_latents = np.array(old.latents("test"))
    tiny_vae.config.scaling_factor = 3.0  # the config is part of the key, not only the weights
    new = latent_cache(vae=tiny_vae, root=tmp_path)
    assert new.path != old.path and new.meta["scaling_factor"] == 3.0 and not old.path.exists()
    np.testing.assert_allclose(np.array(new.latents("test")), old_latents * 2.0,
                               rtol=1e-5, atol=1e-6)


def _truncate(path):
    npy = path / "train_latents.npy"
    npy.write_bytes(npy.read_bytes()[:1000])


@pytest.mark.parametrize("damage, detail", [
    (lambda path: (path / "meta.json").unlink(), "meta.json"),  # an older version crashed mid-build
    (lambda path: (path / "test_labels.npy").unlink(), "test_labels.npy"),
    (_truncate, "mmap length is greater than file size"),
], ids=["no meta.json", "an array missing", "an array truncated"])
def test_damaged_cache_is_reported_and_rebuilt(damage, detail, tiny_vae, tmp_path, few_images, capsys):
    path = latent_cache(vae=tiny_vae, root=tmp_path).path
    good = {split: np.array(LatentCache(path).latents(split)) for split in ("train", "test")}
    _, calls = few_images
    damage(path)
    cache = latent_cache(vae=tiny_vae, root=tmp_path)
    message = capsys.readouterr().out
    assert f"Rebuilding the latent cache {path}: it is incomplete or damaged" in message and detail in message
    assert cache.path == path and calls == ["train", "test"] * 2
    for split in ("train", "test"):
        assert np.array_equal(np.array(cache.latents(split)), good[split])
        assert np.array_equal(cache.labels(split), few_images[0][split][1])
    assert latents_mod._problem(path) is None and sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_incomplete_cache_is_rebuilt(tiny_vae, tmp_path, few_images):
    """A folder without meta.json (a crash mid-build) is not trusted."""
    path = tmp_path / f"vae-{weights_hash(tiny_vae)}"
    path.mkdir()
    (path / "train_latents.npy").write_bytes(b"half a file")
    cache = latent_cache(vae=tiny_vae, root=tmp_path)
    assert cache.path == path and cache.latents("train").shape == (40, 4, 16, 16)


def test_stale_caches_are_removed_but_builds_in_progress_are_not(tiny_vae, tmp_path, few_images):
    stale = tmp_path / "vae-0123456789abcdef"  # another VAE's finished cache
    building = tmp_path / ".vae-0123456789abcdef.tmp-4242-0a1b2c3d"  # another process is writing it
    dead = tmp_path / ".vae-fedcba9876543210.tmp-4243-4e5f6a7b"  # its process died two days ago
    for folder in (stale, building, dead):
        folder.mkdir()
        (folder / "train_latents.npy").write_bytes(b"latents")
    two_days_ago = time.time() - 2 * 86400
    os.utime(dead, (two_days_ago, two_days_ago))
    cache = latent_cache(vae=tiny_vae, root=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([building.name, cache.path.name])
    assert (building / "train_latents.npy").read_bytes() == b"latents"


def _build_beside_another_process(vae, data, root: str, both_built, out: str):
    """One of two processes that build the same cache at once: neither publishes before both built."""
    torch.set_num_threads(1)
    latents_mod.load_fashion_mnist = lambda split: data[split]
    publish, encodes = latents_mod._publish, []

    def publish_together(tmp, path):
        both_built.wait(timeout=60)
        publish(tmp, path)

    def counted_encode(*args):
        encodes.append(args[-1])
        return encode(*args)

    encode = latents_mod._encode
    latents_mod._publish, latents_mod._encode = publish_together, counted_encode
    cache = latent_cache(vae=vae, root=root)
    np.save(out, np.array(cache.latents("train")))
    Path(out).with_suffix(".json").write_text(json.dumps({"path": str(cache.path), "encodes": encodes}))


def test_two_processes_building_the_same_cache_at_once(tiny_vae, tmp_path, few_images):
    data, _ = few_images
    root = tmp_path / "latents"
    context = multiprocessing.get_context("spawn")
    both_built = context.Barrier(2)
    outs = [tmp_path / f"process{i}.npy" for i in range(2)]
    processes = [context.Process(target=_build_beside_another_process,
                                 args=(tiny_vae, data, str(root), both_built, str(out))) for out in outs]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
        if process.exitcode is None:
            process.kill()
    assert [process.exitcode for process in processes] == [0, 0]

    key = f"vae-{weights_hash(tiny_vae)}"
    results = [json.loads(out.with_suffix(".json").read_text()) for out in outs]
    assert all(r["encodes"] == ["encoding train", "encoding test"] for r in results)  # both really built
    assert {r["path"] for r in results} == {str(root / key)}
    assert sorted(p.name for p in root.iterdir()) == [key]  # one cache, no private folder left
    assert latents_mod._problem(root / key) is None
    first, second = (np.load(out) for out in outs)
    assert first.shape == (40, 4, 16, 16) and np.array_equal(first, second)
    assert np.array_equal(np.array(LatentCache(root / key).latents("train")), first)


def test_a_larger_image_size_is_cached_beside_the_default_one(tiny_vae, tmp_path, few_images):
    data, _ = few_images
    small = latent_cache(vae=tiny_vae, root=tmp_path, batch_size=16)
    large = latent_cache(vae=tiny_vae, root=tmp_path, batch_size=16, image_size=64)
    assert large.path.name == f"vae-{weights_hash(tiny_vae)}-64px" and small.path.exists()  # both kept
    assert large.meta["image_size"] == 64 and large.meta["shape"] == [4, 32, 32]  # f = 2: 64 px -> 32 x 32
    upsampled = torch.nn.functional.interpolate(to_model_images(data["test"][0]), size=(64, 64), mode="bilinear",
                                                align_corners=False)
    with torch.no_grad():
        expected = (tiny_vae.encode(upsampled).mean - 0.1) * 1.5
    torch.testing.assert_close(torch.from_numpy(np.array(large.latents("test"))), expected, rtol=1e-5, atol=1e-5)
    assert latent_cache(vae=tiny_vae, root=tmp_path, image_size=64).path == large.path  # reused
    with torch.no_grad():  # new weights: the caches of the old ones go, at every size
        tiny_vae.encoder.conv_in.bias.add_(0.05)
    latent_cache(vae=tiny_vae, root=tmp_path)
    assert sorted(p.name for p in tmp_path.glob("vae-*")) == [f"vae-{weights_hash(tiny_vae)}"]


@pytest.mark.parametrize("size", [16, 48])
def test_image_size_must_be_a_multiple_of_32(tiny_vae, tmp_path, size):
    with pytest.raises(ValueError, match="multiple of 32"):
        latent_cache(vae=tiny_vae, root=tmp_path, image_size=size)
    assert not list(tmp_path.iterdir())  # refused before any work

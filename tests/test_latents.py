"""The latent cache: built once per VAE, reused, and invalidated when the VAE's weights change.

Every test builds its cache under tmp_path with a tiny VAE and a few dozen real images per split
(the repository's own cache under data/latents/ is never touched).
"""

from __future__ import annotations

import json

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


def test_incomplete_cache_is_rebuilt(tiny_vae, tmp_path, few_images):
    """A folder without meta.json (a crash mid-build) is not trusted."""
    path = tmp_path / f"vae-{weights_hash(tiny_vae)}"
    path.mkdir()
    (path / "train_latents.npy").write_bytes(b"half a file")
    cache = latent_cache(vae=tiny_vae, root=tmp_path)
    assert cache.path == path and cache.latents("train").shape == (40, 4, 16, 16)

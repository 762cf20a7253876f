"""Weights files: atomic writes, safetensors with the config inside, clear refusals, hashing."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from tutorial_lib.models.classifier import ClassifierConfig, FashionClassifier
from tutorial_lib.models.tiny_transformer import TinyTransformer, TinyTransformerConfig
from tutorial_lib.text.word_encoder import WordEncoder, WordEncoderConfig
from tutorial_lib.vae.autoencoder import AutoencoderKL, VAEConfig
from tutorial_lib.weights import (
    WeightsError,
    asset,
    atomic_write,
    load_model,
    read_weights,
    save_weights,
    weights_hash,
)


# ----------------------------------------------------------------------------- atomic_write
def test_atomic_write_replaces_the_file(tmp_path):
    path = tmp_path / "sub" / "f.txt"
    assert atomic_write(path, lambda tmp: open(tmp, "w").write("new")) == path
    assert path.read_text() == "new"
    atomic_write(path, lambda tmp: open(tmp, "w").write("newer"))
    assert path.read_text() == "newer"
    assert [p.name for p in path.parent.iterdir()] == ["f.txt"]


def test_atomic_write_keeps_the_old_file_if_the_writer_raises(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")

    def half_write(tmp):
        with open(tmp, "w") as f:
            f.write("half of the new con")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, half_write)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]  # no temporary file left behind


def test_atomic_write_failure_creates_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "g.bin", lambda tmp: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- read/save
def test_save_and_read_round_trip(tiny_vae, tmp_path):
    path = save_weights(tiny_vae, tmp_path / "v.safetensors", "vae", {"psnr": 30.5})
    state, config, extra = read_weights(path, "vae")
    assert extra == {"psnr": 30.5}
    assert config == json.loads(json.dumps(vars(tiny_vae.config)))
    assert state.keys() == tiny_vae.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in tiny_vae.state_dict().items())


@pytest.mark.parametrize("content", [b"", b"abc", b"PK\x03\x04 a zip, or a pickle" * 20,
                                     b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":1}"])
def test_read_weights_rejects_non_safetensors(tmp_path, content):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(WeightsError, match="not a readable safetensors"):
        read_weights(path, "vae")


@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_read_weights_rejects_a_truncated_file(tiny_vae, tmp_path, keep):
    path = save_weights(tiny_vae, tmp_path / "v.safetensors", "vae")
    os.truncate(path, int(path.stat().st_size * keep))
    with pytest.raises(WeightsError, match="not a readable safetensors"):
        read_weights(path, "vae")


def test_saved_weights_are_readable_by_others(tiny_vae, tmp_path):
    umask = os.umask(0o022)
    try:
        path = save_weights(tiny_vae, tmp_path / "v.safetensors", "vae")
    finally:
        os.umask(umask)
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)  # not mkstemp's owner-only 0600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.safetensors"]


def test_read_weights_rejects_a_pickled_checkpoint(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(3)}, path)
    with pytest.raises(WeightsError):
        read_weights(path, "vae")


def test_read_weights_rejects_wrong_kind(tiny_vae, tmp_path):
    path = save_weights(tiny_vae, tmp_path / "v.safetensors", "vae")
    with pytest.raises(WeightsError, match="'vae'.*'classifier'"):
        read_weights(path, "classifier")


def test_read_weights_rejects_safetensors_without_metadata(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(WeightsError, match="kind"):
        read_weights(path, "vae")


def test_read_weights_missing_file(tmp_path):
    with pytest.raises(WeightsError, match="no such weights file"):
        read_weights(tmp_path / "nothing.safetensors", "vae")


def test_load_model_builds_the_saved_config(tmp_path, tiny_denoiser):
    path = save_weights(tiny_denoiser, tmp_path / "d.safetensors", "tiny_transformer")
    model, extra = load_model(TinyTransformer, TinyTransformerConfig, path, "tiny_transformer")
    assert model.config == tiny_denoiser.config and extra == {}
    with pytest.raises(WeightsError):
        load_model(TinyTransformer, TinyTransformerConfig, path, "word_encoder")


def test_asset_lookup():
    assert asset("vae.safetensors").is_file()
    assert asset("classifier.safetensors").is_file()
    with pytest.raises(WeightsError, match="missing"):
        asset("no-such-model.safetensors")


# ----------------------------------------------------------------------------- weights_hash
def test_weights_hash_is_stable_and_sensitive(tiny_vae, tiny_vae_config):
    h = weights_hash(tiny_vae)
    assert len(h) == 16 and h == weights_hash(tiny_vae)
    torch.manual_seed(0)
    assert weights_hash(AutoencoderKL(VAEConfig(**vars(tiny_vae_config)))) == h  # same init, same hash
    with torch.no_grad():
        tiny_vae.decoder.conv_out.weight[0, 0, 0, 0] += 1e-3
    assert weights_hash(tiny_vae) != h


def test_weights_hash_covers_the_config(tiny_vae):
    h = weights_hash(tiny_vae)
    tiny_vae.config.shift_factor += 0.5
    assert weights_hash(tiny_vae) != h


@pytest.mark.parametrize("build", [
    lambda: AutoencoderKL(VAEConfig(channels=(8, 16), norm_groups=4)),
    lambda: TinyTransformer(TinyTransformerConfig(dim=16, depth=1, heads=2, text_dim=8)),
    lambda: WordEncoder(WordEncoderConfig(dim=8, heads=2)),
    # BatchNorm keeps a 0-d `num_batches_tracked` buffer: hashing must handle 0-d tensors too.
    lambda: FashionClassifier(ClassifierConfig(channels=(8, 16), blocks_per_level=1)),
], ids=["vae", "tiny_transformer", "word_encoder", "classifier"])
def test_weights_hash_works_for_every_model(build):
    model = build()
    assert len(weights_hash(model)) == 16

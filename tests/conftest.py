"""Shared fixtures: tiny configs (CPU, seconds), fake IDX files, and the shipped assets/data.

Everything heavy (the real data set, the shipped VAE and classifier, classifier features of 2000
test images) is session-scoped, so it is loaded or computed once for the whole suite.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from tutorial_lib.models.tiny_transformer import TinyTransformer, TinyTransformerConfig
from tutorial_lib.text.word_encoder import WordEncoder, WordEncoderConfig
from tutorial_lib.vae.autoencoder import AutoencoderKL, VAEConfig

REPO_ROOT = Path(__file__).resolve().parents[1]

# One intra-op thread. On a small, shared CPU (CI's 2 cores, or a laptop running a notebook beside
# the tests) two OpenMP threads make every small tensor op wait on a descheduled thread at each
# barrier: the sampler tests ran 50-100x slower that way, and even the classifier was slower.
# TUTORIAL_TEST_THREADS=N overrides this on a quiet, larger machine.
torch.set_num_threads(int(os.environ.get("TUTORIAL_TEST_THREADS", "1")))
IDX_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


# ----------------------------------------------------------------------------- IDX files
def idx_bytes(array: np.ndarray, magic: bytes | None = None) -> bytes:
    """An IDX file: magic 0x00 0x00 0x08 NDIM, NDIM big-endian uint32 sizes, then uint8 values."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    head = magic if magic is not None else bytes([0, 0, 0x08, array.ndim])
    return head + np.asarray(array.shape, dtype=">u4").tobytes() + array.tobytes()


def write_idx(path: Path, array: np.ndarray, magic: bytes | None = None) -> Path:
    """Write `array` as IDX to `path`, gzip-compressed when the name ends in .gz."""
    data = idx_bytes(array, magic)
    path = Path(path)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


@pytest.fixture
def fake_idx_dir(tmp_path) -> Path:
    """A folder with all four Fashion-MNIST files, but tiny (6 train and 4 test items)."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "fake-fmnist"
    folder.mkdir()
    for split, n in (("train", 6), ("test", 4)):
        images, labels = IDX_STEMS[split]
        write_idx(folder / f"{images}.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(folder / labels, rng.integers(0, 10, (n,)))  # one plain, one gzipped
    return folder


# ----------------------------------------------------------------------------- tiny models
@pytest.fixture
def tiny_vae_config() -> VAEConfig:
    # f = 2: a 1x16x16 image <-> a 4x8x8 latent.
    return VAEConfig(in_channels=1, channels=(8, 16), num_res_blocks=1, latent_channels=4,
                     mid_attention=True, norm_groups=4, scaling_factor=1.5, shift_factor=0.1)


@pytest.fixture
def tiny_vae(tiny_vae_config) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(tiny_vae_config).eval()


@pytest.fixture
def tiny_text_config() -> WordEncoderConfig:
    return WordEncoderConfig(dim=16, depth=1, heads=2, max_len=12)


@pytest.fixture
def tiny_text_encoder(tiny_text_config) -> WordEncoder:
    torch.manual_seed(1)
    return WordEncoder(tiny_text_config).eval()


@pytest.fixture
def tiny_denoiser_config() -> TinyTransformerConfig:
    # Latents of the shipped VAE are 4x8x8, so the pipeline tests can decode with it.
    return TinyTransformerConfig(latent_channels=4, latent_size=8, dim=32, depth=1, heads=2, text_dim=16)


@pytest.fixture
def tiny_denoiser(tiny_denoiser_config) -> TinyTransformer:
    torch.manual_seed(2)
    return TinyTransformer(tiny_denoiser_config).eval()


# ----------------------------------------------------------------------------- shipped assets
@pytest.fixture(scope="session")
def shipped_vae():
    from tutorial_lib.vae.autoencoder import load_vae

    return load_vae()


@pytest.fixture(scope="session")
def shipped_classifier():
    from tutorial_lib.models.classifier import load_classifier

    return load_classifier()


@pytest.fixture(scope="session")
def real_test():
    """The real test split: (uint8 [10000, 28, 28], int64 [10000])."""
    from tutorial_lib.data.fashion_mnist import load_fashion_mnist

    return load_fashion_mnist("test")


@pytest.fixture(scope="session")
def real_test_features(shipped_classifier, real_test):
    """Shipped-classifier (features [2000, D], logits [2000, 10], labels [2000]) of 2000 test images.

    The classifier is the slowest thing on a CPU, so this is computed once and shared.
    """
    from tutorial_lib.data.fashion_mnist import to_model_images
    from tutorial_lib.eval.metrics import features

    images, labels = real_test
    feats, logits = features(shipped_classifier, to_model_images(images[:2000]))
    return feats, logits, torch.as_tensor(labels[:2000])


# ----------------------------------------------------------------------------- markers
def pytest_collection_modifyitems(config, items):
    """`cuda` tests need a GPU (scripts/gpu_check.sh runs them there); `slow` ones TUTORIAL_SLOW_TESTS=1."""
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU (run scripts/gpu_check.sh on one)")
    skip_slow = pytest.mark.skip(reason="slow: set TUTORIAL_SLOW_TESTS=1 to run it")
    slow_ok = os.environ.get("TUTORIAL_SLOW_TESTS") == "1"
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)
        if "slow" in item.keywords and not slow_ok:
            item.add_marker(skip_slow)

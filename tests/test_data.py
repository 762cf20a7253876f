"""Fashion-MNIST: finding it, checking every IDX file, loading and scaling it."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from tutorial_lib.data import fashion_mnist as fm
from tutorial_lib.data.captions import all_training_captions
from tutorial_lib.data.fashion_mnist import (
    DataError,
    FashionMNIST,
    find_data_dir,
    load_fashion_mnist,
    read_idx,
    to_model_images,
    to_uint8,
)

from .conftest import IDX_STEMS, idx_bytes, write_idx


# ----------------------------------------------------------------------------- the real data
def test_real_split_counts_and_labels(real_test):
    train_x, train_y = load_fashion_mnist("train")
    test_x, test_y = real_test
    assert train_x.shape == (60_000, 28, 28) and train_y.shape == (60_000,)
    assert test_x.shape == (10_000, 28, 28) and test_y.shape == (10_000,)
    assert train_x.dtype == np.uint8 and train_y.dtype == np.int64
    # Fashion-MNIST is balanced: 6000 train and 1000 test images per class.
    assert np.bincount(train_y, minlength=10).tolist() == [6000] * 10
    assert np.bincount(test_y, minlength=10).tolist() == [1000] * 10


def test_model_images_are_padded_to_32_in_minus_one_one(real_test):
    raw, _ = real_test
    x = to_model_images(raw)
    assert x.shape == (10_000, 1, 32, 32) and x.dtype == torch.float32
    assert x.min() == -1.0 and x.max() <= 1.0 and x.max() > 0.9
    # The 2-pixel border is background, i.e. exactly -1.
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert torch.all(x[:, 0][:, border] == -1.0)
    # The interior is the image scaled from [0, 255] to [-1, 1]; to_uint8 inverts it exactly.
    torch.testing.assert_close(x[:, 0, 2:30, 2:30], torch.from_numpy(raw).float() / 127.5 - 1)
    assert torch.equal(to_uint8(x)[:, 0, 2:30, 2:30], torch.from_numpy(raw))


def test_dataset_items_and_captions(real_test):
    ds = FashionMNIST("test", captions=True, seed=3)
    assert len(ds) == 10_000
    image, label, caption = ds[17]
    assert image.shape == (1, 32, 32) and label == int(real_test[1][17])
    assert caption in all_training_captions(label)
    assert ds[17][2] == caption  # fixed per item for a given seed and epoch
    plain = FashionMNIST("test")
    assert len(plain[0]) == 2


def test_loaded_arrays_are_copies():
    """Callers may scribble on what they get without corrupting the loader's cache."""
    images, labels = load_fashion_mnist("test")
    first_image, first_label = images[0].copy(), int(labels[0])
    images[0] = 255 - images[0]
    labels[0] = 99
    again, labels_again = load_fashion_mnist("test")
    assert np.array_equal(again[0], first_image) and labels_again[0] == first_label


def test_unknown_split_is_a_value_error():
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("validation")


def test_to_model_images_rejects_wrong_shape():
    with pytest.raises(ValueError, match="28, 28"):
        to_model_images(np.zeros((2, 32, 32), dtype=np.uint8))


# ----------------------------------------------------------------------------- read_idx
@pytest.mark.parametrize("name", ["images-idx3-ubyte", "images-idx3-ubyte.gz"])
def test_read_idx_round_trip(tmp_path, name):
    arr = np.random.default_rng(0).integers(0, 256, (3, 28, 28)).astype(np.uint8)
    out = read_idx(write_idx(tmp_path / name, arr), 3)
    assert out.dtype == np.uint8 and np.array_equal(out, arr)
    assert out.flags.writeable  # a copy, not a read-only view of the file's bytes


@pytest.mark.parametrize("magic, ndim", [
    (bytes([0, 0, 0x08, 1]), 3),  # a label file read as images
    (bytes([0, 0, 0x0D, 3]), 3),  # float32 data, not uint8
    (bytes([0x1F, 0x8B, 0x08, 3]), 3),  # gzip bytes in a file without .gz
])
def test_read_idx_rejects_wrong_magic(tmp_path, magic, ndim):
    path = write_idx(tmp_path / "x-idx3-ubyte", np.zeros((2, 28, 28)), magic=magic)
    with pytest.raises(DataError, match="magic number"):
        read_idx(path, ndim)


def test_read_idx_rejects_truncated_file_and_names_it(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(idx_bytes(np.zeros((4, 28, 28)))[:-100])
    with pytest.raises(DataError, match="truncated") as info:
        read_idx(path, 3)
    assert str(path) in str(info.value)


def test_read_idx_rejects_file_with_trailing_bytes(tmp_path):
    path = tmp_path / "labels-idx1-ubyte"
    path.write_bytes(idx_bytes(np.zeros(5)) + b"\0")
    with pytest.raises(DataError, match="labels-idx1-ubyte"):
        read_idx(path, 1)


def test_read_idx_rejects_truncated_header(tmp_path):
    path = tmp_path / "short-idx3-ubyte"
    path.write_bytes(bytes([0, 0, 8, 3, 0, 0]))
    with pytest.raises(DataError, match="short-idx3-ubyte"):
        read_idx(path, 3)


def test_read_idx_rejects_missing_file(tmp_path):
    with pytest.raises(DataError, match="nowhere-idx1-ubyte"):
        read_idx(tmp_path / "nowhere-idx1-ubyte", 1)


def _gz(tmp_path, name, blob):
    path = tmp_path / name
    path.write_bytes(blob)
    return path


def test_read_idx_rejects_non_gzip_data_in_gz_file(tmp_path):
    path = _gz(tmp_path, "a-idx1-ubyte.gz", b"<html>404 not found</html>" * 4)
    with pytest.raises(DataError, match="a-idx1-ubyte.gz"):
        read_idx(path, 1)


def test_read_idx_rejects_truncated_gzip(tmp_path):
    blob = gzip.compress(idx_bytes(np.arange(5000) % 256))
    path = _gz(tmp_path, "b-idx1-ubyte.gz", blob[: len(blob) // 2])
    with pytest.raises(DataError, match="b-idx1-ubyte.gz"):
        read_idx(path, 1)


def test_read_idx_rejects_gzip_with_bad_checksum(tmp_path):
    blob = gzip.compress(idx_bytes(np.arange(5000) % 256))
    path = _gz(tmp_path, "c-idx1-ubyte.gz", blob[:-8] + b"\0\0\0\0" + blob[-4:])
    with pytest.raises(DataError, match="c-idx1-ubyte.gz"):
        read_idx(path, 1)


def test_read_idx_rejects_gzip_with_corrupt_compressed_data(tmp_path):
    """Bytes flipped inside the deflate stream (a damaged download): zlib raises zlib.error,
    which must still come out as a DataError that names the file."""
    images = (np.arange(5 * 28 * 28) % 256).reshape(5, 28, 28)  # compressible: real deflate blocks
    blob = gzip.compress(idx_bytes(images))
    damaged = blob[:20] + bytes(b ^ 0xFF for b in blob[20:40]) + blob[40:]
    path = _gz(tmp_path, "d-idx3-ubyte.gz", damaged)
    with pytest.raises(DataError, match="d-idx3-ubyte.gz"):
        read_idx(path, 3)


# ----------------------------------------------------------------------------- finding the data
def test_explicit_root_missing_files_is_a_data_error(tmp_path):
    folder = tmp_path / "partial"
    folder.mkdir()
    write_idx(folder / "train-images-idx3-ubyte.gz", np.zeros((1, 28, 28)))
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        load_fashion_mnist("train", root=folder)


def test_explicit_root_is_never_silently_replaced(tmp_path):
    # Even though the real data exists elsewhere, a wrong root= is an error.
    with pytest.raises(DataError, match=str(tmp_path)):
        find_data_dir(tmp_path, download=False)


def test_fake_files_of_the_wrong_size_are_rejected(fake_idx_dir):
    assert find_data_dir(fake_idx_dir, download=False) == fake_idx_dir
    with pytest.raises(DataError, match=r"\(10000, 28, 28\)"):
        load_fashion_mnist("test", root=fake_idx_dir)


def test_labels_beyond_ten_classes_are_rejected(tmp_path, monkeypatch):
    # Shrink the expected split sizes so that a fake folder is checked like the real one.
    monkeypatch.setitem(fm.SPLIT_SIZES, "test", 3)
    for stem, arr in zip(IDX_STEMS["test"], (np.zeros((3, 28, 28)), np.array([0, 4, 12]))):
        write_idx(tmp_path / stem, arr)
    for stem, arr in zip(IDX_STEMS["train"], (np.zeros((1, 28, 28)), np.zeros(1))):
        write_idx(tmp_path / stem, arr)
    with pytest.raises(DataError, match="12"):
        load_fashion_mnist("test", root=tmp_path)


def _hide_all_sources(monkeypatch, tmp_path):
    monkeypatch.delenv("FASHION_MNIST_DIR", raising=False)
    monkeypatch.setattr(fm, "data_root", lambda: tmp_path / "data")
    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "usr-share-datasets")


def test_nothing_found_explains_how_to_get_the_data(tmp_path, monkeypatch):
    _hide_all_sources(monkeypatch, tmp_path)
    with pytest.raises(DataError) as info:
        find_data_dir(download=False)
    message = str(info.value)
    assert "dataset-fashion-mnist" in message
    assert "FASHION_MNIST_DIR" in message
    assert str(tmp_path / "usr-share-datasets") in message  # says where it looked


def test_environment_variable_is_searched(tmp_path, monkeypatch, fake_idx_dir):
    _hide_all_sources(monkeypatch, tmp_path)
    monkeypatch.setenv("FASHION_MNIST_DIR", str(fake_idx_dir))
    assert find_data_dir(download=False) == fake_idx_dir


def test_environment_variable_is_an_explicit_choice(tmp_path, monkeypatch, fake_idx_dir):
    """A FASHION_MNIST_DIR without the files is an error naming it, not a silent fallback."""
    _hide_all_sources(monkeypatch, tmp_path)
    monkeypatch.setattr(fm, "DEBIAN_DIR", fake_idx_dir)  # a complete folder elsewhere
    empty = tmp_path / "typo-in-the-path"
    empty.mkdir()
    monkeypatch.setenv("FASHION_MNIST_DIR", str(empty))
    with pytest.raises(DataError, match="typo-in-the-path"):
        find_data_dir(download=False)


def test_debian_package_folder_is_searched(tmp_path, monkeypatch, fake_idx_dir):
    _hide_all_sources(monkeypatch, tmp_path)
    monkeypatch.setattr(fm, "DEBIAN_DIR", fake_idx_dir)
    assert find_data_dir(download=False) == fake_idx_dir


"""tutorial_lib.data.hf: Fashion-MNIST with captions as a datasets.Dataset."""

import sys

import numpy as np
import pytest

from tutorial_lib.data.captions import caption_for
from tutorial_lib.data.fashion_mnist import CLASSES, DataError, find_data_dir, load_fashion_mnist
from tutorial_lib.data.hf import to_hf_dataset


@pytest.fixture(scope="module", autouse=True)
def _needs_data():
    try:
        find_data_dir(download=False)
    except DataError:
        pytest.skip("Fashion-MNIST is not installed")


@pytest.fixture(scope="module")
def datasets():
    return pytest.importorskip("datasets")


def test_columns_and_features(datasets):
    ds = to_hf_dataset("test", limit=5)
    assert ds.column_names == ["image", "label", "caption"]
    assert isinstance(ds.features["image"], datasets.Image)
    assert isinstance(ds.features["label"], datasets.ClassLabel)
    assert ds.features["label"].names == list(CLASSES)
    assert ds.features["caption"] == datasets.Value("string")
    assert str(ds.split) == "test"


def test_length_with_limit(datasets):
    assert len(to_hf_dataset("test", limit=17)) == 17
    assert len(to_hf_dataset("test", limit=0)) == 0
    assert len(to_hf_dataset("test")) == 10_000
    with pytest.raises(ValueError):
        to_hf_dataset("test", limit=-1)
    with pytest.raises(ValueError):
        to_hf_dataset("validation", limit=1)


def test_first_record_is_the_first_image(datasets):
    images, labels = load_fashion_mnist("train")
    record = to_hf_dataset("train", limit=3)[0]
    assert record["image"].mode == "L" and record["image"].size == (28, 28)
    np.testing.assert_array_equal(np.asarray(record["image"]), images[0])
    assert record["label"] == labels[0]


def test_captions_are_deterministic(datasets):
    a = to_hf_dataset("test", limit=50, seed=3)
    b = to_hf_dataset("test", limit=50, seed=3)
    assert a["caption"] == b["caption"]
    assert a["caption"] == [caption_for(y, seed=(3, 0, i)) for i, y in enumerate(a["label"])]
    assert a["caption"] != to_hf_dataset("test", limit=50, seed=4)["caption"]
    assert to_hf_dataset("test", limit=10, seed=3)["caption"] == a["caption"][:10]  # a prefix


def test_missing_datasets_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ImportError, match=r'pip install "tutorial_lib\[hf\]"'):
        to_hf_dataset("test", limit=1)


# ----------------------------------------------------------------------------- attribute captions
def test_attribute_columns_and_features(datasets):
    from tutorial_lib.data.attributes import ATTRIBUTES

    ds = to_hf_dataset("test", limit=5, captions="attributes")
    assert ds.column_names == ["image", "label", "caption", *ATTRIBUTES, "index"]
    for name, words in ATTRIBUTES.items():
        assert ds.features[name] == datasets.ClassLabel(names=list(words))
    assert ds["index"] == list(range(5)) and "attribute captions" in ds.info.description


def test_attribute_captions_are_those_of_the_measured_values(datasets):
    from tutorial_lib.data.attributes import ATTRIBUTES, label_attributes
    from tutorial_lib.data.captions import attribute_caption

    images, labels = load_fashion_mnist("train")
    ds = to_hf_dataset("train", limit=200, seed=3, captions="attributes")
    measured = label_attributes(images[:200], labels[:200])
    for record in ds:
        i = record["index"]
        values = {name: int(measured[name][i]) for name in ATTRIBUTES}
        assert {name: record[name] for name in ATTRIBUTES} == values and record["label"] == labels[i]
        assert record["caption"] == attribute_caption(int(labels[i]), values, seed=(3, 0, i))
        np.testing.assert_array_equal(np.asarray(record["image"]), images[i])
    assert to_hf_dataset("train", limit=100, seed=3, captions="attributes")["caption"] == \
        [c for c, i in zip(ds["caption"], ds["index"]) if i < 100]  # a prefix, less what is held out


def test_drop_held_out_defaults_and_class_captions(datasets):
    kept = to_hf_dataset("train", limit=300, captions="attributes")["index"]
    assert 200 < len(kept) < 300  # about 16% of the training records are held out
    assert len(to_hf_dataset("test", limit=300, captions="attributes")) == 300
    assert len(to_hf_dataset("train", limit=300)) == 300  # class captions: nothing dropped by default
    same_images = to_hf_dataset("train", limit=300, drop_held_out=True)
    assert same_images["caption"] == [caption_for(y, seed=(0, 0, i)) for y, i in zip(same_images["label"], kept)]
    assert same_images.column_names == ["image", "label", "caption"]


def test_unknown_caption_kind(datasets):
    with pytest.raises(ValueError, match="Unknown captions 'words'; choose one of class, attributes"):
        to_hf_dataset("test", limit=1, captions="words")

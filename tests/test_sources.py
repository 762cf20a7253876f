"""tutorial_lib.data.sources: image-caption records from folders, parquet, built-ins; preprocessing.

Every source is built in tmp_path (drawn shapes with captions), datasets' cache is redirected there,
and nothing touches the network: the Hub case replaces `datasets.load_dataset`.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import itertools
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from tutorial_lib.data.fashion_mnist import DataError, find_data_dir, to_model_images
from tutorial_lib.data.hf import to_hf_dataset
from tutorial_lib.data.sources import Preprocess, SourceSpec, load_source

datasets = pytest.importorskip("datasets")

COLORS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220)}
SHAPES = ("circle", "square", "triangle", "diamond")
PLACES = {"top left": (0, 0), "top right": (1, 0), "bottom left": (0, 1), "bottom right": (1, 1)}


def drawn(color: str, shape: str, place: str, size: int = 64) -> Image.Image:
    """A white size x size picture with one coloured shape in a quadrant."""
    image = Image.new("RGB", (size, size), "white")
    qx, qy = PLACES[place]
    x0, y0, half = qx * size // 2 + 4, qy * size // 2 + 4, size // 2 - 8
    box = (x0, y0, x0 + half, y0 + half)
    draw, fill = ImageDraw.Draw(image), COLORS[color]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(x0, y0 + half), (x0 + half, y0 + half), (x0 + half // 2, y0)], fill=fill)
    else:
        c = half // 2
        draw.polygon([(x0 + c, y0), (x0 + half, y0 + c), (x0 + c, y0 + half), (x0, y0 + c)], fill=fill)
    return image


def shape_records(n: int = 12) -> list[tuple[Image.Image, str, int]]:
    """n (image, caption, label) records; the label is the shape's index."""
    combos = itertools.islice(itertools.cycle(itertools.product(COLORS, SHAPES, PLACES)), 0, None, 5)
    return [(drawn(c, s, p), f"a {c} {s} at the {p}", SHAPES.index(s))
            for c, s, p in itertools.islice(combos, n)]


def make_imagefolder(root, records=None, caption_column: str = "caption"):
    """The imagefolder layout: PNGs and a metadata.jsonl naming each file with its caption."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "metadata.jsonl", "w") as f:
        for i, (image, caption, label) in enumerate(records or shape_records()):
            image.save(root / f"{i:03d}.png")
            f.write(json.dumps({"file_name": f"{i:03d}.png", caption_column: caption, "shape": label}) + "\n")
    return root


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def make_parquet(path, records=None):
    """A parquet file as large web sets ship: PNG bytes in 'png', captions in 'txt', 'label'."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = records or shape_records()
    table = pa.table({"png": [png_bytes(r[0]) for r in records], "txt": [r[1] for r in records],
                      "label": [r[2] for r in records]})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    """datasets' cache in tmp_path, so that tests neither share nor leave prepared sets."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


@pytest.fixture
def fashion_mnist_installed():
    try:
        find_data_dir(download=False)
    except DataError:
        pytest.skip("Fashion-MNIST is not installed")


# ----------------------------------------------------------------------------- sources
def test_imagefolder_records(tmp_path):
    folder = make_imagefolder(tmp_path / "shapes")
    spec = SourceSpec.resolve(folder)
    assert spec.kind == "imagefolder" and spec.location == str(folder)
    ds = load_source(folder)
    assert ds.column_names == ["image", "caption"] and len(ds) == 12
    records = shape_records()
    assert ds["caption"] == [r[1] for r in records]
    assert ds[0]["image"].mode == "RGB" and ds[0]["image"].size == (64, 64)
    np.testing.assert_array_equal(np.asarray(ds[3]["image"]), np.asarray(records[3][0]))
    with_labels = load_source(folder, label_column="shape", limit=5)
    assert with_labels.column_names == ["image", "caption", "label"]
    assert with_labels["label"] == [r[2] for r in records[:5]]


def test_parquet_file_glob_and_folder(tmp_path):
    records = shape_records()
    first = make_parquet(tmp_path / "pq" / "part-0.parquet", records[:7])
    make_parquet(tmp_path / "pq" / "part-1.parquet", records[7:])
    columns = dict(image_column="png", text_column="txt", label_column="label")
    one = load_source(first, **columns)
    assert one.column_names == ["image", "caption", "label"] and len(one) == 7
    assert isinstance(one.features["image"], datasets.Image)  # PNG bytes decoded as images
    np.testing.assert_array_equal(np.asarray(one[2]["image"]), np.asarray(records[2][0]))
    spec = SourceSpec.resolve(first, **columns)
    stored = spec.load(decode_images=False)  # the bytes as stored: no cast of every record batch
    assert stored.features["image"] == datasets.Value("binary") and stored["caption"] == one["caption"]
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(stored[2]["image"]))), np.asarray(records[2][0]))
    assert spec.fingerprint() == spec.fingerprint(stored)
    for source in (tmp_path / "pq" / "*.parquet", tmp_path / "pq"):
        assert SourceSpec.resolve(source).kind == "parquet"
        both = load_source(source, **columns)
        assert both["caption"] == [r[1] for r in records] and both["label"] == [r[2] for r in records]


def test_limit_keeps_a_prefix(tmp_path):
    folder = make_imagefolder(tmp_path / "shapes")
    assert load_source(folder, limit=4)["caption"] == load_source(folder)["caption"][:4]
    assert len(load_source(folder, limit=100)) == 12
    with pytest.raises(ValueError, match="non-negative int"):
        load_source(folder, limit=-1)


def test_builtin_fashion_mnist(fashion_mnist_installed):
    ds = load_source("fashion-mnist", split="test", label_column="label", limit=8)
    assert ds.column_names == ["image", "caption", "label"] and len(ds) == 8
    reference = to_hf_dataset("test", limit=8)
    assert ds["caption"] == reference["caption"] and ds["label"] == reference["label"]
    assert SourceSpec.resolve("fashion-mnist").kind == "builtin"


def test_builtin_fashion_mnist_attributes(fashion_mnist_installed):
    if "captions" not in inspect.signature(to_hf_dataset).parameters:
        pytest.skip("to_hf_dataset has no captions= keyword yet (attribute captions not merged)")
    ds = load_source("fashion-mnist-attributes", split="test", limit=6)
    assert ds["caption"] == to_hf_dataset("test", limit=6, captions="attributes")["caption"]


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("argument, role", [("image_column", "image"), ("text_column", "caption")])
def test_missing_column_names_the_columns_there_are(tmp_path, argument, role):
    folder = make_imagefolder(tmp_path / "shapes")
    columns = r"\['image', 'caption', 'shape'\]"
    with pytest.raises(ValueError, match=rf"no {role} column 'nope'.*{columns}.*{argument}="):
        load_source(folder, **{argument: "nope"})


def test_columns_of_the_wrong_type(tmp_path):
    folder = make_imagefolder(tmp_path / "shapes")
    with pytest.raises(ValueError, match="Column 'shape' holds Value\\('int64'\\).*not images"):
        load_source(folder, image_column="shape")
    with pytest.raises(ValueError, match="Column 'caption' holds Value\\('string'\\); labels are integers"):
        load_source(folder, label_column="caption")


@pytest.mark.parametrize("caption", ["", "   \t"])
def test_an_empty_caption_names_the_record(tmp_path, caption):
    records = shape_records()
    records[5] = (records[5][0], caption, 0)
    folder = make_imagefolder(tmp_path / "shapes", records)
    with pytest.raises(ValueError, match=re.escape(f"Record 5 has the caption {caption!r}")):
        load_source(folder)


def test_missing_paths(tmp_path):
    for missing in (tmp_path / "nowhere", tmp_path / "x.parquet", "./not-here", "shapes.parquet"):
        with pytest.raises(FileNotFoundError, match="no such folder or file"):
            load_source(missing)
    with pytest.raises(FileNotFoundError, match="no file matches"):
        load_source(tmp_path / "*.parquet")


def test_a_folder_without_captions(tmp_path):
    (tmp_path / "bare").mkdir()
    drawn("red", "circle", "top left").save(tmp_path / "bare" / "0.png")
    with pytest.raises(ValueError, match="neither a metadata.jsonl nor a metadata.csv"):
        load_source(tmp_path / "bare")
    with pytest.raises(ValueError, match="only parquet files"):
        load_source(tmp_path / "bare" / "0.png")


def test_hub_name_offline_says_what_to_do(monkeypatch):
    spec = SourceSpec.resolve("someone/captioned-shapes", split="validation")
    assert spec.kind == "hub" and spec.location == "someone/captioned-shapes"

    def unreachable(name, split):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(DataError, match=r"(?s)neither a local folder.*go online.*HF_HUB_OFFLINE=1"
                                        r".*imagefolder.*fashion-mnist"):
        spec.load()


# ----------------------------------------------------------------------------- fingerprints
def test_fingerprint_is_stable_and_follows_the_data(tmp_path):
    folder = make_imagefolder(tmp_path / "shapes")
    first = SourceSpec.resolve(folder).fingerprint()
    assert first == SourceSpec.resolve(folder).fingerprint()
    assert json.loads(json.dumps(first)) == first  # JSON as it is
    assert first != SourceSpec.resolve(folder, limit=6).fingerprint()
    assert first != SourceSpec.resolve(folder, label_column="shape").fingerprint()
    records = shape_records()
    records[0] = (records[0][0], "a red circle, slightly smaller", records[0][2])
    make_imagefolder(folder, records)  # captions edited in place
    assert first != SourceSpec.resolve(folder).fingerprint()


# ----------------------------------------------------------------------------- preprocessing
def test_center_crop_resize_and_none_shapes():
    wide = Image.new("RGB", (96, 48), "black")
    ImageDraw.Draw(wide).rectangle((24, 0, 71, 47), fill="white")  # the central 48x48 is white
    x = Preprocess(48, "center_crop")(wide, 0)
    assert x.shape == (3, 48, 48) and x.dtype == torch.float32
    assert torch.equal(x, torch.ones_like(x))  # the black sides were cropped away
    halved = Preprocess(24, "center_crop")(wide, 0)  # bilinear blends only the outermost columns
    assert halved.shape == (3, 24, 24) and torch.equal(halved[..., 1:-1], torch.ones(3, 24, 22))
    assert Preprocess((16, 40), "center_crop")(wide, 0).shape == (3, 16, 40)
    squeezed = Preprocess((32, 32), "resize")(wide, 0)
    assert squeezed.shape == (3, 32, 32) and squeezed.min() == -1 and squeezed.max() == 1
    as_is = Preprocess(None, "none", channels=1)  # encode_shards sets record 0's size
    assert dataclasses.replace(as_is, resolution=(48, 96))(wide, 0).shape == (1, 48, 96)


def test_channels_convert():
    red = drawn("red", "square", "top left")
    gray = Preprocess(64, "none", channels=1)(red, 0)
    assert gray.shape == (1, 64, 64)
    rgb = Preprocess(64, "none", channels=3)(red.convert("L"), 0)
    assert rgb.shape == (3, 64, 64) and torch.equal(rgb[0], rgb[1]) and torch.equal(gray[0], rgb[2])
    assert rgb.min() >= -1 and rgb.max() <= 1


def test_pad_matches_to_model_images_bit_for_bit():
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    pad = Preprocess(32, "pad", channels=1)
    ours = torch.stack([pad(Image.fromarray(image, mode="L"), i) for i, image in enumerate(images)])
    assert torch.equal(ours, to_model_images(images))


def test_mixed_sizes_with_none_name_both_sizes():
    none = Preprocess((64, 64), "none")
    none(drawn("red", "circle", "top left"), 0)
    with pytest.raises(ValueError, match=r"record 7 is 28x36 \(HxW\), but 64x64 is expected.*'center_crop'"):
        none(Image.new("RGB", (36, 28)), 7)
    with pytest.raises(ValueError, match="larger than the resolution 32x32"):
        Preprocess(32, "pad")(Image.new("RGB", (36, 28)), 3)


def test_preprocess_checks_its_arguments_and_fingerprints_differ():
    for bad in (dict(resize="stretch"), dict(channels=4), dict(resolution=(0, 3)), dict(resolution=None)):
        with pytest.raises(ValueError):
            Preprocess(**({"resolution": 32} | bad))
    assert Preprocess(32).resolution == (32, 32)
    prints = [Preprocess(32).fingerprint(), Preprocess((32, 48)).fingerprint(),
              Preprocess(32, "resize").fingerprint(), Preprocess(32, channels=1).fingerprint()]
    assert len({json.dumps(p, sort_keys=True) for p in prints}) == len(prints)

"""Fashion-MNIST with captions as a Hugging Face `datasets.Dataset`, the image-caption format that
large text-to-image sets (LAION, CC12M, ...) are streamed in; the records are the course's own.

Columns: `image` (a `datasets.Image`: the original 28x28 grayscale picture, not the 32x32 padded
model input; `fashion_mnist.to_model_images` does that step), `label` (a `ClassLabel` named by
`fashion_mnist.CLASSES`) and `caption`. With `captions="class"` the caption is
`captions.caption_for(label, seed=(seed, 0, index))`: the captions `FashionMNIST(captions=True)` gives
in its first epoch, the same for the same seed. With `captions="attributes"` it is
`captions.attribute_caption(label, values, seed=(seed, 0, index))` for the image's attribute values
as `attributes.label_attributes` measures them, and each attribute gets a `ClassLabel` column of its
own (e.g. `brightness`: 0 "dark", 1 "light") and `index` gives the record's place in the split.
`datasets` is optional: `pip install "tutorial_lib[hf]"`.
"""

from __future__ import annotations

from .attributes import ATTRIBUTES, is_held_out, label_attributes
from .captions import attribute_caption, caption_for
from .fashion_mnist import CLASSES, load_fashion_mnist

INSTALL_HINT = 'pip install "tutorial_lib[hf]"'
CAPTION_KINDS = ("class", "attributes")


def to_hf_dataset(split: str = "train", limit: int | None = None, seed: int = 0, captions: str = "class",
                  drop_held_out: bool | None = None):
    """The first `limit` records (all if None) of a split as a `datasets.Dataset` held in memory.

    Record i is (image i, label i, caption of label i seeded by (seed, 0, i)), with i the index in
    the split, so a smaller `limit` gives a prefix of the same records. `drop_held_out` removes the
    records of a `captions.HELD_OUT_COMBINATIONS` combination (images and captions) after that
    prefix is taken; by default it does so for attribute captions of the training split only, and
    the class captions are exactly what they were before attributes existed.
    """
    try:
        import datasets
    except ImportError as exc:
        raise ImportError("to_hf_dataset needs the Hugging Face `datasets` library, an optional "
                          f"dependency of tutorial_lib: {INSTALL_HINT}") from exc
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit is None or a non-negative int, got {limit!r}.")
    if captions not in CAPTION_KINDS:
        raise ValueError(f"Unknown captions {captions!r}; choose one of {', '.join(CAPTION_KINDS)}.")
    if drop_held_out is None:
        drop_held_out = split == "train" and captions == "attributes"
    images, labels = load_fashion_mnist(split)
    images, labels = images[:limit], labels[:limit].tolist()
    values = [{}] * len(labels)  # attribute values per record, measured only when needed
    if captions == "attributes" or drop_held_out:
        measured = label_attributes(images, labels)
        values = [{name: int(v[i]) for name, v in measured.items()} for i in range(len(labels))]
    columns = {
        "image": list(images),  # uint8 [28, 28] arrays, stored as grayscale PNG (mode "L")
        "label": labels,
        "caption": [caption_for(y, seed=(seed, 0, i)) if captions == "class"
                    else attribute_caption(y, values[i], seed=(seed, 0, i)) for i, y in enumerate(labels)],
    }
    features = {
        "image": datasets.Image(),
        "label": datasets.ClassLabel(names=list(CLASSES)),
        "caption": datasets.Value("string"),
    }
    if captions == "attributes":
        columns |= {name: [v[name] for v in values] for name in ATTRIBUTES} | {"index": list(range(len(labels)))}
        features |= {name: datasets.ClassLabel(names=list(words)) for name, words in ATTRIBUTES.items()}
        features["index"] = datasets.Value("int64")
    if drop_held_out:
        keep = [i for i, y in enumerate(labels) if not is_held_out(y, values[i])]
        columns = {name: [column[i] for i in keep] for name, column in columns.items()}
    kind = "" if captions == "class" else "attribute captions, "
    dropped = ", held-out combinations removed" if drop_held_out else ""
    info = datasets.DatasetInfo(
        description="Fashion-MNIST (Xiao, Rasul & Vollgraf, 2017) with captions from "
                    f"tutorial_lib.data.captions ({kind}seed={seed}{dropped}).",
        homepage="https://github.com/zalandoresearch/fashion-mnist",
        features=datasets.Features(features),
    )
    return datasets.Dataset.from_dict(columns, info=info, split=datasets.Split(split))

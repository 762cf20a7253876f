"""Fashion-MNIST with captions as a Hugging Face `datasets.Dataset`, the image-caption format that
large text-to-image sets (LAION, CC12M, ...) are streamed in; the records are the course's own.

Columns: `image` (a `datasets.Image`: the original 28x28 grayscale picture, not the 32x32 padded
model input; `fashion_mnist.to_model_images` does that step), `label` (a `ClassLabel` named by
`fashion_mnist.CLASSES`) and `caption` (`captions.caption_for(label, seed=(seed, 0, index))`: the
captions `FashionMNIST(captions=True)` gives in its first epoch, the same for the same seed). `datasets` is optional: `pip install "tutorial_lib[hf]"`.
"""

from __future__ import annotations

from .captions import caption_for
from .fashion_mnist import CLASSES, load_fashion_mnist

INSTALL_HINT = 'pip install "tutorial_lib[hf]"'


def to_hf_dataset(split: str = "train", limit: int | None = None, seed: int = 0):
    """The first `limit` records (all if None) of a split as a `datasets.Dataset` held in memory.

    Record i is (image i, label i, caption_for(label i, seed=(seed, 0, i))), with i the index in the
    split, so a smaller `limit` gives a prefix of the same records.
    """
    try:
        import datasets
    except ImportError as exc:
        raise ImportError("to_hf_dataset needs the Hugging Face `datasets` library, an optional "
                          f"dependency of tutorial_lib: {INSTALL_HINT}") from exc
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit is None or a non-negative int, got {limit!r}.")
    images, labels = load_fashion_mnist(split)
    images, labels = images[:limit], labels[:limit].tolist()
    features = datasets.Features({
        "image": datasets.Image(),
        "label": datasets.ClassLabel(names=list(CLASSES)),
        "caption": datasets.Value("string"),
    })
    columns = {
        "image": list(images),  # uint8 [28, 28] arrays, stored as grayscale PNG (mode "L")
        "label": labels,
        "caption": [caption_for(y, seed=(seed, 0, i)) for i, y in enumerate(labels)],
    }
    info = datasets.DatasetInfo(
        description="Fashion-MNIST (Xiao, Rasul & Vollgraf, 2017) with captions from "
                    f"tutorial_lib.data.captions (seed={seed}).",
        homepage="https://github.com/zalandoresearch/fashion-mnist",
        features=features,
    )
    return datasets.Dataset.from_dict(columns, info=info, split=datasets.Split(split))

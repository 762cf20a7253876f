"""Image-caption sources as Hugging Face `datasets`, and the preprocessing that makes model input.

`load_source(source, ...)` gives a `datasets.Dataset` of records with the columns `image` (PIL
images), `caption` (non-empty strings) and, when `label_column` is named, `label` (ints), the
record's index being its row. `source` is one of:
  - a folder in the `imagefolder` layout: images plus a `metadata.jsonl` or `metadata.csv` with a
    `file_name` column and a caption column (what `datasets.load_dataset("imagefolder")` reads);
  - a parquet file, a glob of parquet files, or a folder of them (LAION, CC12M and most Hub sets
    ship this way; an image column of encoded bytes is decoded as images);
  - a built-in name, `BUILTINS`: the course's Fashion-MNIST from `hf.to_hf_dataset`;
  - otherwise a Hub dataset id, loaded by `datasets.load_dataset(name)` (online, or offline from
    datasets' cache with HF_HUB_OFFLINE=1).
Local sources never touch the network, so they need no offline setting.

`SourceSpec` is the source written down: what `resolve` made of the argument, `load()` to read it,
and `fingerprint()`, its identity in cache keys: the spec's fields plus datasets' own fingerprint
of the records as `load(decode_images=False)` gives them. That one covers what can change under an
unchanged spec: for local files datasets hashes every data file's path and modification time (the
images and the metadata file; mtimes, not contents, so that a million-image folder is not read to
key it: an edit, or a copy that does not keep mtimes, gives a new key and a re-encode, never stale
latents), for a Hub set its revision, and for an in-memory set (the built-ins) the content itself.

`load()` casts an image column of encoded bytes to `datasets.Image`; `load(decode_images=False)`
keeps it as stored, bytes for the reader to decode (`data.shards` does). The cast rebuilds each of
the table's Arrow record batches in memory, and datasets stores image data in batches of 100 rows,
so cast records hold about 25–30 bytes more per record (25–30 MB for a million, counted again in
every forked DataLoader worker).

`Preprocess` turns a record's image into float32 [C, H, W] in [-1, 1] by one resize policy.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .fashion_mnist import DataError
from .hf import INSTALL_HINT, to_hf_dataset

BUILTINS = {
    "fashion-mnist": to_hf_dataset,
    "fashion-mnist-attributes": functools.partial(to_hf_dataset, captions="attributes"),
}
KINDS = ("imagefolder", "parquet", "builtin", "hub")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")  # "name" or "owner/name"
GLOB_CHARS = re.compile(r"[*?\[]")


def _datasets():
    try:
        import datasets
    except ImportError as exc:
        raise ImportError("Image-caption sources need the Hugging Face `datasets` library, an "
                          f"optional dependency of tutorial_lib: {INSTALL_HINT}") from exc
    return datasets


def _local_kind(path: Path) -> str:
    """'imagefolder' or 'parquet' for an existing folder or file, or a clear error."""
    if path.is_file():
        if path.suffix != ".parquet":
            raise ValueError(f"{path}: only parquet files are read directly; put images in a folder "
                             f"with a {' or '.join(METADATA_FILES)} of captions (imagefolder layout).")
        return "parquet"
    if any(next(path.rglob(name), None) for name in METADATA_FILES):
        return "imagefolder"
    if next(path.rglob("*.parquet"), None):
        return "parquet"
    raise ValueError(f"{path}: holds neither a {' nor a '.join(METADATA_FILES)} (the imagefolder "
                     "layout: images plus a file_name column and a caption column) nor parquet files.")


@dataclass(frozen=True)
class SourceSpec:
    """Where records come from, and which columns hold the image, the caption and the label.

    kind: 'imagefolder' | 'parquet' | 'builtin' | 'hub'; location: an absolute folder, file or glob
    for local kinds, else a name. `limit` keeps the first `limit` records.
    """

    kind: str
    location: str
    split: str = "train"
    image_column: str = "image"
    text_column: str = "caption"
    label_column: str | None = None
    limit: int | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Unknown source kind {self.kind!r}; choose one of {', '.join(KINDS)}.")
        limit = self.limit
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            raise ValueError(f"limit is None or a non-negative int, got {limit!r}.")

    @classmethod
    def resolve(cls, source, split: str = "train", image_column: str = "image",
                text_column: str = "caption", label_column: str | None = None,
                limit: int | None = None) -> SourceSpec:
        """The spec for `source` (see the module's docstring), checking that a local one exists."""
        text = str(source)
        columns = dict(split=split, image_column=image_column, text_column=text_column,
                       label_column=label_column, limit=limit)
        if text in BUILTINS:
            return cls("builtin", text, **columns)
        path = Path(text).expanduser().absolute()
        if GLOB_CHARS.search(text):
            matches = sorted(glob.glob(str(path), recursive=True))
            if not matches:
                raise FileNotFoundError(f"{text}: no file matches this pattern.")
            if not all(m.endswith(".parquet") for m in matches):
                raise ValueError(f"{text}: a pattern must match parquet files only; it matches "
                                 f"{[m for m in matches if not m.endswith('.parquet')][:3]}.")
            return cls("parquet", str(path), **columns)
        if path.exists():
            return cls(_local_kind(path), str(path), **columns)
        if not HUB_ID.fullmatch(text) or Path(text).suffix in (".parquet", ".jsonl", ".csv"):
            raise FileNotFoundError(f"{text}: no such folder or file.")
        return cls("hub", text, **columns)

    def load(self, decode_images: bool = True):
        """The records as a `datasets.Dataset` with columns image, caption (and label), checked;
        `decode_images=False` keeps an image column of encoded bytes as bytes (see the module docstring)."""
        datasets = _datasets()
        if self.kind == "builtin":
            raw = BUILTINS[self.location](self.split, self.limit)
        elif self.kind == "imagefolder":
            raw = datasets.load_dataset("imagefolder", data_dir=self.location, split=self.split)
        elif self.kind == "parquet" and Path(self.location).is_dir():
            raw = datasets.load_dataset("parquet", data_dir=self.location, split=self.split)
        elif self.kind == "parquet":
            raw = datasets.load_dataset("parquet", data_files={self.split: self.location}, split=self.split)
        else:
            raw = self._load_from_hub(datasets)
        if self.limit is not None and len(raw) > self.limit:
            raw = raw.select(range(self.limit))
        return as_records(raw, self.image_column, self.text_column, self.label_column, decode_images)

    def _load_from_hub(self, datasets):
        try:
            return datasets.load_dataset(self.location, split=self.split)
        except ConnectionError as exc:  # offline, or HF_HUB_OFFLINE=1 and not in datasets' cache
            raise DataError(
                f"{self.location!r} is neither a local folder or file ({Path(self.location).absolute()} "
                f"does not exist) nor a Hub dataset that could be reached ({exc}). Either go online "
                "once (datasets caches it; then HF_HUB_OFFLINE=1 reads the cache offline), or pass a "
                f"local folder in the imagefolder layout ({' or '.join(METADATA_FILES)} of captions), "
                f"parquet files, or a built-in name: {', '.join(BUILTINS)}.") from exc

    def fingerprint(self, records=None) -> dict:
        """The spec's fields and datasets' fingerprint of its records, as JSON-ready values.

        `records`: this spec's `load(decode_images=False)`, if already at hand (otherwise it is loaded).
        """
        records = self.load(decode_images=False) if records is None else records
        return {**dataclasses.asdict(self), "records": records._fingerprint}


def load_source(source, split: str = "train", image_column: str = "image", text_column: str = "caption",
                label_column: str | None = None, limit: int | None = None):
    """The records of a local folder, parquet file(s), built-in or Hub dataset (see the module's
    docstring) as a `datasets.Dataset` with columns image, caption (and label if `label_column`)."""
    return SourceSpec.resolve(source, split, image_column, text_column, label_column, limit).load()


def _as_images(dataset, column: str, decode: bool = True):
    """`dataset` with `column` decoded as images: encoded bytes (a binary column, or datasets'
    {bytes, path} struct as plain parquet stores it) are cast, a binary column only if `decode`;
    anything else is an error."""
    datasets = _datasets()
    feature = dataset.features[column]
    if isinstance(feature, datasets.Image):
        return dataset
    is_bytes = feature == datasets.Value("binary")
    is_struct = isinstance(feature, dict) and set(feature) == {"bytes", "path"}
    if not (is_bytes or is_struct):
        raise ValueError(f"Column {column!r} holds {feature}, not images; name the image column "
                         "with image_column=...")
    if is_bytes and not decode:
        return dataset
    return dataset.cast_column(column, datasets.Image())


def _holds_integers(feature) -> bool:
    datasets = _datasets()
    return isinstance(feature, datasets.ClassLabel) or (
        isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint")))


def _column(dataset, column: str, chunk: int = 65_536):
    """The values of `column`, read `chunk` rows at a time: never the whole column in memory (datasets
    keeps the table memory-mapped; `dataset[column]` would make one Python list of millions)."""
    dataset = dataset.select_columns([column])  # a view: the other columns (images) are not read
    for start in range(0, len(dataset), chunk):
        yield from dataset[start:start + chunk][column]


def as_records(dataset, image_column: str = "image", text_column: str = "caption",
               label_column: str | None = None, decode_images: bool = True):
    """`dataset` reduced to the columns image, caption (and label), renamed so, after checking
    that they exist, that the images are images, the labels integers, and that every caption has a
    word in it. `decode_images=False` keeps an image column of encoded bytes as bytes."""
    roles = {"image": image_column, "caption": text_column, "label": label_column}
    for role, column in roles.items():
        if column is not None and column not in dataset.column_names:
            argument = {"image": "image_column", "caption": "text_column", "label": "label_column"}[role]
            raise ValueError(f"The dataset has no {role} column {column!r}; its columns are "
                             f"{dataset.column_names}. Name the right one with {argument}=...")
    dataset = _as_images(dataset, image_column, decode_images)
    if label_column is not None and not _holds_integers(dataset.features[label_column]):
        raise ValueError(f"Column {label_column!r} holds {dataset.features[label_column]}; labels are "
                         "integers (a ClassLabel or an integer column).")
    for i, caption in enumerate(_column(dataset, text_column)):
        if not isinstance(caption, str) or not caption.strip():
            raise ValueError(f"Record {i} has the caption {caption!r} (column {text_column!r}): every "
                             "record needs a non-empty caption. Fix it, or drop such records first "
                             "(dataset.filter).")
    chosen = {column: role for role, column in roles.items() if column is not None}
    dataset = dataset.select_columns(list(chosen))
    return dataset.rename_columns({c: r for c, r in chosen.items() if c != r})


# ----------------------------------------------------------------------------- preprocessing
RESIZE_POLICIES = ("none", "center_crop", "resize", "pad")
RESAMPLE = Image.Resampling.BILINEAR  # as Stable Diffusion's training scripts (torchvision's Resize)


@dataclass(frozen=True)
class Preprocess:
    """A record's image -> float32 [C, H, W] in [-1, 1], for `resolution` (int or (H, W)):

    resize='none'         every image must already be H x W; without a resolution, the size of
                          record 0 (`encode_shards` fills it in), so that all share one size
    resize='center_crop'  scale so that the image just covers H x W (a square's short side becomes
                          the resolution), then crop the centre: Stable Diffusion's training scripts
    resize='resize'       scale to H x W; the aspect ratio is not kept
    resize='pad'          centre the image on H x W of black (-1), never scaling: Fashion-MNIST's
                          28x28 -> 32x32, exactly as `fashion_mnist.to_model_images`
    channels: 1 or 3, converting every image to PIL mode 'L' or 'RGB' first.
    """

    resolution: int | tuple[int, int] | None = None
    resize: str = "center_crop"
    channels: int = 3

    def __post_init__(self):
        if self.resize not in RESIZE_POLICIES:
            raise ValueError(f"Unknown resize policy {self.resize!r}; choose one of {', '.join(RESIZE_POLICIES)}.")
        if self.channels not in (1, 3):
            raise ValueError(f"channels is 1 (grayscale) or 3 (RGB), got {self.channels!r}.")
        resolution = self.resolution
        if resolution is None:
            if self.resize != "none":
                raise ValueError(f"resize={self.resize!r} needs a resolution (an int or (H, W)).")
            return
        size = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
        if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
            raise ValueError(f"resolution is a positive int or (H, W), got {resolution!r}.")
        object.__setattr__(self, "resolution", size)  # always (H, W) from here on

    def fingerprint(self) -> dict:
        """The preprocessing as JSON values (it enters cache keys), the resampling filter included."""
        resolution = None if self.resolution is None else list(self.resolution)
        return {**dataclasses.asdict(self), "resolution": resolution, "resample": RESAMPLE.name.lower()}

    def __call__(self, image: Image.Image, index: int | None = None) -> torch.Tensor:
        """An image (record `index`, as errors name it) as float32 [C, H, W] in [-1, 1]."""
        image = image.convert("L" if self.channels == 1 else "RGB")
        (height, width), (h, w) = self.resolution, (image.height, image.width)
        which = "the image" if index is None else f"record {index}"
        if self.resize == "none" and (h, w) != (height, width):
            raise ValueError(
                f"Images differ in size: {which} is {h}x{w} (HxW), but {height}x{width} is "
                "expected (the resolution, or record 0's size when none is given). resize='none' needs "
                "one size for all: pick resize='center_crop', 'resize' or 'pad' with a resolution.")
        if self.resize == "pad" and (h > height or w > width):
            raise ValueError(f"{which.capitalize()} is {h}x{w} (HxW), larger than the resolution {height}x"
                             f"{width}: resize='pad' never shrinks; pick 'center_crop' or 'resize'.")
        if self.resize == "resize":
            image = image.resize((width, height), RESAMPLE)
        elif self.resize == "center_crop":
            image = _cover_and_crop(image, height, width)
        x = torch.from_numpy(np.array(image)).float().div(127.5).sub(1.0)  # uint8 -> [-1, 1]
        x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)  # [C, h, w]
        if self.resize == "pad":
            top, left = (height - h) // 2, (width - w) // 2
            x = F.pad(x, (left, width - w - left, top, height - h - top), value=-1.0)
        return x


def _cover_and_crop(image: Image.Image, height: int, width: int) -> Image.Image:
    """Scale `image` to just cover height x width, keeping its aspect, then crop the centre
    (offsets rounded as torchvision's CenterCrop)."""
    scale = max(height / image.height, width / image.width)
    h, w = max(height, round(image.height * scale)), max(width, round(image.width * scale))
    image = image.resize((w, h), RESAMPLE)
    top, left = round((h - height) / 2), round((w - width) / 2)
    return image.crop((left, top, left + width, top + height))


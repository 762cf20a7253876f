"""Which torch release each feature needs, and one clear line when the installed torch is older.

pyproject.toml's floor is the lowest torch the whole test suite has passed on (docs/torch_versions.md
lists the runs); the features below need that or less. Each version is the first release whose own
source has the feature (read in the released wheels, docs/torch_versions.md). A torch older than a
feature needs (one that ignored the floor: a preinstalled or pinned torch, `pip install --no-deps`)
is refused where the feature is set up, before any work, instead of an AttributeError mid-run:

    require_torch("fsdp")  # TorchVersionError: FSDP2 (...) needs torch >= 2.6; this is torch 2.5.1: ...
"""

from __future__ import annotations

import re

import torch

# name -> (the first torch release that has it, what it is, by torch's names)
TORCH_FEATURES = {
    "sdpa_gqa": ("2.5", "grouped-query attention (F.scaled_dot_product_attention's enable_gqa)"),
    "grad_clip": ("2.6", "gradient clipping, sharded gradients included (torch.nn.utils.get_total_norm, "
                         "clip_grads_with_norm_)"),
    "fsdp": ("2.6", "FSDP2 (torch.distributed.fsdp.fully_shard, MixedPrecisionPolicy)"),
    "sharded_checkpoints": ("2.9", "sharded checkpoints (torch.distributed.checkpoint.HuggingFaceStorageWriter's "
                                   "save_distributed)"),
}


class TorchVersionError(RuntimeError):
    """The installed torch is older than a feature needs."""


def torch_release(version: str | None = None) -> tuple[int, int]:
    """(major, minor) of a torch version string (default: the installed torch's): "2.6.0a0+git1234" ->
    (2, 6), so a pre-release or vendor build of 2.6 (NGC's "2.6.0a0+...nv25.01") counts as 2.6."""
    version = str(torch.__version__ if version is None else version)
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise ValueError(f"Not a torch version: {version!r}.")
    return int(match[1]), int(match[2])


def require_torch(*features: str) -> None:
    """Raise TorchVersionError, naming the feature and the pip command, if the installed torch is older
    than any of `features` (names in TORCH_FEATURES) needs."""
    for name in features:
        version, what = TORCH_FEATURES[name]
        if torch_release() < torch_release(version):
            raise TorchVersionError(f"{what} needs torch >= {version}; this is torch {torch.__version__}: "
                                    f"pip install -U 'torch>={version}'")

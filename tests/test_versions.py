"""The torch floor: pyproject's floor covers every feature's version, the installed torch has every
feature, and an older torch is refused where a feature is set up, in one line (tutorial_lib/versions.py)."""

from __future__ import annotations

import inspect
import re
import tomllib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tutorial_lib.versions import TORCH_FEATURES, TorchVersionError, require_torch, torch_release

from .conftest import REPO_ROOT


def _floor() -> tuple[int, int]:
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    [floor] = [d for d in pyproject["project"]["dependencies"] if d.startswith("torch>=")]
    return torch_release(re.fullmatch(r"torch>=([\d.]+)", floor)[1])


def test_the_floor_has_every_feature():
    above = {name: version for name, (version, _) in TORCH_FEATURES.items() if torch_release(version) > _floor()}
    assert above == {}


def test_the_installed_torch_has_every_feature():
    """What TORCH_FEATURES names is there in the torch that runs the tests (a name torch dropped or renamed
    would fail here before it fails a run)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed import fsdp

    present = {
        "sdpa_gqa": "enable_gqa" in F.scaled_dot_product_attention.__doc__,
        "grad_clip": hasattr(nn.utils, "get_total_norm") and hasattr(nn.utils, "clip_grads_with_norm_"),
        "fsdp": hasattr(fsdp, "fully_shard") and hasattr(fsdp, "MixedPrecisionPolicy"),
        "sharded_checkpoints": "save_distributed" in inspect.signature(dcp.HuggingFaceStorageWriter).parameters,
    }
    assert present == dict.fromkeys(TORCH_FEATURES, True)


def test_each_feature_is_in_the_docs_table():
    text = (REPO_ROOT / "docs" / "torch_versions.md").read_text()
    for name, (version, _) in TORCH_FEATURES.items():
        assert re.search(rf"^\| `{name}` .*\| {re.escape(version)} \|", text, re.M), name


@pytest.mark.parametrize("version, release", [("2.11.0+cu130", (2, 11)), ("2.6.0a0+ecf3bae40a.nv25.01", (2, 6)),
                                              ("2.9.1", (2, 9)), ("3.0", (3, 0))])
def test_torch_release(version, release):
    assert torch_release(version) == release


def test_an_older_torch_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.8.0+cu128")
    require_torch("sdpa_gqa", "grad_clip", "fsdp")
    with pytest.raises(TorchVersionError) as info:
        require_torch("fsdp", "sharded_checkpoints")
    assert str(info.value) == ("sharded checkpoints (torch.distributed.checkpoint.HuggingFaceStorageWriter's "
                               "save_distributed) needs torch >= 2.9; this is torch 2.8.0+cu128: "
                               "pip install -U 'torch>=2.9'")
    monkeypatch.setattr(torch, "__version__", "2.9.0a0+git1234")  # a pre-release of 2.9 has 2.9's features
    require_torch(*TORCH_FEATURES)


def test_the_features_are_refused_where_they_are_set_up(monkeypatch, tmp_path):
    """Grouped-query attention at construction, the Trainer's gradient clipping before it trains, FSDP
    and sharded checkpoints before any collective; the CLI prints the error as one line (a user error)."""
    from tutorial_lib.cli import user_errors
    from tutorial_lib.models.layers import Attention
    from tutorial_lib.train import distributed
    from tutorial_lib.train.trainer import Trainer, TrainerConfig

    monkeypatch.setattr(torch, "__version__", "2.4.1")
    Attention(16, 4)
    with pytest.raises(TorchVersionError, match=r"^grouped-query attention .* needs torch >= 2.5; this is torch 2.4.1"):
        Attention(16, 4, kv_heads=2)
    data = (torch.randn(8, 4), torch.randn(8, 2))
    with pytest.raises(TorchVersionError, match=r"^gradient clipping.* needs torch >= 2.6"):
        Trainer(nn.Linear(4, 2), None, data, TrainerConfig(steps=1, batch_size=8, out_dir=str(tmp_path)))
    with pytest.raises(TorchVersionError, match=r"^FSDP2 .* needs torch >= 2.6"):
        distributed.shard(nn.Linear(4, 2), None)  # refused before the mesh is used
    for io, names in ((distributed.save_sharded, ()), (distributed.load_sharded, ([distributed.shard_file(0)],))):
        with pytest.raises(TorchVersionError, match=r"^sharded checkpoints .* needs torch >= 2.9"):
            io({}, tmp_path, *names)
    assert TorchVersionError in user_errors()

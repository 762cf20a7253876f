"""scripts/bench_dit_throughput.py builds a PixArt of our DiT's shape."""

import importlib.util

import pytest
import torch

from tutorial_lib.models.dit import preset

from .conftest import REPO_ROOT

pytest.importorskip("diffusers")
spec = importlib.util.spec_from_file_location("bench_dit_throughput",
                                              REPO_ROOT / "scripts" / "bench_dit_throughput.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_models_match_in_shape():
    cfg = preset("tiny", text_dim=24)
    models = bench.build_models(cfg)
    pixart = models["PixArt"].config
    assert pixart.num_attention_heads * pixart.attention_head_dim == cfg.hidden_size
    assert (pixart.num_layers, pixart.num_attention_heads, pixart.patch_size) == (cfg.depth, cfg.num_heads,
                                                                                  cfg.patch_size)
    assert (pixart.sample_size, pixart.sample_size) == cfg.input_size
    assert pixart.caption_channels == cfg.text_dim
    batch = bench.make_batch(cfg, batch_size=3, text_len=5, device="cpu")
    for model in models.values():
        out = bench.forward(model, batch)
        assert out.shape == batch["x"].shape
        torch.nn.functional.mse_loss(out, batch["target"]).backward()  # a training step runs


def test_unmatched_options_are_refused():
    with pytest.raises(ValueError, match="qk_norm"):
        bench.pixart_like(preset("tiny", qk_norm="rms"))

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


def test_adaln_single_adds_a_row(tmp_path, capsys):
    """--adaln-single times our DiT with PixArt's adaLN-single too, with its own ratio to PixArt."""
    argv = ["--text-dim", "16", "--text-len", "4", "--batch-size", "2", "--steps", "1", "--repeats", "2",
            "--warmup", "0", "--device", "cpu", "--adaln-single", "--out", str(tmp_path / "bench.json")]
    result = bench.run(bench.parse_args(argv))
    names = {"DiT (ours)", "PixArt", bench.SINGLE}
    assert set(result["median_images_per_s"]) == names and set(result["median_ratio_over_pixart"]) == names - {"PixArt"}
    assert result["ratio_over_pixart"]["DiT (ours)"] == result["ratio_ours_over_pixart"]
    params = {name: p["total"] for name, p in result["params"].items()}
    assert params["DiT (ours)"] > params[bench.SINGLE]  # the blocks' adaLN MLPs, shared
    assert f"ratio {bench.SINGLE}/PixArt" in capsys.readouterr().out

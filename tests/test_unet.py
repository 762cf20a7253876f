"""The UNet adapter (notebook 07): presets and config errors, zero output at init, the time scaling and
the text mask, activation checkpointing, the computed cost, half precision, bad input, and training,
saving and loading through the CLI, our pipeline loader and diffusers'. Tiny widths, CPU."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from tutorial_lib.models import dit
from tutorial_lib.models.layers import timestep_embedding
from tutorial_lib.models.unet import PRESETS, UNet, UNetConfig, preset, unet_cost
from tutorial_lib.pipeline import TextToImagePipeline
from tests.denoisers import caption, check_caption_mask, fit_losses, inputs, randomize
from tutorial_lib.text.base import TextEmbedding, masked_mean

TEXT_DIM = 16
TWO_LEVELS = dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))


def tiny(**overrides) -> UNetConfig:
    """Two levels (8x8 without attention, 4x4 with cross-attention), 16 and 32 channels."""
    sizes = dict(block_out_channels=(16, 32), attention_head_dim=8, norm_num_groups=8, text_dim=TEXT_DIM,
                 **TWO_LEVELS)
    return preset("tiny", **{**sizes, **overrides})


def text(b: int = 2, length: int = 5, real=(2, 1), seed: int = 1, dim: int = TEXT_DIM) -> TextEmbedding:
    return caption(dim, b, length, real, seed)


# ----------------------------------------------------------------------------- presets and configs
def test_presets_and_unknown_names():
    assert PRESETS["tiny"] == UNetConfig()
    cfg = preset("tiny", text_dim=384)
    assert cfg.text_dim == 384 and PRESETS["tiny"].text_dim == 128  # a copy
    with pytest.raises(ValueError, match="Unknown UNet preset 'nope'; choose one of tiny, small, SD-1.5"):
        preset("nope")


@pytest.mark.parametrize("overrides, match", [
    (dict(block_out_channels=(16, 16, 16, 16, 16), attention_head_dim=8,
          down_block_types=("DownBlock2D",) * 5, up_block_types=("UpBlock2D",) * 5),
     r"input_size \(8, 8\) must be \(H, W\), each divisible by 16: the 5 levels .* halve the latent 4 times"),
    (dict(input_size=(12, 7)), r"input_size \(12, 7\) must be \(H, W\), each divisible by 2"),
    (dict(down_block_types=("DownBlock2D",)), "one entry per level"),
    (dict(attention_head_dim=(8, 8, 8)), "one entry per level"),
    (dict(down_block_types=("DownBlock2D", "AttnDownBlock2D")), "Unknown block types"),
    (dict(norm_num_groups=32), r"divisible by norm_num_groups 32 .* fail: \[\(16, 32\)\]"),
    (dict(attention_head_dim=(8, 12)), r"\(32, 12\)"),
])
def test_bad_configs(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny(**overrides)


def test_a_config_from_json_lists():
    cfg = tiny(input_size=[8, 16], block_out_channels=[16, 32], attention_head_dim=[8, 16])
    assert cfg == tiny(input_size=(8, 16), attention_head_dim=(8, 16)) and cfg.head_dims == (8, 16)
    assert tiny(attention_head_dim=8).head_dims == (8, 8)


# ----------------------------------------------------------------------------- the adapter
def test_zero_init_outputs_exact_zeros():
    """conv_out is zeroed (as ADM's and LDM's U-Nets): F = 0, the parametrization's "no correction"."""
    torch.manual_seed(0)
    model = UNet(tiny()).eval()
    x, t = inputs()
    with torch.no_grad():
        assert torch.equal(model(x, t, text()), torch.zeros_like(x))
        randomize(model)
        assert model(x, t, text()).abs().min() > 0


def test_zero_init_model_learns():
    """The zeroed conv_out gets a gradient at once (its input features are not 0), so a batch is fit."""
    torch.manual_seed(0)
    model = UNet(tiny())
    losses = fit_losses(model, text(), 30, 3e-3)
    assert losses[-1] < 0.5 * losses[0]


def test_the_adapter_is_diffusers_call_with_1000_t():
    """F(x, t, text) = unet(x, 1000 t, tokens, mask, pooled tokens), and diffusers' sinusoidal embedding
    of 1000 t is our timestep_embedding(t)."""
    torch.manual_seed(0)
    model = randomize(UNet(tiny()))
    x, t = inputs()
    emb = text()
    pooled = masked_mean(emb)  # [B, D_text]: the mean of the real tokens
    with torch.no_grad():
        direct = model.unet(x, 1000 * t, encoder_hidden_states=emb.tokens, encoder_attention_mask=emb.mask,
                            class_labels=pooled).sample
        assert torch.equal(model(x, t, emb), direct)
        width = model.config.block_out_channels[0]
        torch.testing.assert_close(model.unet.time_proj(1000 * t), timestep_embedding(t, width), atol=2e-4, rtol=0)
    assert UNet(tiny(pooled_text=False)).unet.class_embedding is None


@pytest.mark.parametrize("pooled_text", [True, False])
def test_padding_tokens_do_not_matter_but_the_mask_does(pooled_text):
    """diffusers honours encoder_attention_mask: padding gets softmax weight exactly 0."""
    torch.manual_seed(0)
    model = randomize(UNet(tiny(pooled_text=pooled_text)))
    emb = text(length=5, real=(2, 1))
    check_caption_mask(model, emb, text(seed=5))
    x, t = inputs()
    junk = emb.tokens.clone()
    junk[~emb.mask] = 100.0
    with torch.no_grad():  # exactly: padding gets softmax weight 0 after diffusers' -10000 bias
        assert torch.equal(model(x, t, TextEmbedding(junk, emb.mask)), model(x, t, emb))


def test_activation_checkpointing_gives_the_same_gradients():
    """The Trainer's switch (model.gradient_checkpointing = True) turns on diffusers' own."""
    torch.manual_seed(0)
    model = randomize(UNet(tiny())).train()
    x, t = inputs()
    grads = []
    for on in (False, True):
        model.gradient_checkpointing = on
        assert model.gradient_checkpointing is on
        model.zero_grad()
        model(x, t, text()).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_runs_in_half_precision(dtype):
    torch.manual_seed(0)
    model = randomize(UNet(tiny()))
    x, t = inputs()
    emb = text()
    with torch.no_grad():
        full = model(x, t, emb)
        half = model.to(dtype)(x.to(dtype), t, TextEmbedding(emb.tokens.to(dtype), emb.mask))
    assert half.dtype == dtype and torch.isfinite(half).all()
    torch.testing.assert_close(half.float(), full, atol=0.1, rtol=0.1)


def test_bad_inputs():
    model = UNet(tiny())
    x, t = inputs()
    emb = text()
    with pytest.raises(ValueError, match=r"Expected latents \[B, 4, H, W\], got \(2, 3, 8, 8\)"):
        model(x[:, :3], t, emb)
    with pytest.raises(ValueError, match="Expected latents"):
        model(x[0], t, emb)
    with pytest.raises(ValueError, match=r"Expected text tokens \[B, L, 16\], got \(2, 5, 8\)"):
        model(x, t, TextEmbedding(torch.randn(2, 5, 8), emb.mask))
    with pytest.raises(ValueError, match="bool text mask"):
        model(x, t, TextEmbedding(emb.tokens, emb.mask.float()))
    with pytest.raises(ValueError, match="Batch sizes differ"):
        model(x, torch.rand(3), emb)


# ----------------------------------------------------------------------------- cost
def test_unet_cost_counts_a_real_forward_pass():
    """The meta-device count, part by part, adds up to FlopCounterMode's total on a real CPU forward
    (math SDPA: attention as bmm's, which it counts), and the parameters are the model's."""
    cfg = tiny(input_size=(8, 16))
    model = UNet(cfg).eval()
    x, t = inputs(w=16)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x[:1], t[:1], text(b=1, length=7, real=(7,)))
    cost = unet_cost(cfg, text_len=7)
    assert cost.flops == counter.get_total_flops() > 0
    assert set(cost.flops_by_part) >= {"conv_in", "down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.1",
                                       "conv_out"}
    assert cost.params == cost.active_params == sum(p.numel() for p in model.parameters())
    assert unet_cost(cfg, input_size=(8, 32)).flops > cost.flops


def test_the_tiny_preset_costs_about_what_the_tiny_dit_costs():
    """Notebook 07 compares them at equal compute: with MiniLM's 384-wide tokens, within 10%."""
    ours, theirs = unet_cost(preset("tiny", text_dim=384)), dit.dit_cost(dit.preset("tiny", text_dim=384))
    assert ours.params == pytest.approx(theirs.params, rel=0.1)
    assert ours.flops == pytest.approx(theirs.flops, rel=0.1)


def test_the_sd15_preset_is_stable_diffusions_unet():
    """Stable Diffusion 1.5's UNet has 859,520,964 parameters (counted on the meta device)."""
    with torch.device("meta"):
        model = UNet(preset("SD-1.5"))
    assert sum(p.numel() for p in model.parameters()) == 859_520_964
    assert model.unet.config.attention_head_dim == (8, 8, 8, 8)  # diffusers' name for 8 heads per level


# ----------------------------------------------------------------------------- pipeline and CLI
def test_pipeline_round_trip_through_both_loaders(tmp_path, tiny_text_encoder, shipped_vae):
    """Saved as our component (UNetConfig + "unet.*" weights); both loaders draw the same images, and the
    inner diffusers model saves and loads in diffusers' own format."""
    import diffusers

    torch.manual_seed(0)
    model = randomize(UNet(tiny()))
    pipe = TextToImagePipeline(model, tiny_text_encoder, shipped_vae, prediction="v")
    pipe.save_pretrained(tmp_path / "p", with_vae=False)
    images = pipe.generate(["a bag", "a coat"], num_inference_steps=3, seed=1)
    ours = TextToImagePipeline.from_pretrained(tmp_path / "p")
    theirs = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "p", trust_remote_code=True)
    assert type(ours.transformer) is UNet and ours.transformer.config == model.config
    for loaded in (ours, theirs):
        assert torch.equal(loaded.generate(["a bag", "a coat"], num_inference_steps=3, seed=1), images)
    model.unet.save_pretrained(tmp_path / "unet")
    plain = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    x, t = inputs()
    emb = text()
    with torch.no_grad():
        model.unet = plain
        assert torch.equal(model(x, t, emb), ours.transformer(x, t, emb))


def test_cli_trains_a_unet(tmp_path, monkeypatch):
    """`train --model unet --preset tiny` (a word encoder, for speed): the pipeline it writes loads through
    both loaders, which draw the same images."""
    import diffusers

    import tutorial_lib.data.latents
    from tutorial_lib.cli import main

    data = torch.randn(16, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(16) % 10

    class FakeCache:
        def tensors(self, split="train"):
            return data

    monkeypatch.setattr(tutorial_lib.data.latents, "latent_cache", lambda: FakeCache())
    out = tmp_path / "unet"
    main(["train", "--model", "unet", "--preset", "tiny", "--text-encoder", "word", "--steps", "3",
          "--batch-size", "8", "--warmup", "1", "--device", "cpu", "--out", str(out)])
    pipe = TextToImagePipeline.from_pretrained(out)
    assert type(pipe.transformer) is UNet and pipe.transformer.config == preset("tiny")
    assert TextToImagePipeline.training_info(out)["train_config"]["architecture"] == "unet"
    images = pipe.generate(["a bag"], num_inference_steps=2, seed=0)
    theirs = diffusers.DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    assert torch.isfinite(images).all()
    assert torch.equal(theirs.generate(["a bag"], num_inference_steps=2, seed=0), images)

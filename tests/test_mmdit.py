"""MMDiT / Flux blocks (notebook 07): the same function as diffusers' FluxTransformer2DModel, presets,
adaLN-Zero initialisation, the caption mask in joint attention, cost against FlopCounterMode, seeding,
save/load, bad input, and `train --model mmdit` through the CLI into both pipeline loaders. Tiny, CPU."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tutorial_lib.models.layers import apply_rope, rope_2d
from tutorial_lib.models.mmdit import (PRESETS, MMDiT, MMDiTConfig, _rope_order, flux_config, from_flux,
                                       from_flux_state_dict, mmdit_cost, preset)
from tests.denoisers import caption, check_caption_mask, check_round_trip, counted_flops, fit_losses, inputs, randomize
from tutorial_lib.text.base import TextEmbedding, masked_mean

TEXT_DIM = 16


def tiny(**overrides) -> MMDiTConfig:
    """The tiny preset's structure at width 32 (2 heads of 16), one block of each kind."""
    sizes = dict(hidden_size=32, num_heads=2, depth=1, depth_single_blocks=1, text_dim=TEXT_DIM)
    return preset("tiny", **{**sizes, **overrides})


def text(b: int = 2, length: int = 5, real=(3, 1), seed: int = 1) -> TextEmbedding:
    return caption(TEXT_DIM, b, length, real, seed)


# ----------------------------------------------------------------------------- diffusers' Flux
def flux_img_ids(h: int, w: int) -> torch.Tensor:
    """Flux's position ids of an h x w grid of image tokens: (0, row, column), [h * w, 3]."""
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(h * w, 3).float()


def flux_forward(flux, x: torch.Tensor, t: torch.Tensor, emb: TextEmbedding) -> torch.Tensor:
    """diffusers' Flux on our inputs, as its pipeline feeds it: 2 x 2 patches packed into tokens of (C, 2, 2),
    img_ids (0, row, col), txt_ids 0, our pooled vector (the masked mean of the caption tokens) as
    pooled_projections, and the caption mask over [text; image] as the attention mask. -> [B, C, H, W]."""
    b, c, height, width = x.shape
    h, w = height // 2, width // 2
    packed = x.view(b, c, h, 2, w, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w, 4 * c)  # [B, N, 4C]
    mask = torch.cat([emb.mask, torch.ones(b, h * w, dtype=torch.bool)], dim=1)  # [B, L + N]
    txt_ids = torch.zeros(emb.tokens.shape[1], 3)  # [L, 3]
    out = flux(packed, emb.tokens, masked_mean(emb), t, img_ids=flux_img_ids(h, w), txt_ids=txt_ids,
               joint_attention_kwargs={"attention_mask": mask}, return_dict=False)[0]  # [B, N, 4C]
    return out.view(b, h, w, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, height, width)


@pytest.fixture(scope="module")
def flux():
    """A tiny diffusers Flux (2 double-stream and 2 single-stream blocks, 2 heads of 16), every weight random."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return randomize(FluxTransformer2DModel(**flux_config(tiny(depth=2, depth_single_blocks=2))))


@pytest.mark.parametrize("size", [(8, 8), (8, 12)])
def test_the_same_function_as_diffusers_flux(flux, size):
    """The whole model against diffusers' FluxTransformer2DModel, weights copied by `from_flux`, on random
    latents, noise levels and captions with real padding. Measured max |diff| 2.9e-6 on outputs up to
    11 in size (float32 rounding: the two sum in different orders); tolerance atol = rtol = 1e-5. Without
    from_flux's reordering of q and k for RoPE the difference is 1.9.
    Flux's own inputs that ours lack are made from ours (`flux_forward`): its pooled vector is our
    masked mean, its mask ours; no guidance embedding on either side (flux_config)."""
    ours = from_flux(flux, input_size=size).eval()
    x, t = inputs(h=size[0], w=size[1])
    emb = text(length=6, real=(4, 1))
    with torch.no_grad():
        expected = flux_forward(flux, x, t, emb)
        out = ours(x, t, emb)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert expected.abs().max() > 1  # a real output, not both near 0


def test_rope_is_fluxs_on_reordered_channels():
    """diffusers' FluxPosEmbed + apply_rotary_emb (pairs (2i, 2i + 1), axes (0, d/2, d/2), ids (0, row, col))
    equal `layers.rope_2d` + `apply_rope` (pairs (i, i + d/2)) on channels reordered by `_rope_order`."""
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    hd, h, w = 16, 3, 5
    x = torch.randn(2, 2, h * w, hd, generator=torch.Generator().manual_seed(0))  # [B, H, N, d]
    theirs = apply_rotary_emb(x, FluxPosEmbed(10_000, [0, hd // 2, hd // 2])(flux_img_ids(h, w)), sequence_dim=2)
    order = _rope_order(hd)
    ours = apply_rope(x[..., order], *rope_2d(h, w, hd))
    torch.testing.assert_close(ours, theirs[..., order], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(ours, x[..., order])


def test_from_flux_refuses_what_it_cannot_compute(flux):
    from diffusers import FluxTransformer2DModel

    cfg = tiny()
    for change, match in ((dict(guidance_embeds=True), "guidance_embeds"),
                          (dict(axes_dims_rope=(4, 6, 6)), "axes_dims_rope"),
                          (dict(pooled_projection_dim=8), "pooled_projection_dim")):
        with pytest.raises(ValueError, match=match):
            from_flux(FluxTransformer2DModel(**{**flux_config(cfg), **change}))
    state = flux.state_dict()
    two = tiny(depth=2, depth_single_blocks=2)
    with pytest.raises(ValueError, match="no counterpart here: single_transformer_blocks.1"):
        from_flux_state_dict(state, tiny(depth=2))  # one single-stream block fewer than the weights
    del state["proj_out.bias"]
    with pytest.raises(ValueError, match="no proj_out.bias"):
        from_flux_state_dict(state, two)
    with pytest.raises(ValueError, match="patch_size 4"):
        flux_config(tiny(patch_size=4))


def test_flux1_preset_is_flux1_less_guidance_with_a_wider_pooled_vector():
    """FLUX.1 [dev]'s shape in diffusers (its defaults), built on the meta device: our FLUX.1 preset has
    exactly its parameters less the guidance embedder, plus (4096 - 768) x 3072 for a pooled vector as
    wide as T5's tokens instead of CLIP's."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        dev = FluxTransformer2DModel(guidance_embeds=True)
    theirs = sum(p.numel() for p in dev.parameters())
    guidance = sum(p.numel() for n, p in dev.named_parameters() if "guidance_embedder" in n)
    cost = mmdit_cost(preset("FLUX.1"))
    assert cost.params == theirs - guidance + (4096 - 768) * 3072
    assert 11.8e9 < cost.params < 12e9


# ----------------------------------------------------------------------------- presets and configs
def test_preset_names_and_copies():
    assert set(PRESETS) == {"tiny", "MMDiT-S/2", "MMDiT-B/2", "FLUX.1"}
    cfg = preset("MMDiT-S/2", text_dim=384)
    assert (cfg.hidden_size, cfg.num_heads, cfg.text_dim, PRESETS["MMDiT-S/2"].text_dim) == (384, 6, 384, 128)
    cfg.depth = 99
    assert PRESETS["MMDiT-S/2"].depth == 4
    with pytest.raises(ValueError, match=r"Unknown MMDiT preset 'MMDiT-M/2'; choose one of tiny, MMDiT-S/2"):
        preset("MMDiT-M/2")


def test_tiny_preset_is_the_tiny_dits_size():
    """About the tiny DiT's parameters and FLOPs per image (its 4 x 8 x 8 latents, patch 2, 16 caption tokens)."""
    from tutorial_lib.models import dit

    ours, theirs = mmdit_cost(preset("tiny")), dit.dit_cost(dit.preset("tiny"))
    assert preset("tiny").patch_size == 2 and preset("tiny").input_size == (8, 8)
    assert ours.params == pytest.approx(theirs.params, rel=0.01)
    assert ours.flops == pytest.approx(theirs.flops, rel=0.2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(hidden_size=30, num_heads=4), "whole head dimension divisible by 4"),
    (dict(hidden_size=40, num_heads=4), "whole head dimension divisible by 4"),
    (dict(input_size=(8, 6), patch_size=4), "divisible by patch_size"),
    (dict(depth=0, depth_single_blocks=0), "not both 0"),
    (dict(depth=-1), "depth >= 0"),
])
def test_bad_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MMDiTConfig(**kwargs)


@pytest.mark.parametrize("blocks", [(1, 0), (0, 1), (1, 2)])
@pytest.mark.parametrize("size", [(8, 8), (8, 12), (4, 2)])
def test_shapes(blocks, size):
    model = randomize(MMDiT(tiny(depth=blocks[0], depth_single_blocks=blocks[1])))
    x, t = inputs(h=size[0], w=size[1])
    with torch.no_grad():
        out = model(x, t, text())
    assert out.shape == x.shape and torch.isfinite(out).all()


# ----------------------------------------------------------------------------- adaLN-Zero
def test_zero_init_outputs_exact_zeros_and_every_block_is_the_identity():
    torch.manual_seed(0)
    model = MMDiT(tiny()).eval()
    x, t = inputs()
    emb = text()
    txt, img, c = torch.randn(2, 5, 32), torch.randn(2, 16, 32), torch.randn(2, 32)
    rope, mask = model.rope(5, 4, 4, "cpu"), torch.cat([emb.mask, torch.ones(2, 16, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        assert torch.equal(model(x, t, emb), torch.zeros_like(x))
        txt_out, img_out = model.double_blocks[0](txt, img, c, rope, mask)
        assert torch.equal(txt_out, txt) and torch.equal(img_out, img)
        tokens = torch.cat([txt, img], dim=1)
        assert torch.equal(model.single_blocks[0](tokens, c, rope, mask), tokens)
        randomize(model)
        assert model(x, t, emb).abs().min() > 0


def test_zero_init_model_learns():
    """Zero gates still pass gradients (to the final layer first), so a few steps fit a batch."""
    torch.manual_seed(0)
    model = MMDiT(tiny())
    losses = fit_losses(model, text(), 20, 1e-2)
    assert losses[-1] < 0.5 * losses[0]


def test_seeded_construction_is_deterministic():
    x, t = inputs()
    outs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        model = MMDiT(tiny())
        with torch.no_grad():  # perturb only the zero-initialised layers, keep the seeded ones
            for layer in (model.final_layer.linear, model.final_layer.adaLN_modulation[-1],
                          model.single_blocks[0].adaLN_modulation[-1], model.double_blocks[0].img.adaLN_modulation[-1],
                          model.double_blocks[0].txt.adaLN_modulation[-1]):
                layer.weight.fill_(0.05)
            outs.append(model.eval()(x, t, text()))
    assert torch.equal(outs[0], outs[1]) and not torch.allclose(outs[0], outs[2])


# ----------------------------------------------------------------------------- the caption mask
def test_padding_tokens_do_not_matter_but_the_mask_does():
    torch.manual_seed(0)
    check_caption_mask(randomize(MMDiT(tiny())), text(length=5, real=(3, 1)), text(seed=5))


# ----------------------------------------------------------------------------- cost
@pytest.mark.parametrize("overrides, size, text_len", [
    (dict(), (8, 8), 5),
    (dict(depth=2, depth_single_blocks=0), (8, 12), 7),
    (dict(patch_size=4, depth=0, depth_single_blocks=2, mlp_ratio=2.5), (16, 8), 3),
])
def test_mmdit_cost_matches_flop_counter(overrides, size, text_len):
    """Exact agreement, as dit_cost's (tests/test_dit.py): matrix multiplies and the patch convolution,
    2 FLOPs per multiply-add, no elementwise work; the math SDPA backend, whose bmm's are counted."""
    cfg = tiny(**overrides)
    model = MMDiT(cfg)
    cost = mmdit_cost(cfg, input_size=size, text_len=text_len)
    assert counted_flops(model, size, text_len) == cost.flops
    assert cost.params == cost.active_params == sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- training switches, save / load
def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = randomize(MMDiT(tiny())).train()
    x, t = inputs()
    grads = []
    for recompute in (False, True):
        model.gradient_checkpointing = recompute
        model.zero_grad()
        model(x, t, text()).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    cfg = tiny(input_size=[8, 12])
    assert cfg.input_size == (8, 12)  # lists (as JSON gives back) become tuples
    check_round_trip(randomize(MMDiT(cfg)), tmp_path / "mmdit.safetensors", "mmdit",
                     MMDiT(dataclasses.replace(cfg, depth=2)))


def test_runs_in_bfloat16():
    """Cast to bfloat16 (t stays float32): the output has the dtype and is close to float32's. Measured
    |diff| / |out| (L2) over 5 seeds on the CPU: 0.008-0.015; tolerance 0.04."""
    model = randomize(MMDiT(tiny()))
    x, t = inputs()
    emb = text()
    with torch.no_grad():
        expected = model(x, t, emb)
        out = model.to(torch.bfloat16)(x.bfloat16(), t, TextEmbedding(emb.tokens.bfloat16(), emb.mask))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert ((out.float() - expected).norm() / expected.norm()).item() < 0.04


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs():
    model = MMDiT(tiny())
    x, t = inputs()
    emb = text()
    with pytest.raises(ValueError, match=r"Expected text tokens \[B, L, 16\], got \(2, 5, 8\)"):
        model(x, t, TextEmbedding(torch.randn(2, 5, 8), emb.mask))  # captions of another encoder's width
    with pytest.raises(ValueError, match="Expected latents"):
        model(torch.randn(2, 3, 8, 8), t, emb)
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        model(torch.randn(2, 4, 7, 8), t, emb)
    with pytest.raises(ValueError, match="Batch sizes differ"):
        model(x, torch.rand(3), emb)
    with pytest.raises(ValueError, match="bool text mask"):
        model(x, t, TextEmbedding(emb.tokens, emb.mask.float()))


# ----------------------------------------------------------------------------- training and pipelines
def test_cli_trains_an_mmdit_that_both_loaders_sample(tmp_path, monkeypatch, shipped_vae):
    """`train --model mmdit --preset tiny --steps 3` through the Trainer; the saved pipeline loads in our
    loader and in diffusers' DiffusionPipeline, and both draw the same images."""
    import diffusers

    import tutorial_lib.data.latents
    from tutorial_lib.cli import main
    from tutorial_lib.pipeline import TextToImagePipeline

    class FakeCache:
        def tensors(self, split="train"):
            return torch.randn(16, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(16) % 10

    monkeypatch.setattr(tutorial_lib.data.latents, "latent_cache", lambda: FakeCache())
    out = tmp_path / "pipe"
    main(["train", "--model", "mmdit", "--preset", "tiny", "--steps", "3", "--batch-size", "8", "--warmup", "1",
          "--text-encoder", "word", "--out", str(out), "--device", "cpu"])
    pipe = TextToImagePipeline.from_pretrained(out)
    assert isinstance(pipe.transformer, MMDiT) and pipe.transformer.config == preset("tiny")
    assert TextToImagePipeline.training_info(out)["train_config"]["architecture"] == "mmdit"
    assert any(p.abs().sum() > 0 for p in pipe.transformer.final_layer.parameters())  # it trained
    images = pipe.generate(["a bag", "a coat"], num_inference_steps=2, seed=1)
    assert torch.isfinite(images).all()
    theirs = diffusers.DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    assert isinstance(theirs.transformer, MMDiT)
    assert torch.equal(theirs.generate(["a bag", "a coat"], num_inference_steps=2, seed=1), images)


def test_cli_mmdit_defaults_are_the_dits_recipe():
    from tutorial_lib.cli import _train_config, build_parser
    from tutorial_lib.train.text_to_image import TextToImageConfig

    parse = build_parser().parse_args
    cfg = _train_config(parse(["train", "--model", "mmdit", "--steps", "3"]))
    dit = _train_config(parse(["train", "--model", "dit", "--steps", "3"]))
    assert (cfg.architecture, cfg.model, cfg.text_encoder) == ("mmdit", preset("tiny"), dit.text_encoder)
    assert cfg.objective == dit.objective
    assert TextToImageConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="Unknown MMDiT preset 'DiT-S/2'"):
        _train_config(parse(["train", "--model", "mmdit", "--preset", "DiT-S/2"]))
    with pytest.raises(ValueError, match="configured by a MMDiTConfig, got a DiTConfig"):
        TextToImageConfig(architecture="mmdit")


def test_latents_of_another_vae_fit_the_mmdit_as_the_dit():
    """--data with another VAE: the CLI sets in_channels and input_size, and records refuses a mismatch."""
    from tutorial_lib.cli import _fit_latents
    from tutorial_lib.train.records import check_latent_shape
    from tutorial_lib.train.text_to_image import TextToImageConfig

    cfg = TextToImageConfig(model=preset("tiny"), architecture="mmdit", text_encoder="word")
    check_latent_shape(cfg, (4, 8, 8))
    with pytest.raises(ValueError, match="mmdit is configured for latents 4x8x8 .* set its in_channels and input_size"):
        check_latent_shape(cfg, (16, 16, 12))
    cfg.model = _fit_latents(cfg, (16, 16, 12))
    assert (cfg.model.in_channels, cfg.model.input_size) == (16, (16, 12))
    check_latent_shape(cfg, (16, 16, 12))

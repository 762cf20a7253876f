"""Patch masking (models/masking.py) in the DiT and its training (notebook 06): kept indices, taking and
restoring tokens, the loss mask, a masked DiT against the dense one, the patch-mixer, the masked
loss (EDM's too), bad input, position interpolation, and a masked MoE model through the pipeline's
save/load and a second training stage (init_from). Tiny widths, CPU."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.test_dit import inputs, randomize, text, tiny
from tests.test_text_to_image import assert_same_weights, config
from tutorial_lib.diffusion.losses import weighted_mse
from tutorial_lib.models.dit import DiT
from tutorial_lib.models.masking import keep_pixels, num_kept, random_keep, restore_tokens, take_tokens
from tutorial_lib.models.tiny_transformer import TinyTransformerConfig
from tutorial_lib.pipeline import TextToImagePipeline
from tutorial_lib.train.text_to_image import Objective, TextToImageConfig, build, diffusion_loss

GRID, P = (4, 4), 2  # test_dit's 8x8 latents at patch 2: 16 tokens


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def keep_all(b: int = 2, n: int = 16) -> torch.Tensor:
    return torch.arange(n).expand(b, n)


# ----------------------------------------------------------------------------- the helpers
@pytest.mark.parametrize("n, ratio, k", [(16, 0.0, 16), (16, 0.5, 8), (16, 0.75, 4), (16, 0.9, 2), (7, 0.5, 4),
                                         (4, 0.99, 1)])
def test_random_keep(n, ratio, k):
    """K = round(N (1 - r)), at least 1; sorted, distinct, in range, and the seed's."""
    keep = random_keep(3, n, ratio, seeded())
    assert num_kept(n, ratio) == k and keep.shape == (3, k) and keep.dtype == torch.long
    assert (keep.diff(dim=1) > 0).all() and keep.min() >= 0 and keep.max() < n
    assert torch.equal(keep, random_keep(3, n, ratio, seeded()))
    if 1 < k < n:
        assert not torch.equal(keep, random_keep(3, n, ratio, seeded(1)))
        assert len({tuple(row) for row in keep.tolist()}) > 1  # each item its own mask


def test_take_then_restore_puts_kept_tokens_back_and_zeros_elsewhere():
    x = torch.randn(3, 16, 5, generator=seeded())
    keep = random_keep(3, 16, 0.75, seeded(1))
    kept = torch.zeros(3, 16, dtype=torch.bool).scatter(1, keep, True)
    taken = take_tokens(x, keep)
    assert torch.equal(taken, torch.stack([x[i, keep[i]] for i in range(3)]))
    back = restore_tokens(taken, keep, 16)
    assert torch.equal(back, torch.where(kept[..., None], x, 0.0))


def test_keep_pixels_marks_the_kept_patches():
    """A 2 x 3 grid of 2 x 2 patches: patch 0 is rows 0-1, columns 0-1; patch 4 (row 1, column 1)
    is rows 2-3, columns 2-3."""
    expected = torch.tensor([[1, 1, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0, 0],
                             [0, 0, 1, 1, 0, 0],
                             [0, 0, 1, 1, 0, 0]], dtype=torch.float)
    mask = keep_pixels(torch.tensor([[0, 4], [5, 5]]), (2, 3), 2)
    assert mask.shape == (2, 1, 4, 6)
    assert torch.equal(mask[0, 0], expected)
    assert torch.equal(mask[1, 0], torch.zeros(4, 6).index_fill(0, torch.tensor([2, 3]), 1)
                       * torch.tensor([0, 0, 0, 0, 1, 1]))  # patch 5 (row 1, column 2), kept twice


# ----------------------------------------------------------------------------- the masked DiT
VARIANTS = {"plain": {}, "mixer": dict(mixer_depth=1), "rope": dict(pos_embed="rope"),
            "rope_mixer": dict(pos_embed="rope", mixer_depth=1),
            "moe_mixer": dict(mixer_depth=1, num_experts=4, capacity_factor=1.0)}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_keeping_every_token_is_the_dense_dit(variant):
    torch.manual_seed(0)
    model = randomize(DiT(tiny(**VARIANTS[variant])))
    x, t = inputs()
    with torch.no_grad():
        assert torch.equal(model(x, t, text(), keep=keep_all()), model(x, t, text()))
        masked = model(x, t, text(), keep=random_keep(2, 16, 0.5, seeded()))
    assert masked.shape == x.shape and torch.isfinite(masked).all()


@pytest.mark.parametrize("variant, mixes", [("plain", False), ("rope", False), ("mixer", True),
                                            ("rope_mixer", True), ("moe_mixer", True)])
def test_kept_outputs_see_the_masked_patches_only_through_the_mixer(variant, mixes):
    """Without a mixer the blocks see only the kept tokens; with one, every kept token has attended to
    all patches before masking."""
    torch.manual_seed(0)
    cfg = tiny(**VARIANTS[variant])
    model = randomize(DiT(cfg))
    x, t = inputs()
    keep = random_keep(2, 16, 0.75, seeded())
    kept = keep_pixels(keep, GRID, P)
    other = x + (1 - kept) * torch.randn(x.shape, generator=seeded(5))  # new masked patches only
    with torch.no_grad():
        a, b = model(x, t, text(), keep=keep), model(other, t, text(), keep=keep)
        if not cfg.mixer_depth:  # the same model without a mixer is the control
            assert torch.equal(a * kept, b * kept)
        else:
            assert ((a - b) * kept).abs().amax(dim=(1, 2, 3)).min() > 1e-3
            model.mixer = torch.nn.ModuleList()  # the blocks alone: blind to the masked patches
            assert torch.equal(model(x, t, text(), keep=keep) * kept, model(other, t, text(), keep=keep) * kept)


def test_weighted_mse_with_a_mask():
    """Each item's mean over its masked-in elements, then the (weighted) mean over items; the same
    count per item (keep_pixels) makes it the mean over all masked-in elements."""
    pred, target = torch.randn(2, 4, 8, 8, generator=seeded()), torch.randn(2, 4, 8, 8, generator=seeded(1))
    sq, weight = (pred - target).square(), torch.tensor([0.5, 2.0])
    kept = keep_pixels(random_keep(2, 16, 0.75, seeded()), GRID, P)
    torch.testing.assert_close(weighted_mse(pred, target, mask=kept), sq[kept.expand_as(sq).bool()].mean())
    uneven = torch.rand(2, 1, 8, 8, generator=seeded(2)) < torch.tensor([0.2, 0.8])[:, None, None, None]
    per_item = torch.stack([sq[i][uneven[i].expand_as(sq[i])].mean() for i in range(2)])
    torch.testing.assert_close(weighted_mse(pred, target, mask=uneven), per_item.mean())
    torch.testing.assert_close(weighted_mse(pred, target, weight, uneven), (weight * per_item).mean())
    ones = torch.ones(2, 1, 8, 8)
    torch.testing.assert_close(weighted_mse(pred, target, mask=ones), weighted_mse(pred, target))
    torch.testing.assert_close(weighted_mse(pred, target, weight, ones), weighted_mse(pred, target, weight))


@pytest.mark.parametrize("objective", [Objective(prediction="v", mask_ratio=0.75),
                                       Objective(prediction="edm", sigma_data=0.5, mask_ratio=0.75)])
def test_masked_loss_counts_the_kept_patches_only(objective):
    """Masked patches of the output may be anything: adding 100 there (a forward hook that reads the
    DiT's keep) leaves the loss as it was. The loss trains the mixer and the blocks."""
    torch.manual_seed(0)
    model = randomize(DiT(tiny("tiny-moe-mixer"))).train()
    x0, _ = inputs()

    def loss():
        return diffusion_loss(model, x0, text(), objective, seeded())[0]

    plain = loss()
    hook = model.register_forward_hook(
        lambda m, args, kwargs, out: out + 100 * (1 - keep_pixels(kwargs["keep"], GRID, P)), with_kwargs=True)
    spoiled = loss()
    hook.remove()
    assert torch.isfinite(plain) and torch.equal(plain, spoiled)
    plain.backward()
    for part in (model.mixer[0].attn, model.blocks[1].mlp.router, model.blocks[1].mlp.experts, model.x_embedder):
        grads = [p.grad for p in part.parameters()]
        assert all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    unmasked = diffusion_loss(model, x0, text(), dataclasses.replace(objective, mask_ratio=0.0), seeded())[0]
    assert unmasked != plain


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("ratio", [-0.1, 1.0])
def test_mask_ratio_outside_0_1_is_refused(ratio):
    for make in (lambda: Objective(mask_ratio=ratio), lambda: random_keep(2, 16, ratio)):
        with pytest.raises(ValueError, match=r"mask_ratio is the fraction of patches dropped, in \[0, 1\)"):
            make()


def test_masking_needs_the_dit():
    with pytest.raises(ValueError, match="Patch masking .* needs the DiT; the tiny_transformer has no patch-mixer"):
        TextToImageConfig(architecture="tiny_transformer", model=TinyTransformerConfig(),
                          objective=Objective(mask_ratio=0.5))


def test_keep_of_the_wrong_shape_is_refused():
    model = DiT(tiny()).eval()
    x, t = inputs()
    with torch.no_grad(), pytest.raises(ValueError, match=r"keep must hold \[B, K\] token indices for B = 2"):
        model(x, t, text(), keep=torch.arange(4))


@pytest.mark.parametrize("saved, ours, match", [
    (dict(mixer_depth=1), {}, "a DiT with a patch-mixer, and this one is without.*mixer_depth"),
    ({}, dict(mixer_depth=1), "a DiT without a patch-mixer, and this one is with.*mixer_depth"),
    (dict(num_experts=4, capacity_factor=1.0), {}, "a DiT with MoE layers, and this one is without.*num_experts"),
    ({}, dict(num_experts=4, capacity_factor=1.0), "a DiT without MoE layers, and this one is with.*num_experts"),
])
def test_weights_of_another_mixer_or_experts_are_refused(saved, ours, match):
    state = DiT(tiny(**saved)).state_dict()
    with pytest.raises(ValueError, match=match):
        DiT(tiny(**ours)).load_state_dict(state)


# ----------------------------------------------------------------------------- positions
@pytest.mark.parametrize("pos_embed", ["sincos", "rope"])
def test_position_interpolation_scales_to_the_config_grid(pos_embed):
    """At the config's 4x4 grid nothing changes. On an 8x8 grid the even rows and columns are the
    native table; on a 2x2 grid, the native table's even rows and columns. Without interpolation an
    8x8 grid extends the native one (its top-left 4x4)."""
    cfg = tiny(pos_embed=pos_embed)
    plain, scaled = DiT(cfg), DiT(dataclasses.replace(cfg, pos_interpolation=True))

    def table(model, h, w):  # [h, w, channels] per table: the sin-cos embedding, or RoPE's cos and sin
        pos = model.positions(h, w, "cpu")
        return [p.reshape(h, w, -1) for p in (pos if isinstance(pos, tuple) else (pos,))]

    native = table(plain, 4, 4)
    for ours, theirs in zip(table(scaled, 4, 4), native):
        assert torch.equal(ours, theirs)
    for ours, extended, theirs in zip(table(scaled, 8, 8), table(plain, 8, 8), native):
        assert torch.equal(ours[::2, ::2], theirs) and torch.equal(extended[:4, :4], theirs)
        assert not torch.equal(ours, extended)
    for ours, theirs in zip(table(scaled, 2, 2), native):
        assert torch.equal(ours, theirs[::2, ::2])
    x, t = inputs(h=16, w=16)
    with torch.no_grad():
        assert torch.isfinite(randomize(scaled)(x, t, text())).all()


# ----------------------------------------------------------------------------- pipeline and stages
def masked_moe_run(tmp_path, **overrides) -> TextToImageConfig:
    """test_text_to_image's tiny run with the tiny-moe-mixer DiT: 1 mixer block, 4 experts in block 1."""
    return dataclasses.replace(config(tmp_path, objective=Objective(prediction="v", mask_ratio=0.75)),
                               model=tiny("tiny-moe-mixer"), **overrides)


@pytest.fixture
def stage_one(tmp_path, shipped_vae):
    """A masked MoE model's pipeline, saved: (the pipeline, its folder, the trained model)."""
    model = randomize(build(masked_moe_run(tmp_path)))  # the DiT and the learned word encoder
    pipe = TextToImagePipeline(model.transformer, model.text_encoder, shipped_vae, prediction="v")
    pipe.save_pretrained(tmp_path / "stage1")
    return pipe, tmp_path / "stage1", model


def test_masked_moe_pipeline_round_trips_through_both_loaders(stage_one):
    from diffusers import DiffusionPipeline

    pipe, folder, _ = stage_one
    prompts = ["a bag", "an ankle boot"]
    expected = pipe.generate_latents(prompts, num_inference_steps=3, seed=3)
    assert torch.isfinite(expected).all()
    for loaded in (TextToImagePipeline.from_pretrained(folder),
                   DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)):
        assert type(loaded) is TextToImagePipeline and loaded.transformer.config == pipe.transformer.config
        assert_same_weights(loaded.transformer, pipe.transformer)
        assert torch.equal(loaded.generate_latents(prompts, num_inference_steps=3, seed=3), expected)


def test_second_stage_starts_from_the_saved_model(stage_one, tmp_path):
    """The unmasked fine-tune (mask_ratio 0) of the same config starts with the saved DiT and text
    encoder; a DiT of another config is refused, naming the field."""
    _, folder, trained = stage_one
    fine_tune = build(masked_moe_run(tmp_path, objective=Objective(prediction="v"), init_from=str(folder)))
    assert_same_weights(fine_tune.transformer, trained.transformer)
    assert_same_weights(fine_tune.text_encoder, trained.text_encoder)
    assert fine_tune.transformer.final_layer.linear.weight.abs().sum() > 0  # not adaLN-Zero's fresh start
    other = masked_moe_run(tmp_path, init_from=str(folder))
    other.model = dataclasses.replace(other.model, mixer_depth=2)
    with pytest.raises(ValueError, match=r"init_from .*another config.*'mixer_depth': \(1, 2\)"):
        build(other)


"""DiT (notebook 03): presets, adaLN-Zero initialisation, text masking, attention options, computed
cost against FlopCounterMode and against DiT's paper, save/load, half precision, torch.compile
without graph breaks, and bad input. Tiny widths, CPU."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tutorial_lib.models.dit import PRESETS, DiT, DiTConfig, dit_cost, preset
from tutorial_lib.models.layers import Attention, apply_rope, rope_2d
from tests.denoisers import caption, check_caption_mask, check_round_trip, counted_flops, fit_losses, inputs, randomize
from tutorial_lib.text.base import TextEmbedding

TEXT_DIM = 16


def tiny(name: str = "tiny", **overrides) -> DiTConfig:
    """A preset's structure (patch size, GQA, QK-norm, position embedding) at a tiny width."""
    cfg = PRESETS[name]
    kv = None if cfg.num_kv_heads is None else 1  # keep GQA where the preset has it (2 heads : 1)
    sizes = dict(hidden_size=32, depth=2, num_heads=2, num_kv_heads=kv, text_dim=TEXT_DIM)
    return preset(name, **{**sizes, **overrides})


def text(b: int = 2, length: int = 5, real=(2, 1), seed: int = 1) -> TextEmbedding:
    return caption(TEXT_DIM, b, length, real, seed)


# ----------------------------------------------------------------------------- presets
def test_preset_names_and_copies():
    sizes = ("S", "B", "L", "XL", "XXL")
    sparse = {"tiny-moe", "tiny-mixer", "tiny-moe-mixer"} | {f"MoE-DiT-{s}/2" for s in ("S", "B", "XL")}
    zoo = {"tiny-single", "tiny-integrator"}  # notebook 07 (tests/test_dit_options.py)
    guide = {"tiny-guide"}  # notebook 08's autoguidance guide
    assert set(PRESETS) == {"tiny"} | {f"DiT-{s}/{p}" for s in sizes for p in (1, 2, 4)} | sparse | zoo | guide
    assert [(PRESETS[f"DiT-{s}/2"].hidden_size, PRESETS[f"DiT-{s}/2"].depth, PRESETS[f"DiT-{s}/2"].num_heads)
            for s in sizes[:4]] == [(384, 12, 6), (768, 12, 12), (1024, 24, 16), (1152, 28, 16)]
    cfg = preset("DiT-S/4", text_dim=384)
    assert cfg.patch_size == 4 and cfg.text_dim == 384 and PRESETS["DiT-S/4"].text_dim == 128
    cfg.depth = 99
    assert PRESETS["DiT-S/4"].depth == 12
    with pytest.raises(ValueError, match=r"Unknown DiT preset 'DiT-M/2'.*tiny, DiT-S/1, .*DiT-XXL/4"):
        preset("DiT-M/2")


@pytest.mark.parametrize("kwargs, match", [
    (dict(hidden_size=30, num_heads=4), "not divisible by num_heads"),
    (dict(num_kv_heads=3), "multiple of num_kv_heads"),
    (dict(qk_norm="l2"), "Unknown qk_norm"),
    (dict(pos_embed="learned"), "Unknown pos_embed"),
    (dict(pos_embed="rope", hidden_size=24, num_heads=4), "divisible by 4"),
    (dict(input_size=(8, 6), patch_size=4), "divisible by patch_size"),
])
def test_bad_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DiTConfig(**kwargs)


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_keeps_shape(name):
    torch.manual_seed(0)
    model = randomize(DiT(tiny(name)))
    p = model.config.patch_size
    for h, w in ((8, 8), (8, 12), (4 * p, 2 * p)):  # Fashion-MNIST's 8x8, non-square, other sizes
        x, t = inputs(h=h, w=w)
        with torch.no_grad():
            out = model(x, t, text())
        assert out.shape == x.shape and torch.isfinite(out).all()


# ----------------------------------------------------------------------------- adaLN-Zero
VARIANTS = {
    "plain": {},
    "gqa": dict(num_heads=4, num_kv_heads=2),
    "qk_rms": dict(qk_norm="rms"),
    "qk_layer": dict(qk_norm="layer"),
    "rope": dict(pos_embed="rope"),
    "no_cross": dict(cross_attention=False),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_zero_init_outputs_exact_zeros(variant):
    torch.manual_seed(0)
    model = DiT(tiny(**VARIANTS[variant])).eval()
    x, t = inputs()
    with torch.no_grad():
        assert torch.equal(model(x, t, text()), torch.zeros_like(x))
        # Every block starts as the identity: all its gates and its cross-attention output are 0.
        tokens = torch.randn(2, 16, 32)
        c = torch.randn(2, 32)
        for block in model.blocks:
            assert torch.equal(block(tokens, c, text()), tokens)
        randomize(model)
        assert model(x, t, text()).abs().min() > 0


def test_cross_attention_is_zero_at_init_and_not_after():
    torch.manual_seed(0)
    model = DiT(tiny()).eval()
    tokens, emb = torch.randn(2, 16, 32), text()
    with torch.no_grad():
        for block in model.blocks:
            assert torch.equal(block.cross_attn(tokens, emb.tokens, emb.mask), torch.zeros_like(tokens))
        randomize(model)
        assert model.blocks[0].cross_attn(tokens, emb.tokens, emb.mask).abs().min() > 0


def test_zero_init_model_learns():
    """Zero gates still pass gradients (to the final layer first), so a few steps fit a batch."""
    torch.manual_seed(0)
    model = DiT(tiny())
    losses = fit_losses(model, text(), 40, 3e-3)
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("pos_embed", ["sincos", "rope"])
def test_training_after_sampling_in_inference_mode(pos_embed):
    """Position tables are cached on first use; one first made under inference_mode (sampling in
    a notebook) must not break a later training step."""
    model = randomize(DiT(tiny(pos_embed=pos_embed)))
    x, t = inputs()
    with torch.inference_mode():
        model(x, t, text())
    model(x, t, text()).sum().backward()
    assert model.x_embedder.weight.grad is not None


# ----------------------------------------------------------------------------- text conditioning
@pytest.mark.parametrize("variant", ["plain", "no_cross"])
def test_padding_tokens_do_not_matter_but_the_mask_does(variant):
    torch.manual_seed(0)
    check_caption_mask(randomize(DiT(tiny(**VARIANTS[variant]))), text(length=5, real=(2, 1)), text(seed=5))


# ----------------------------------------------------------------------------- attention options
def _same_weights_variant(variant: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs of the plain model and of `variant` carrying the plain model's weights."""
    torch.manual_seed(0)
    plain = randomize(DiT(tiny()))
    other = DiT(tiny(**VARIANTS[variant])).eval()
    missing, unexpected = other.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all("q_norm" in k or "k_norm" in k for k in missing)
    x, t = inputs()
    with torch.no_grad():
        return plain(x, t, text()), other(x, t, text())


@pytest.mark.parametrize("variant", ["qk_rms", "qk_layer", "rope"])
def test_qk_norm_and_rope_change_the_function(variant):
    a, b = _same_weights_variant(variant)
    assert torch.isfinite(b).all() and not torch.allclose(a, b, atol=1e-3)


def test_gqa_is_mha_with_shared_kv_heads():
    """GQA with 4 query heads and 2 KV heads = MHA whose K/V heads come in identical pairs."""
    torch.manual_seed(0)
    gqa = randomize(DiT(tiny(num_heads=4, num_kv_heads=2)))
    mha = DiT(tiny(num_heads=4)).eval()
    state = gqa.state_dict()
    for key, value in state.items():
        if ".kv." in key:  # [2 * kv_heads * head_dim, ...] -> [2 * heads * head_dim, ...]
            kv = value.view(2, 2, 8, *value.shape[1:]).repeat_interleave(2, dim=1)
            state[key] = kv.reshape(2 * 4 * 8, *value.shape[1:])
    mha.load_state_dict(state)
    x, t = inputs()
    with torch.no_grad():
        out = gqa(x, t, text())
        torch.testing.assert_close(mha(x, t, text()), out)
        assert not torch.allclose(randomize(DiT(tiny(num_heads=4)), seed=1)(x, t, text()), out)
    n_gqa, n_mha = (sum(p.numel() for p in m.parameters()) for m in (gqa, mha))
    assert n_gqa < n_mha


def test_attention_defaults_unchanged():
    """Notebook 01's shipped weights load into Attention: its defaults add no parameters."""
    keys = {"q.weight", "q.bias", "kv.weight", "kv.bias", "out.weight", "out.bias"}
    assert set(Attention(16, 2, context_dim=8).state_dict()) == keys
    assert Attention(16, 4, kv_heads=2).kv.out_features == 2 * 2 * 4
    assert set(Attention(16, 2, qk_norm="rms").state_dict()) == keys | {"q_norm.weight", "k_norm.weight"}
    with pytest.raises(ValueError, match="kv_heads"):
        Attention(16, 4, kv_heads=3)


def test_rope_2d_is_relative():
    """q_m . k_n after RoPE depends on the grid positions m, n only through their offset."""
    torch.manual_seed(0)
    cos, sin = rope_2d(6, 5, 16)  # [30, 16] each
    assert cos.shape == sin.shape == (30, 16)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(m, n):  # (row, col) positions
        i, j = m[0] * 5 + m[1], n[0] * 5 + n[1]
        return (apply_rope(q, cos[i], sin[i]) * apply_rope(k, cos[j], sin[j])).sum()

    torch.testing.assert_close(score((0, 0), (2, 3)), score((3, 1), (5, 4)))
    assert not torch.allclose(score((0, 0), (2, 3)), score((0, 0), (3, 2)))
    torch.testing.assert_close(apply_rope(q, cos[0], sin[0]), q)  # position (0, 0): no rotation


# ----------------------------------------------------------------------------- cost
@pytest.mark.parametrize("overrides, size, text_len", [
    (dict(patch_size=1), (8, 8), 5),
    (dict(patch_size=2), (8, 12), 7),
    (dict(patch_size=4), (16, 8), 3),
    (dict(num_heads=4, num_kv_heads=2, qk_norm="rms", pos_embed="rope"), (8, 8), 5),
    (dict(cross_attention=False, mlp_ratio=2.5), (8, 8), 5),
])
def test_dit_cost_matches_flop_counter(overrides, size, text_len):
    """Exact agreement (tolerance 0): both count matmul and convolution FLOPs, 2 per multiply-add,
    and neither counts elementwise work. The math SDPA backend decomposes attention into bmm's,
    which FlopCounterMode counts (the CPU flash kernel is not in its table)."""
    cfg = tiny(**overrides)
    model = DiT(cfg)
    cost = dit_cost(cfg, input_size=size, text_len=text_len)
    assert counted_flops(model, size, text_len) == cost.flops
    assert cost.params == sum(p.numel() for p in model.parameters())


def test_dit_cost_reproduces_the_paper():
    """DiT's Table 4 (Peebles & Xie, 2023) at 256x256 images (32x32x4 latents), class-conditional
    (no cross-attention): Gflops there are multiply-adds, so half our FLOPs. Within 0.5%; the rest
    is their 1000-class embedding and 8 output channels (learned variance) against our text MLP."""
    paper = {"S": (6.06, 33e6), "B": (23.01, 130e6), "L": (80.71, 458e6), "XL": (118.64, 675e6)}
    for size, (gmacs, params) in paper.items():
        cost = dit_cost(preset(f"DiT-{size}/2", cross_attention=False), input_size=32)
        assert cost.flops / 2e9 == pytest.approx(gmacs, rel=5e-3)
        assert cost.params == pytest.approx(params, rel=2e-2)
    default = dit_cost(preset("DiT-S/2"))  # the config's own 8x8 latents and 16 caption tokens
    assert default.flops == dit_cost(preset("DiT-S/2"), input_size=(8, 8), text_len=16).flops
    by_part = default.flops_by_part
    assert by_part["cross_attn_proj"] > 0 and set(by_part) >= {"self_attn_sdpa", "mlp", "adaLN"}


# ----------------------------------------------------------------------------- save / load
def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    cfg = tiny(num_heads=4, num_kv_heads=2, qk_norm="rms", pos_embed="rope", input_size=[8, 12])
    assert cfg.input_size == (8, 12)  # lists (as JSON gives back) become tuples
    check_round_trip(randomize(DiT(cfg)), tmp_path / "dit.safetensors", "dit",
                     DiT(dataclasses.replace(cfg, qk_norm="layer")), DiT(dataclasses.replace(cfg, depth=3)))


# ----------------------------------------------------------------------------- precision and compile
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_runs_in_half_precision(variant, dtype):
    """Cast to `dtype`, fed x and caption tokens in it (t stays float32, its sinusoids are computed in
    float32): the output has the dtype and is close to float32's. Measured on the CPU over these
    variants and 5 seeds, |diff| / |out| (L2) is 0.009-0.025 in bfloat16 and 0.001-0.0035 in
    float16; tolerance about 2.5x the largest."""
    gap = half_precision_gap(randomize(DiT(tiny(**VARIANTS[variant]))), *inputs(), text(), dtype)
    assert gap < {torch.bfloat16: 0.06, torch.float16: 0.01}[dtype], gap


def half_precision_gap(model, x, t, emb: TextEmbedding, dtype: torch.dtype) -> float:
    """|F - F_float32| / |F_float32| (L2) of `model` cast to `dtype` and fed x and the caption tokens in
    it (t stays float32), once its output is seen to have the dtype and be finite."""
    with torch.no_grad():
        expected = model(x, t, emb)
        out = model.to(dtype)(x.to(dtype), t, TextEmbedding(emb.tokens.to(dtype), emb.mask))
    assert out.dtype == dtype and torch.isfinite(out).all()
    return ((out.float() - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("variant", ["plain", "rope", "gqa"])
def test_compiles_to_one_graph(variant):
    """No host sync in forward (the mask is checked where it is made, `text.base.check_mask`):
    fullgraph=True raises on any graph break, and the compiled model matches the eager one."""
    model = randomize(DiT(tiny(**VARIANTS[variant])))
    x, t = inputs()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t, text()), model(x, t, text()))


def test_an_all_padding_caption_is_refused_where_masks_are_made(tmp_path, monkeypatch):
    """The DiT no longer looks at mask values; the encoders and the training caption table do."""
    from tutorial_lib.text import WordEncoder, WordEncoderConfig, clear_memory_cache
    from tutorial_lib.text.base import TextEncoder, check_mask
    from tutorial_lib.train.text_to_image import CaptionConditioned

    with pytest.raises(ValueError, match="at least one real token"):
        check_mask(torch.tensor([[True, False], [False, False]]))
    encoder = WordEncoder(WordEncoderConfig(dim=TEXT_DIM, heads=2))
    with pytest.raises(ValueError, match="at least one real token"):
        encoder(torch.zeros(2, 4, dtype=torch.long))  # token ids of <pad> alone

    class Blank(TextEncoder):  # a frozen encoder that gives "" no real token
        dim = TEXT_DIM

        def encode(self, prompt):
            prompts = list(prompt)
            mask = torch.tensor([[p != ""] * 3 for p in prompts])
            return TextEmbedding(torch.ones(len(prompts), 3, TEXT_DIM), mask)

    monkeypatch.setenv("TUTORIAL_DATA", str(tmp_path))
    clear_memory_cache()
    try:
        with pytest.raises(ValueError, match="at least one real token"):
            CaptionConditioned(DiT(tiny()), Blank(), ["a bag", "a coat"])
    finally:
        clear_memory_cache()


# ----------------------------------------------------------------------------- bad input
def _bad(b=2, c=4, h=8, w=8, t_batch=2, text_batch=2, **text_kw):
    x, _ = inputs(b=b, c=c, h=h, w=w)
    return x, torch.rand(t_batch), text(text_batch, **text_kw)


@pytest.mark.parametrize("args, match", [
    (_bad(c=3), "Expected latents"),
    (_bad(h=7), "not divisible by the patch size"),
    (_bad(t_batch=3), "Batch sizes differ"),
    (_bad(text_batch=1, real=(2,)), "Batch sizes differ"),
])
def test_bad_inputs(args, match):
    model = DiT(tiny())
    with pytest.raises(ValueError, match=match):
        model(*args)


def test_bad_input_shapes_and_types():
    model = DiT(tiny())
    x, t = inputs()
    emb = text()
    with pytest.raises(ValueError, match="Expected latents"):
        model(x[0], t, emb)
    with pytest.raises(ValueError, match="Batch sizes differ"):
        model(x, torch.tensor(0.5), emb)
    with pytest.raises(ValueError, match="text tokens"):
        model(x, t, TextEmbedding(torch.randn(2, 5, 8), emb.mask))
    with pytest.raises(ValueError, match="bool text mask"):
        model(x, t, TextEmbedding(emb.tokens, emb.mask.float()))
    with pytest.raises(ValueError, match="bool text mask"):
        model(x, t, TextEmbedding(emb.tokens, emb.mask[:, :3]))

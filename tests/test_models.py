"""Networks: the word-level text encoder, transformer layers, and the TinyTransformer denoiser."""

from __future__ import annotations

import pytest
import torch

from tutorial_lib.data.captions import all_training_captions, prompt_set
from tutorial_lib.models.layers import Attention, sincos_2d, timestep_embedding
from tutorial_lib.models.tiny_transformer import PRESETS, TinyTransformer, preset
from tutorial_lib.text.word_encoder import BOS, PAD, UNK, TextEmbedding, check_prompts, default_vocab, words


# ----------------------------------------------------------------------------- text encoder
def test_tokenize_shapes(tiny_text_encoder):
    ids = tiny_text_encoder.tokenize(["a photo of a bag", "sneakers", ""])
    assert ids.shape == (3, 12) and ids.dtype == torch.int64
    assert tiny_text_encoder.tokenize("a coat").shape == (1, 12)


def test_empty_prompt_is_only_bos(tiny_text_encoder):
    index = tiny_text_encoder.index
    ids = tiny_text_encoder.tokenize("")[0].tolist()
    assert ids == [index[BOS]] + [index[PAD]] * 11
    emb = tiny_text_encoder.encode("")
    assert emb.mask[0].tolist() == [True] + [False] * 11


def test_tokenize_words_and_unknowns(tiny_text_encoder):
    index = tiny_text_encoder.index
    ids = tiny_text_encoder.tokenize("A Photo of a ZEPPELIN!")[0].tolist()
    assert ids[:6] == [index[BOS], index["a"], index["photo"], index["of"], index["a"], index[UNK]]
    assert ids[6:] == [index[PAD]] * 6
    assert tiny_text_encoder.unknown_words("my favourite zeppelin") == ["my", "favourite", "zeppelin"]


def test_long_prompts_are_truncated(tiny_text_encoder):
    ids = tiny_text_encoder.tokenize(" ".join(["bag"] * 40))
    assert ids.shape == (1, 12) and (ids != tiny_text_encoder.index[PAD]).all()


def test_vocab_covers_training_captions_only():
    vocab = default_vocab()
    assert vocab[:3] == (PAD, BOS, UNK) and len(set(vocab)) == len(vocab)
    assert {w for c in all_training_captions() for w in words(c)} <= set(vocab)
    held_out_words = {w for p in prompt_set("held_out")[0] for w in words(p)}
    assert "favourite" in held_out_words and "favourite" not in vocab


def test_check_prompts():
    assert check_prompts("a bag") == ["a bag"]
    assert check_prompts(("a", "b")) == ["a", "b"]
    with pytest.raises(ValueError, match="empty"):
        check_prompts([])
    for bad in (3, None, ["a bag", 3], [b"a bag"], {"a bag"}):
        with pytest.raises(TypeError):
            check_prompts(bad)


def test_text_encoder_output(tiny_text_encoder):
    with torch.no_grad():
        emb = tiny_text_encoder.encode(["a photo of a bag", ""])
    assert isinstance(emb, TextEmbedding)
    assert emb.tokens.shape == (2, 12, 16) and emb.mask.shape == (2, 12) and emb.mask.dtype == torch.bool
    assert emb.mask.sum(1).tolist() == [6, 1]
    assert torch.isfinite(emb.tokens).all()


# ----------------------------------------------------------------------------- layers
def test_timestep_embedding_shape_and_values():
    t = torch.tensor([0.0, 0.25, 1.0])
    emb = timestep_embedding(t, 32)
    assert emb.shape == (3, 32)
    assert torch.equal(emb[0], torch.cat([torch.ones(16), torch.zeros(16)]))  # cos(0)=1, sin(0)=0
    assert not torch.allclose(emb[1], emb[2])
    assert emb.abs().max() <= 1.0


def test_sincos_2d_shape_and_values():
    pos = sincos_2d(4, 6, 16)
    assert pos.shape == (24, 16)
    assert pos.abs().max() <= 1.0
    assert len({tuple(r) for r in pos.round(decimals=5).tolist()}) == 24  # every position distinct
    # Row-major: the first w entries share a row, so their row half (first dim/2 channels) agrees.
    assert torch.allclose(pos[:6, :8], pos[0, :8].expand(6, 8))
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(2, 2, 10)


def test_attention_ignores_masked_context():
    torch.manual_seed(0)
    attn = Attention(16, 2, context_dim=8).eval()
    x, ctx = torch.randn(2, 5, 16), torch.randn(2, 3, 8)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    out = attn(x, ctx, mask)
    ctx2 = ctx.clone()
    ctx2[~mask] = 100.0  # whatever hides behind the mask changes nothing
    torch.testing.assert_close(attn(x, ctx2, mask), out)
    assert out.shape == (2, 5, 16)
    with pytest.raises(ValueError):
        Attention(10, 3)


# ----------------------------------------------------------------------------- TinyTransformer
def _text(encoder, n):
    return encoder.encode(["a photo of a bag"] * n)


def test_tiny_transformer_output_shape_equals_input(tiny_denoiser, tiny_text_encoder):
    x = torch.randn(3, 4, 8, 8)
    with torch.no_grad():
        out = tiny_denoiser(x, torch.rand(3), _text(tiny_text_encoder, 3))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_tiny_transformer_depends_on_time_and_text(tiny_denoiser, tiny_text_encoder):
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        a = tiny_denoiser(x, torch.full((2,), 0.3), tiny_text_encoder.encode(["a bag", "a coat"]))
        b = tiny_denoiser(x, torch.full((2,), 0.7), tiny_text_encoder.encode(["a bag", "a coat"]))
        c = tiny_denoiser(x, torch.full((2,), 0.3), tiny_text_encoder.encode(["a coat", "a bag"]))
    assert not torch.allclose(a, b) and not torch.allclose(a, c)


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (2, 4, 7, 8), (2, 4, 8, 7), (4, 8, 8), (2, 4, 16, 16)])
def test_tiny_transformer_rejects_wrong_latent_shape(tiny_denoiser, tiny_text_encoder, shape):
    with pytest.raises(ValueError, match="latents"):
        tiny_denoiser(torch.zeros(shape), torch.zeros(shape[0]), _text(tiny_text_encoder, shape[0]))


@pytest.mark.parametrize("t_batch, text_batch", [(3, 2), (2, 3), (1, 2), (2, 1)])
def test_tiny_transformer_rejects_mismatched_batch(tiny_denoiser, tiny_text_encoder, t_batch, text_batch):
    with pytest.raises(ValueError, match="Batch sizes"):
        tiny_denoiser(torch.zeros(2, 4, 8, 8), torch.zeros(t_batch), _text(tiny_text_encoder, text_batch))


def test_scalar_time_is_rejected(tiny_denoiser, tiny_text_encoder):
    with pytest.raises(ValueError):
        tiny_denoiser(torch.zeros(2, 4, 8, 8), torch.tensor(0.5), _text(tiny_text_encoder, 2))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tiny_transformer_runs_in_half_precision(tiny_denoiser, tiny_text_encoder, dtype):
    """Cast, fed x and caption tokens in `dtype` (t stays float32): the output has the dtype and is
    close to float32's. Measured on the CPU over 6 seeds, |diff| / |out| (L2) is 0.0044-0.0047 in
    bfloat16 and 0.0006-0.0007 in float16; tolerance about 3x."""
    from tests.test_dit import half_precision_gap

    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, generator=g)
    gap = half_precision_gap(tiny_denoiser, x, t, _text(tiny_text_encoder, 2), dtype)
    assert gap < {torch.bfloat16: 0.015, torch.float16: 0.002}[dtype], gap


def test_tiny_transformer_compiles_to_one_graph(tiny_denoiser, tiny_text_encoder):
    """No host sync in forward: fullgraph=True raises on any graph break."""
    g = torch.Generator().manual_seed(0)
    x, t, emb = torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, generator=g), _text(tiny_text_encoder, 2)
    compiled = torch.compile(tiny_denoiser, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t, emb), tiny_denoiser(x, t, emb))


def test_presets():
    for name in PRESETS:
        cfg = preset(name)
        assert cfg == PRESETS[name] and cfg is not PRESETS[name]
    cfg = preset("cpu")
    cfg.depth = 99  # a copy: the preset itself is unchanged
    assert PRESETS["cpu"].depth != 99
    with pytest.raises(ValueError, match="Unknown preset"):
        preset("huge")


def test_preset_builds_a_model():
    model = TinyTransformer(preset("cpu"))
    assert model.pos.shape == (64, 64)
    assert "pos" not in model.state_dict()  # a fixed buffer, recomputed, never saved

"""Inputs and checks shared by the denoiser tests (DiT, MMDiT, UNet: any forward(x, t, text))."""

from __future__ import annotations

import pytest
import torch

from tutorial_lib.text.base import TextEmbedding


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Perturb every parameter, so no layer is still zero (adaLN-Zero would hide everything)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return model.eval()


def caption(dim: int, b: int = 2, length: int = 5, real=(2, 1), seed: int = 1) -> TextEmbedding:
    """Random caption tokens [b, length, dim] whose first real[i] tokens are real, the rest padding."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.arange(length)[None] < torch.tensor(real)[:, None]  # [B, L]
    return TextEmbedding(torch.randn(b, length, dim, generator=gen), mask)


def inputs(b: int = 2, c: int = 4, h: int = 8, w: int = 8, seed: int = 2):
    """Random latents x [b, c, h, w] and noise levels t [b]."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, h, w, generator=gen), torch.rand(b, generator=gen)


def fit_losses(model: torch.nn.Module, text: TextEmbedding, steps: int, lr: float) -> list[float]:
    """The losses of `steps` Adam steps fitting the model's output on one batch to a random target."""
    x, t = inputs()
    target = torch.randn_like(x)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = (model(x, t, text) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def check_caption_mask(model: torch.nn.Module, emb: TextEmbedding, other: TextEmbedding):
    """What sits behind the caption mask, and how many padding positions there are, do not change the
    output; one more real token, or another caption, does."""
    x, t = inputs()
    real = int(emb.mask.sum(1).max())  # the longest caption's real tokens
    with torch.no_grad():
        out = model(x, t, emb)
        junk = emb.tokens.clone()
        junk[~emb.mask] = 100.0
        torch.testing.assert_close(model(x, t, TextEmbedding(junk, emb.mask)), out)
        torch.testing.assert_close(model(x, t, TextEmbedding(emb.tokens[:, :real], emb.mask[:, :real])), out)
        unmasked = emb.mask.clone()
        unmasked[:, real] = True
        assert not torch.allclose(model(x, t, TextEmbedding(emb.tokens, unmasked)), out)
        assert not torch.allclose(model(x, t, other), out)


def check_round_trip(model: torch.nn.Module, path, kind: str, *others: torch.nn.Module):
    """Saved as safetensors and loaded back, `model` (of a config with a rectangular 8 x 12 latent) has
    the same config and gives the same output; each model of `others` (another config) is refused."""
    from tutorial_lib.weights import WeightsError, load_into, load_model, save_weights

    cfg = model.config
    path = save_weights(model, path, kind=kind)
    loaded, _ = load_model(type(model), type(cfg), path, kind=kind)
    assert loaded.config == cfg
    x, t = inputs(w=12)
    text = caption(cfg.text_dim)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x, t, text), model.eval()(x, t, text))
    for other in others:
        with pytest.raises(WeightsError, match="another config"):
            load_into(other, path, kind=kind)


def counted_flops(model: torch.nn.Module, size: tuple[int, int], text_len: int) -> int:
    """Forward FLOPs of one image as FlopCounterMode counts them (2 per multiply-add, convolutions and
    matrix multiplies, no elementwise work), over a batch of 2 with the math SDPA backend, whose bmm's
    it counts (the CPU flash kernel is not in its table)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    x, t = inputs(b=2, h=size[0], w=size[1])
    emb = caption(model.config.text_dim, length=text_len, real=(text_len, 1))
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model.eval()(x, t, emb)
    return counter.get_total_flops() // 2  # per image

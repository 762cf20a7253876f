"""Notebook 03's exercises: the sinusoidal embedding of the noise level, adaLN-Zero's identity start, and
classifier-free guidance on data whose denoisers are exact (with a prediction)."""

from __future__ import annotations

import math

import torch

from ..diffusion.guidance import cfg_denoiser
from ..models.dit import DiT, DiTBlock, DiTConfig
from ..models.layers import timestep_embedding
from ..text import TextEmbedding
from . import exercise_check


def _timestep_reference(t: torch.Tensor, dim: int, scale: float = 1000.0, cos_first: bool = True) -> torch.Tensor:
    """Written out one entry at a time: channel i < dim/2 is cos(scale t w_i), channel dim/2 + i is
    sin(scale t w_i), w_i = 10000^(-i / (dim / 2)). scale and cos_first: mistakes the hints name."""
    half = dim // 2
    out = torch.empty(len(t), dim, dtype=torch.float64)
    for b, tb in enumerate(t.tolist()):
        for i in range(half):
            arg = scale * tb * 10_000.0 ** (-i / half)
            first, second = (math.cos(arg), math.sin(arg)) if cos_first else (math.sin(arg), math.cos(arg))
            out[b, i], out[b, half + i] = first, second
    return out


@exercise_check(refuses=[timestep_embedding])
def check_timestep_embedding(answer) -> str | None:
    """answer(t [B] in [0, 1], dim) -> [B, dim]: the DiT's sinusoidal embedding of the noise level."""
    g = torch.Generator().manual_seed(0)
    for n, dim in [(5, 8), (7, 32), (16, 256)]:
        t = torch.cat([torch.tensor([0.0, 1.0]), torch.rand(n - 2, generator=g)])
        want = _timestep_reference(t, dim)
        got = torch.as_tensor(answer(t.clone(), dim)).double()
        if got.shape != want.shape:
            return f"{n} levels, dim {dim}: expected shape {tuple(want.shape)}, got {tuple(got.shape)}."
        if torch.allclose(got, want, atol=1e-4):  # float32 arguments up to 1000: about 1e-4 in sin and cos
            continue
        if torch.allclose(got, _timestep_reference(t, dim, cos_first=False), atol=1e-4):
            return "the cosines come first: channels [cos(1000 t w_i) for every i, then sin(1000 t w_i)]."
        if torch.allclose(got, _timestep_reference(t, dim, scale=1.0), atol=1e-4):
            return ("the level is fed as 1000 t, the step index of a 1000-step DDPM (DiT's convention): with t in "
                    "[0, 1] alone every frequency but the first barely moves between t = 0 and 1.")
        return (f"{n} levels, dim {dim}: the values differ. At t = 0 the embedding is [1, ..., 1, 0, ..., 0]; check the "
                "frequencies, w_i = 10000^(-i / (dim / 2)) for i = 0 .. dim/2 - 1.")
    return None


def _small_block(seed: int) -> tuple[DiTBlock, torch.Tensor, torch.Tensor, TextEmbedding]:
    torch.manual_seed(seed)
    cfg = DiTConfig(hidden_size=32, depth=1, num_heads=4, text_dim=24)
    block = DiTBlock(cfg)
    for p in block.parameters():  # random weights everywhere: every path counts, gates included
        torch.nn.init.normal_(p, std=0.1)
    x, c = torch.randn(3, 9, 32), torch.randn(3, 32)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1, 2:] = False
    return block, x, c, TextEmbedding(torch.randn(3, 5, 24), mask)


@exercise_check(refuses=[(DiT, "initialize_weights")])
def check_adaln_zero(answer) -> str | None:
    """answer(block): set to zero, in place, the fewest layers of a DiTBlock with random weights that
    make it the identity for every input, leaving the attention and MLP weights as they are."""
    for seed in (0, 1):
        block, x, c, text = _small_block(seed)
        before = {name: p.detach().clone() for name, p in block.named_parameters()}
        with torch.no_grad():
            answer(block)
            out = block(x, c, text)
        changed = sorted({name.rsplit(".", 1)[0] for name, p in block.named_parameters()
                          if not torch.equal(p, before[name])})
        allowed = {"adaLN_modulation.1", "cross_attn.out"}
        touched = [name for name in changed if name not in allowed]
        if touched:
            return (f"you changed {', '.join(touched)}. A block with zero attention or MLP weights is the identity "
                    "too, but those layers then get no gradient and cannot start learning; zero only what "
                    "switches the branches off: the modulation's last linear (the gates) and what no gate covers.")
        if (out - x).abs().max() <= 1e-6:
            continue
        gate_rows = torch.cat([block.adaLN_modulation[1].weight[64:96], block.adaLN_modulation[1].weight[160:192]])
        if "adaLN_modulation.1" in changed and gate_rows.abs().max() == 0 and block.adaLN_modulation[1].bias.abs().max() > 0:
            return "the gates are alpha = W c + b: zeroing the modulation's weight leaves its bias as the gate; zero the bias too."
        if "cross_attn.out" not in changed:
            return ("the block is not yet the identity. Self-attention and MLP are gated by alpha, but the "
                    "cross-attention branch x + CrossAttn(LN(x), text) has no gate: zero its output projection "
                    "(cross_attn.out, weight and bias).")
        return ("the block is not yet the identity: both gated branches need alpha = 0, i.e. the modulation's "
                "last linear (adaLN_modulation[1], weight and bias) at zero.")
    return None


def _mixture_x0(x, alpha, sigma, means, s, c=None):
    """E[x0 | x_t] (c None) or E[x0 | x_t, class c] for x0 ~ sum_k N(means[k], s^2) / K, x_t = alpha x0 + sigma eps,
    written out with explicit sums (float64)."""
    var_t = alpha**2 * s**2 + sigma**2  # the variance of x_t given the class
    per_class = [m + alpha * s**2 / var_t * (x - alpha * m) for m in means.tolist()]
    if c is not None:
        return per_class[c]
    log_lik = [-(x - alpha * m) ** 2 / (2 * var_t) for m in means.tolist()]
    top = torch.stack(log_lik).max(0).values
    likes = [torch.exp(ll - top) for ll in log_lik]
    total = sum(likes)
    return sum(lk / total * e for lk, e in zip(likes, per_class))


@exercise_check(refuses=[cfg_denoiser])
def check_guided_mixture(answer, prediction=None) -> str | None:
    """answer(x_t [N], alpha, sigma, c, w, means [K], s) -> the guided x0 estimate [N] for class c, for data
    x0 ~ an equal mixture of N(means[k], s^2), x_t = alpha x0 + sigma eps. `prediction`: the learner's
    guess for the guided estimate at pure noise (alpha = 0, sigma = 1), means (-1, 1), class 1, w = 4.5."""
    g = torch.Generator().manual_seed(0)
    cases = [(torch.tensor([-1.0, 1.0]), 0.3, 1), (torch.tensor([-2.0, 0.5, 1.5]), 0.5, 2),
             (torch.tensor([-2.0, 0.5, 1.5]), 0.5, 0)]
    for means, s, c in cases:
        for alpha, sigma in [(0.0, 1.0), (0.3, 0.95), (0.8, 0.6), (0.99, 0.14)]:
            x = (alpha * means[torch.randint(len(means), (64,), generator=g)] + math.hypot(alpha * s, sigma)
                 * torch.randn(64, generator=g)).double()
            for w in (0.0, 1.0, 3.0, 4.5):
                cond = _mixture_x0(x, alpha, sigma, means.double(), s, c)
                uncond = _mixture_x0(x, alpha, sigma, means.double(), s)
                want = uncond + w * (cond - uncond)
                got = torch.as_tensor(answer(x.float(), alpha, sigma, c, w, means, s)).double()
                if got.shape != want.shape:
                    return f"expected shape {tuple(want.shape)}, got {tuple(got.shape)}."
                if torch.allclose(got, want, rtol=1e-5, atol=1e-5 * (1 + w)):
                    continue
                where = f"means {means.tolist()}, s = {s}, class {c}, alpha = {alpha}, sigma = {sigma}, w = {w:g}"
                if w == 1.0:
                    return (f"{where}: w = 1 must be the conditional estimate alone, "
                            "mean_c + alpha s² / (alpha² s² + sigma²) (x_t - alpha mean_c).")
                if w == 0.0:
                    return (f"{where}: w = 0 must be the unconditional estimate: each class's estimate weighted by "
                            "the posterior probability of the class given x_t (a softmax over k of "
                            "-(x_t - alpha mean_k)² / (2 (alpha² s² + sigma²))), not an equal average.")
                return f"{where}: guidance is uncond + w (cond - uncond); the values differ."
    measured = float(torch.as_tensor(answer(torch.zeros(1), 0.0, 1.0, 1, 4.5, torch.tensor([-1.0, 1.0]), 0.3)).item())
    print(f"At pure noise (alpha = 0), means (-1, 1), s = 0.3, class 1, w = 4.5: your prediction "
          f"{'(none given)' if prediction is None else prediction}, your function {measured:.3f}; "
          "class 1's data lie within 1 ± 0.9 (3 s).")
    return None

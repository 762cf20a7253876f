"""Notebook 01's exercises: ancestral sampling from the DDIM step, class accuracy against the guidance
scale (predicted, then measured), and the tiny transformer's 2D sin-cos position embedding."""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from ..data.captions import CLASS_PROMPTS
from ..diffusion.samplers import ddim_step, ddpm_step
from ..diffusion.schedules import COSINE
from ..eval.metrics import accuracy_from_logits, class_accuracy, evaluate_pipeline, per_class_accuracy
from ..models.layers import sincos_2d
from . import exercise_check

PAIRS = [(1.0, 0.8), (0.9, 0.6), (0.5, 0.45), (0.3, 0.05), (0.2, 0.0)]  # (t, s), s < t, the last step onto s = 0


@exercise_check(refuses=[ddim_step, ddpm_step])
def check_ancestral_step(answer) -> str | None:
    """answer(x_t, x0_hat, alpha_t, sigma_t, alpha_s, sigma_s, noise) -> x_s, DDIM with eta = 1: a draw
    from the posterior q(x_s | x_t, x0 = x0_hat), with `noise` the standard-normal draw it adds."""
    g = torch.Generator().manual_seed(0)
    x, x0_hat, z = torch.randn(3, 4, 4, 8, 8, generator=g)
    for t, s in PAIRS:
        (a_t, s_t), (a_s, s_s) = (COSINE.alpha_sigma(torch.tensor(v, dtype=torch.float64)) for v in (t, s))
        # the reference: Gaussian posterior of x_s given x_t and x0 (Ho et al., 2020, eqs. 6-7; Kingma et al., 2021)
        a, b, c, d = float(a_t), float(s_t), float(a_s), float(s_s)
        var_ts = b**2 - (a / c) ** 2 * d**2  # sigma_{t|s}^2
        mean = (a / c) * d**2 / b**2 * x.double() + c * var_ts / b**2 * x0_hat.double()
        std = math.sqrt(max(var_ts * d**2 / b**2, 0.0))
        got_mean = torch.as_tensor(answer(x, x0_hat, a_t, s_t, a_s, s_s, torch.zeros_like(z))).double()
        got = torch.as_tensor(answer(x, x0_hat, a_t, s_t, a_s, s_s, z)).double()
        if got.shape != x.shape:
            return f"expected x_s of shape {tuple(x.shape)}, got {tuple(got.shape)}."
        where = f"from t = {t} to s = {s}"
        if not torch.allclose(got_mean, mean, atol=1e-5, rtol=1e-5):
            ddim = c * x0_hat.double() + d * (x.double() - a * x0_hat.double()) / b
            if torch.allclose(got_mean, ddim, atol=1e-5, rtol=1e-5) and std > 1e-3:
                return (f"{where} the noise-free part is plain DDIM's: the fresh noise adds variance c^2, so the "
                        "predicted noise must shrink to sqrt(sigma_s^2 - c^2) eps_hat to keep the total at sigma_s^2.")
            return (f"{where} the step with noise = 0 differs from the posterior mean by "
                    f"{(got_mean - mean).abs().max().item():.2g}: x_s = alpha_s x0_hat + sqrt(sigma_s^2 - c^2) eps_hat + c noise.")
        got_std = ((got - got_mean) / z.double())[z.abs() > 0.1]
        if not torch.allclose(got_std, torch.full_like(got_std, std), atol=1e-4, rtol=1e-4):
            return (f"{where} the noise is scaled by {got_std.median().item():.4g}, the posterior's std is {std:.4g}: "
                    "c = sigma_{t|s} sigma_s / sigma_t with sigma_{t|s}^2 = sigma_t^2 - (alpha_t / alpha_s)^2 sigma_s^2.")
    return None


@lru_cache(maxsize=1)
def _shipped():
    from ..models.classifier import load_classifier
    from ..pipeline import TextToImagePipeline
    from ..vae.autoencoder import load_vae
    from ..weights import asset

    return TextToImagePipeline.from_pretrained(asset("tiny_t2i"), vae=load_vae()), load_classifier()


@torch.no_grad()
def _reference_accuracy(pipe, classifier, w, per_prompt, steps, seed) -> float:
    prompts = [p for p in CLASS_PROMPTS for _ in range(per_prompt)]
    labels = torch.arange(len(CLASS_PROMPTS)).repeat_interleave(per_prompt)
    images = pipe.generate(prompts, num_inference_steps=steps, guidance_scale=w, seed=seed)
    return (classifier(images).argmax(1) == labels).double().mean().item()


SCALES = (1.0, 3.0, 7.0)


@exercise_check(refuses=[class_accuracy, per_class_accuracy, accuracy_from_logits, evaluate_pipeline])
def check_accuracy_at_guidance(answer, my_prediction=None) -> str | None:
    """answer(pipe, classifier, w, per_prompt, steps, seed) -> the classifier's accuracy on
    `per_prompt` samples of each class prompt, generated in one seeded call at guidance scale w. Checked on
    the shipped model; then measured at w = 1, 3, 7 and printed next to `my_prediction`."""
    pipe, classifier = _shipped()
    for w in SCALES:
        want = _reference_accuracy(pipe, classifier, w, per_prompt=3, steps=8, seed=1)
        got = answer(pipe, classifier, w, per_prompt=3, steps=8, seed=1)
        try:
            got = float(got)
        except (TypeError, ValueError, RuntimeError):
            return f"return one number, the fraction of samples classified as their prompt's class; got {type(got).__name__}."
        if abs(got - want) > 1e-6:
            if abs(got - 100 * want) < 1e-4:
                return "return a fraction in [0, 1], not a percentage."
            return (f"at w = {w} (3 per prompt, 8 steps, seed 1) expected {want:.4f}, got {got:.4f}: generate all 30 "
                    "prompts in one call, [p for p in CLASS_PROMPTS for _ in range(per_prompt)], with "
                    "guidance_scale=w, num_inference_steps=steps and seed=seed, and compare the classifier's "
                    "argmax with the labels in the prompts' order (class k repeated per_prompt times).")
    n, steps = 10, 25
    measured = {w: float(answer(pipe, classifier, w, per_prompt=n, steps=steps, seed=0)) for w in SCALES}
    print(f"measured on the shipped model, {n} samples per class prompt ({10 * n} images), {steps} steps, seed 0 "
          f"(sampling noise: a binomial std of about {100 * math.sqrt(0.9 * 0.1 / (10 * n)):.0f} points at 90%):")
    prediction = my_prediction if isinstance(my_prediction, dict) else {}
    for w, acc in measured.items():
        guess = prediction.get(w, prediction.get(int(w)))
        print(f"  w = {w:g}  accuracy {100 * acc:5.1f}%   your prediction: " + ("none" if guess is None else f"{guess}"))
    return None


def _reference_sincos(h: int, w: int, dim: int) -> torch.Tensor:
    """[h * w, dim], written out one token at a time."""
    q = dim // 4
    out = torch.zeros(h * w, dim, dtype=torch.float64)
    for row in range(h):
        for col in range(w):
            for i in range(q):
                omega = 10_000 ** (-i / q)
                out[row * w + col, [i, q + i, 2 * q + i, 3 * q + i]] = torch.tensor(
                    [math.sin(row * omega), math.cos(row * omega), math.sin(col * omega), math.cos(col * omega)],
                    dtype=torch.float64)
    return out


@exercise_check(refuses=[sincos_2d])
def check_pos_embed_2d(answer) -> str | None:
    """answer(h, w, dim) -> [h * w, dim]: [sin(row w_i), cos(row w_i), sin(col w_i), cos(col w_i)],
    w_i = 10000^(-i / (dim / 4)), tokens in raster order (row by row)."""
    for h, w, dim in [(8, 8, 64), (4, 6, 16), (3, 5, 8)]:
        want = _reference_sincos(h, w, dim)
        got = torch.as_tensor(answer(h, w, dim)).double()
        if got.shape != want.shape:
            return f"for an {h} x {w} grid and dim {dim} expected shape {tuple(want.shape)}, got {tuple(got.shape)}."
        if torch.allclose(got, want, atol=1e-5):
            continue
        q = dim // 4
        swapped = torch.cat([want[:, 2 * q:], want[:, :2 * q]], dim=1)
        if torch.allclose(got, swapped, atol=1e-5):
            return "rows and columns are swapped: the first half of the channels encodes the token's row, the second half its column."
        transposed = want.view(h, w, dim).transpose(0, 1).reshape(-1, dim)
        if torch.allclose(got, transposed, atol=1e-5):
            return "the tokens are in column order: raster order is row by row, token index = row * w + col."
        if torch.allclose(got[:, 0], want[:, 0], atol=1e-5) and not torch.allclose(got[:, 1], want[:, 1], atol=1e-5):
            return "only the first frequency is right: w_i = 10000^(-i / (dim / 4)), with dim / 4 frequencies per sin or cos block."
        return (f"for an {h} x {w} grid and dim {dim} the embedding differs by {(got - want).abs().max().item():.2g}: "
                "the channels are [sin(row w_i), cos(row w_i), sin(col w_i), cos(col w_i)], all sines of a block, then all cosines.")
    return None

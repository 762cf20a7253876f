"""Notebook 02's exercises: the KL divergence between two diagonal Gaussians, PSNR, and the latent
scale factor (predicted for posterior samples, then measured)."""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from ..eval.reconstruction import psnr
from ..train.vae import measure_scale
from ..vae.autoencoder import AutoencoderKL, DiagonalGaussian, VAEConfig
from . import exercise_check


@exercise_check(refuses=[(DiagonalGaussian, "kl")])
def check_kl_diagonal(answer) -> str | None:
    """answer(mean_q, logvar_q, mean_p, logvar_p) -> KL(q || p) per sample [B], summed over the other
    dimensions, for diagonal Gaussians q = N(mean_q, exp(logvar_q)) and p = N(mean_p, exp(logvar_p))."""
    g = torch.Generator().manual_seed(0)
    shape = (3, 4, 8, 8)
    cases = {
        "against N(0, I)": (torch.randn(shape, generator=g), torch.randn(shape, generator=g), torch.zeros(shape), torch.zeros(shape)),
        "between two posteriors": tuple(torch.randn(shape, generator=g) for _ in range(4)),
        "with a narrow p": (torch.randn(shape, generator=g), torch.randn(shape, generator=g),
                            torch.randn(shape, generator=g), torch.full(shape, -3.0)),
    }
    for name, (m_q, lv_q, m_p, lv_p) in cases.items():
        q = torch.distributions.Normal(m_q.double(), (0.5 * lv_q.double()).exp())  # the reference: torch's own KL
        p = torch.distributions.Normal(m_p.double(), (0.5 * lv_p.double()).exp())
        want = torch.distributions.kl_divergence(q, p).sum(dim=(1, 2, 3))
        got = torch.as_tensor(answer(m_q, lv_q, m_p, lv_p)).double()
        if got.shape != want.shape:
            return f"{name}: expected one KL per sample, shape {tuple(want.shape)}, got {tuple(got.shape)}."
        if torch.allclose(got, want, rtol=1e-4, atol=1e-3):
            continue
        reverse = torch.distributions.kl_divergence(p, q).sum(dim=(1, 2, 3))
        if torch.allclose(got, reverse, rtol=1e-4, atol=1e-3):
            return (f"{name}: this is KL(p || q). KL is not symmetric: the expectation is over q, the first "
                    "argument, so the variances enter as log(var_p / var_q) + (var_q + (mean_q - mean_p)^2) / var_p - 1.")
        return (f"{name}: expected {want[0].item():.4f} for the first sample, got {got[0].item():.4f}: per element "
                "KL = 1/2 (logvar_p - logvar_q + (exp(logvar_q) + (mean_q - mean_p)^2) / exp(logvar_p) - 1), summed over C, H, W.")
    return None


@exercise_check(refuses=[psnr])
def check_psnr(answer) -> str | None:
    """answer(x, x_hat), images in [-1, 1] -> PSNR in dB measured on pixels in [0, 1] (as the course's)."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 32, 32, generator=g) * 2 - 1
    for noise in (0.01, 0.1, 0.5):
        x_hat = x + noise * torch.randn(x.shape, generator=g)  # not clamped: the reconstruction can overshoot
        mse = ((x.double() - x_hat.double().clamp(-1, 1)) / 2).pow(2).mean().item()  # the reference, on [0, 1]
        want, got = 10 * math.log10(1 / mse), float(answer(x, x_hat))
        if abs(got - want) > 1e-3:
            if abs(got - want + 20 * math.log10(2)) < 1e-3:
                return f"noise {noise}: expected {want:.3f} dB, got {got:.3f} (6.02 dB less): map to [0, 1] first, then 10 log10(1 / MSE)."
            unclamped = ((x.double() - x_hat.double()) / 2).pow(2).mean().item()
            if abs(got - 10 * math.log10(1 / unclamped)) < 1e-3:
                return f"noise {noise}: expected {want:.3f} dB, got {got:.3f}: clamp the reconstruction to [-1, 1] first, as images are displayed."
            return f"noise {noise}: expected {want:.3f} dB, got {got:.3f}: map to [0, 1] first, then 10 log10(1 / MSE)."
    return None


@lru_cache(maxsize=1)
def _random_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(VAEConfig(channels=(8, 16), latent_channels=4, norm_groups=4)).eval()


@lru_cache(maxsize=1)
def _shipped():
    from ..data.fashion_mnist import load_fashion_mnist, to_model_images
    from ..vae.autoencoder import load_vae

    return load_vae(), to_model_images(load_fashion_mnist("train")[0][:2000])


@exercise_check(refuses=[measure_scale])
def check_latent_scale(answer, my_prediction=None) -> str | None:
    """answer(vae, images, sample=False, generator=None) -> (scaling_factor, shift_factor) = (1 / std, mean)
    of the posterior means of `images` (sample=False) or of one posterior sample per image (sample=True).
    Checked on an untrained VAE; then measured both ways on the shipped VAE, next to `my_prediction`."""
    vae = _random_vae()
    images = torch.rand(256, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        posterior = vae.encode(images)
        mu, var = posterior.mean.double(), posterior.logvar.double().exp()
    got = answer(vae, images)
    if not (isinstance(got, (tuple, list)) and len(got) == 2):
        return "return two numbers, (scaling_factor, shift_factor)."
    scale, shift = float(got[0]), float(got[1])
    want_scale, want_shift = 1 / mu.std().item(), mu.mean().item()
    if abs(scale - want_scale) > 1e-4 * want_scale or abs(shift - want_shift) > 1e-4:
        if abs(scale - 1 / want_scale) < 1e-4 / want_scale:
            return "scaling_factor is 1 / std, the factor that brings the latents to unit variance, not the std itself."
        return (f"from the posterior means expected ({want_scale:.4f}, {want_shift:.4f}), got ({scale:.4f}, {shift:.4f}): "
                "one std and one mean over every element of the means of vae.encode(images).")
    got = answer(vae, images, sample=True, generator=torch.Generator().manual_seed(0))
    scale, shift = float(got[0]), float(got[1])
    # a sample z = mu + std * eps has E[z] = mu and E[z^2] = mu^2 + var: the std it should measure
    expected = 1 / math.sqrt((mu.pow(2) + var).mean().item() - mu.mean().item() ** 2)
    if abs(scale - want_scale) < 1e-4 * want_scale:
        return "sample=True gave the posterior means' factor: draw z = mean + exp(logvar / 2) * noise, one per element, with the generator."
    if abs(scale - expected) > 0.02 * expected:
        return (f"from posterior samples expected a scaling factor near {expected:.4f} (the std of mean + std * noise), "
                f"got {scale:.4f}: the noise is standard normal, scaled by exp(logvar / 2).")
    shipped, train_x = _shipped()
    means = answer(shipped, train_x)[0]
    samples = answer(shipped, train_x, sample=True, generator=torch.Generator().manual_seed(0))[0]
    print(f"shipped VAE, {len(train_x):,} training images: scaling_factor from the posterior means {float(means):.5f}, "
          f"from posterior samples {float(samples):.5f}; your prediction for the samples: {my_prediction}")
    return None

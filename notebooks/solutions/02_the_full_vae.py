"""Worked solutions to notebook 02's exercises (run through their checks by tests/test_exercises.py)."""

import torch


def kl_diagonal(mean_q, logvar_q, mean_p, logvar_p):
    per_element = 0.5 * (logvar_p - logvar_q + (logvar_q.exp() + (mean_q - mean_p) ** 2) / logvar_p.exp() - 1)
    return per_element.flatten(1).sum(dim=1)  # [B]


def psnr_from_scratch(x, x_hat):
    mse = ((x - x_hat.clamp(-1, 1)) / 2).pow(2).mean()  # on [0, 1] pixels: the range is 1
    return float(10 * torch.log10(1 / mse))


@torch.no_grad()
def latent_scale(vae, images, sample=False, generator=None):
    posterior = vae.encode(images)
    z = posterior.mean
    if sample:
        z = z + (0.5 * posterior.logvar).exp() * torch.randn(z.shape, generator=generator)
    return float(1 / z.std()), float(z.mean())

"""Notebook 02's exercises: the shortcut and a planted bug for each."""

import torch

from tutorial_lib.eval.reconstruction import psnr
from tutorial_lib.exercises import vae
from tutorial_lib.train.vae import measure_scale
from tutorial_lib.vae.autoencoder import DiagonalGaussian

from . import Exercise

NOTEBOOK = "02_the_full_vae"


def _library_kl(mean_q, logvar_q, mean_p, logvar_p):  # KL to N(0, I) only, and refused
    return DiagonalGaussian(torch.cat([mean_q - mean_p, logvar_q - logvar_p], dim=1)).kl()


def _reversed_kl(mean_q, logvar_q, mean_p, logvar_p):  # KL(p || q): the arguments' roles swapped
    per_element = 0.5 * (logvar_q - logvar_p + (logvar_p.exp() + (mean_q - mean_p) ** 2) / logvar_q.exp() - 1)
    return per_element.flatten(1).sum(dim=1)


def _psnr_on_minus_one_to_one(x, x_hat):  # MSE on [-1, 1] pixels with peak 1
    return float(10 * torch.log10(1 / (x - x_hat.clamp(-1, 1)).pow(2).mean()))


@torch.no_grad()
def _ignores_sample(vae, images, sample=False, generator=None):  # always the posterior means
    z = vae.encode(images).mean
    return float(1 / z.std()), float(z.mean())


EXERCISES = [
    Exercise(vae.check_kl_diagonal, "kl_diagonal", shortcut=_library_kl, bug=_reversed_kl, hint="KL is not symmetric"),
    Exercise(vae.check_psnr, "psnr_from_scratch", shortcut=lambda x, x_hat: psnr(x, x_hat),
             bug=_psnr_on_minus_one_to_one, hint="map to [0, 1] first"),
    Exercise(vae.check_latent_scale, "latent_scale",
             shortcut=lambda vae, images, sample=False, generator=None: measure_scale(vae, images),
             bug=_ignores_sample, hint="sample=True gave the posterior means' factor", predicts=True),
]

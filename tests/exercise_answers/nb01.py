"""Notebook 01's exercises: the shortcut and a planted bug for each."""

import torch

from tutorial_lib.data.captions import CLASS_PROMPTS
from tutorial_lib.diffusion.samplers import ddpm_step
from tutorial_lib.diffusion.schedules import COSINE
from tutorial_lib.eval.metrics import class_accuracy
from tutorial_lib.exercises import sampling
from tutorial_lib.models.layers import sincos_2d

from . import Exercise

NOTEBOOK = "01_fmnist_latents_tiny_transformer"


def _level(alpha, sigma):  # the cosine schedule's t of (alpha, sigma)
    return torch.atan2(torch.as_tensor(sigma), torch.as_tensor(alpha)) * 2 / torch.pi


def _library_step(x_t, x0_hat, alpha_t, sigma_t, alpha_s, sigma_s, noise):
    return ddpm_step(x_t, x0_hat, _level(alpha_t, sigma_t), _level(alpha_s, sigma_s), COSINE)


def _ddim_plus_noise(x_t, x0_hat, alpha_t, sigma_t, alpha_s, sigma_s, noise):  # keeps all of sigma_s on eps_hat
    eps_hat = (x_t - alpha_t * x0_hat) / sigma_t
    c = ((sigma_t**2 - (alpha_t / alpha_s) ** 2 * sigma_s**2) * sigma_s**2 / sigma_t**2).clamp(min=0).sqrt()
    return alpha_s * x0_hat + sigma_s * eps_hat + c * noise


def _library_accuracy(pipe, classifier, w, per_prompt, steps, seed):
    prompts = [p for p in CLASS_PROMPTS for _ in range(per_prompt)]
    images = pipe.generate(prompts, num_inference_steps=steps, guidance_scale=w, seed=seed)
    return class_accuracy(classifier, images, torch.arange(10).repeat_interleave(per_prompt))


@torch.no_grad()
def _interleaved_labels(pipe, classifier, w, per_prompt, steps, seed):  # labels 0, 1, ..., 9, 0, 1, ...
    prompts = [p for p in CLASS_PROMPTS for _ in range(per_prompt)]
    images = pipe.generate(prompts, num_inference_steps=steps, guidance_scale=w, seed=seed)
    return (classifier(images).argmax(1) == torch.arange(len(prompts)) % 10).float().mean().item()


def _rows_and_columns_swapped(h, w, dim):
    q = dim // 4
    omega = 10_000 ** (-torch.arange(q, dtype=torch.float64) / q)
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    y, x = rows.reshape(-1, 1) * omega, cols.reshape(-1, 1) * omega
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)


EXERCISES = [
    Exercise(sampling.check_ancestral_step, "ancestral_step", shortcut=_library_step, bug=_ddim_plus_noise,
             hint="sqrt(sigma_s^2 - c^2)"),
    Exercise(sampling.check_accuracy_at_guidance, "accuracy_at_guidance", shortcut=_library_accuracy,
             bug=_interleaved_labels, hint="labels in the prompts' order", predicts=True),
    Exercise(sampling.check_pos_embed_2d, "pos_embed_2d", shortcut=lambda h, w, dim: sincos_2d(h, w, dim),
             bug=_rows_and_columns_swapped, hint="first half of the channels encodes the token's row"),
]

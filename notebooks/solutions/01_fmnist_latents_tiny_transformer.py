"""Worked solutions to notebook 01's exercises (run through their checks by tests/test_exercises.py)."""

import torch

from tutorial_lib.data.captions import CLASS_PROMPTS


def ancestral_step(x_t, x0_hat, alpha_t, sigma_t, alpha_s, sigma_s, noise):
    eps_hat = (x_t - alpha_t * x0_hat) / sigma_t  # the noise the prediction implies
    var_ts = sigma_t**2 - (alpha_t / alpha_s) ** 2 * sigma_s**2  # sigma_{t|s}^2, the variance added from s to t
    c = (var_ts * sigma_s**2 / sigma_t**2).clamp(min=0).sqrt()  # eta = 1: the posterior's std
    return alpha_s * x0_hat + (sigma_s**2 - c**2).clamp(min=0).sqrt() * eps_hat + c * noise


@torch.no_grad()
def accuracy_at_guidance(pipe, classifier, w, per_prompt, steps, seed):
    prompts = [p for p in CLASS_PROMPTS for _ in range(per_prompt)]
    labels = torch.arange(len(CLASS_PROMPTS)).repeat_interleave(per_prompt)  # class k, per_prompt times
    images = pipe.generate(prompts, num_inference_steps=steps, guidance_scale=w, seed=seed)
    return (classifier(images).argmax(dim=1) == labels).float().mean().item()


def pos_embed_2d(h, w, dim):
    q = dim // 4
    omega = 10_000 ** (-torch.arange(q, dtype=torch.float64) / q)  # [dim / 4] frequencies
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")  # [h, w] each
    y, x = rows.reshape(-1, 1) * omega, cols.reshape(-1, 1) * omega  # [h * w, dim / 4], raster order
    return torch.cat([y.sin(), y.cos(), x.sin(), x.cos()], dim=1).float()

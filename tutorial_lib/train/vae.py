"""Train the KL autoencoder: `python -m tutorial_lib train-vae`.

Each step updates the VAE on the loss of `vae/losses.py`, then (once the adversarial term is on)
the patch discriminator on its hinge loss, in alternation as in VQGAN (Esser et al., 2021).
After training, `measure_scale` sets `scaling_factor = 1 / std(z)` and `shift_factor = mean(z)`
over training latents, so the diffusion model sees unit-variance data.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..data.fashion_mnist import load_fashion_mnist, to_model_images
from ..models.classifier import load_classifier
from ..vae.autoencoder import AutoencoderKL, VAEConfig
from ..vae.losses import (PatchDiscriminator, PerceptualLoss, VAELossConfig, adaptive_weight,
                          generator_loss, hinge_d_loss, kl_loss, reconstruction_loss)
from ..weights import load_model
from .common import infinite_batches, seed_everything, warmup_cosine


@dataclass
class VAETrainConfig:
    steps: int = 6000
    batch_size: int = 128
    lr: float = 1e-3
    disc_lr: float = 2e-4
    seed: int = 0
    model: VAEConfig = field(default_factory=VAEConfig)
    loss: VAELossConfig = field(default_factory=VAELossConfig)
    init: str | None = None  # start from these weights; their config replaces `model`
    scale_images: int = 10_000  # training images on which the scale factors are measured


@torch.no_grad()
def measure_scale(vae: AutoencoderKL, images: torch.Tensor) -> tuple[float, float]:
    """(scaling_factor, shift_factor) = (1 / std, mean) of the posterior means of `images`."""
    vae.eval()
    device = next(vae.parameters()).device
    z = torch.cat([vae.encode(c.to(device)).mode().cpu() for c in images.split(500)])
    return float(1.0 / z.std()), float(z.mean())


def _build(cfg: VAETrainConfig) -> AutoencoderKL:
    if cfg.init is None:
        return AutoencoderKL(cfg.model)
    return load_model(AutoencoderKL, VAEConfig, cfg.init, "vae")[0]


def train_vae(cfg: VAETrainConfig | None = None, device: str = "cpu", images: torch.Tensor | None = None,
              log_every: int = 50) -> tuple[AutoencoderKL, list[dict]]:
    """Train on `images` ([N, C, H, W] in [-1, 1]; Fashion-MNIST train by default).

    Returns the VAE (CPU, eval mode, scale factors measured) and the loss terms every `log_every`
    steps as a list of dicts."""
    cfg = cfg or VAETrainConfig()
    loss_cfg = cfg.loss
    gen = seed_everything(cfg.seed)
    if images is None:
        images = to_model_images(load_fashion_mnist("train")[0])
    images = images.to(device)
    vae = _build(cfg).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, cfg.steps, cfg.steps // 50))
    perceptual = None
    if loss_cfg.perceptual_weight:
        classifier = load_classifier()
        if vae.config.in_channels != classifier.config.in_channels:
            raise ValueError("The perceptual loss uses the grayscale Fashion-MNIST classifier; "
                             "set perceptual_weight=0 for other channel counts.")
        perceptual = PerceptualLoss(copy.deepcopy(classifier.body)).to(device)
    disc = PatchDiscriminator(vae.config.in_channels).to(device) if loss_cfg.disc_weight else None
    opt_d = torch.optim.AdamW(disc.parameters(), lr=cfg.disc_lr, betas=(0.5, 0.9)) if disc else None
    last_layer = vae.decoder.conv_out.weight
    batches = infinite_batches(len(images), cfg.batch_size, gen)
    history = []
    bar = tqdm(range(cfg.steps), desc="vae")
    for step in bar:
        vae.train()
        x = images[next(batches).to(device)]
        x_hat, posterior = vae(x)
        terms = {"rec": reconstruction_loss(x, x_hat, loss_cfg.reconstruction), "kl": kl_loss(posterior, x)}
        nll = terms["rec"]
        if perceptual is not None:
            terms["perceptual"] = perceptual(x, x_hat)
            nll = nll + loss_cfg.perceptual_weight * terms["perceptual"]
        loss = nll + loss_cfg.kl_weight * terms["kl"]
        adversarial = disc is not None and step >= loss_cfg.disc_start
        if adversarial:
            disc.requires_grad_(False)
            terms["gan"] = generator_loss(disc(x_hat))
            terms["lambda"] = adaptive_weight(nll, terms["gan"], last_layer)
            loss = loss + terms["lambda"] * loss_cfg.disc_weight * terms["gan"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if adversarial:
            disc.requires_grad_(True)
            terms["disc"] = hinge_d_loss(disc(x), disc(x_hat.detach()))
            opt_d.zero_grad(set_to_none=True)
            terms["disc"].backward()
            opt_d.step()
        if step % log_every == 0 or step == cfg.steps - 1:
            history.append({"step": step, **{k: v.item() for k, v in terms.items()}})
            bar.set_postfix(rec=f"{history[-1]['rec']:.4f}", kl=f"{history[-1]['kl']:.3f}")
    vae.config.scaling_factor, vae.config.shift_factor = measure_scale(vae, images[:cfg.scale_images])
    return vae.cpu().eval(), history

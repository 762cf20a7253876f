"""Train the KL autoencoder: `python -m tutorial_lib train-vae`.

Loss per batch (Rombach et al., 2022, without the adversarial term):
    L = mean |x - x_hat| + kl_weight * KL(q(z|x) || N(0, I)) / (number of pixels)
After training, `measure_scale` sets `scaling_factor = 1 / std(z)` and `shift_factor = mean(z)`
over training latents, so the diffusion model sees unit-variance data.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..data.fashion_mnist import load_fashion_mnist, to_model_images
from ..vae.autoencoder import AutoencoderKL, VAEConfig
from .common import infinite_batches, seed_everything, warmup_cosine


def psnr(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB for images in [-1, 1], measured on pixels in [0, 1]."""
    mse = ((x - x_hat.clamp(-1, 1)) / 2).pow(2).mean()
    return float(-10 * torch.log10(mse))


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Decode the posterior mean: the reconstruction a latent diffusion model can reach."""
    vae.eval()
    device = next(vae.parameters()).device
    return torch.cat([vae.decode(vae.encode(c.to(device)).mode()).clamp(-1, 1).cpu()
                      for c in images.split(batch_size)])


@torch.no_grad()
def measure_scale(vae: AutoencoderKL, images: torch.Tensor) -> tuple[float, float]:
    """(scaling_factor, shift_factor) = (1 / std, mean) of the posterior means of `images`."""
    vae.eval()
    device = next(vae.parameters()).device
    z = torch.cat([vae.encode(c.to(device)).mode().cpu() for c in images.split(500)])
    return float(1.0 / z.std()), float(z.mean())


def train_vae(steps: int = 6000, batch_size: int = 128, lr: float = 1e-3, kl_weight: float = 1e-3,
              seed: int = 0, device: str = "cpu", config: VAEConfig | None = None):
    """Returns (vae with measured scale factors, test PSNR in dB)."""
    gen = seed_everything(seed)
    train_x = to_model_images(load_fashion_mnist("train")[0]).to(device)
    test_x = to_model_images(load_fashion_mnist("test")[0])
    vae = AutoencoderKL(config).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, steps, steps // 50))
    n_pixels = train_x[0].numel()
    batches = infinite_batches(len(train_x), batch_size, gen)
    bar = tqdm(range(steps), desc="vae")
    for step in bar:
        vae.train()
        x = train_x[next(batches).to(device)]
        x_hat, posterior = vae(x)
        rec = (x - x_hat).abs().mean()
        kl = posterior.kl().mean() / n_pixels
        loss = rec + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(l1=f"{rec.item():.4f}", kl=f"{kl.item():.3f}")
    vae.config.scaling_factor, vae.config.shift_factor = measure_scale(vae, train_x[:10_000])
    vae = vae.cpu().eval()
    return vae, psnr(test_x, reconstruct(vae, test_x))

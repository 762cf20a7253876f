"""The VAE's training loss, term by term (Rombach et al., 2022, following Esser et al., 2021, VQGAN):

    L_VAE = L_rec + kl_weight * L_KL + perceptual_weight * L_perc + lambda * disc_weight * L_G
    L_D   = hinge loss of a patch discriminator (trained in alternation with the VAE)

- L_rec: per-pixel L1 or L2 between x and its reconstruction x_hat.
- L_KL: KL(q(z|x) || N(0, I)) per latent element, averaged over pixels; a small weight keeps the
  latent near a standard normal without blurring the reconstructions.
- L_perc: distance between feature maps of x and x_hat in a frozen network, LPIPS-style (Zhang et
  al., 2018, without the learned channel weights). Offline we have no VGG, so the network is the
  course's own Fashion-MNIST classifier.
- L_G: the generator's side of a patch GAN (Isola et al., 2017): the discriminator scores
  overlapping patches as real or reconstructed, which pushes towards sharp texture rather than the
  blurry mean that L_rec alone prefers. lambda balances the gradients at the decoder's last layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class VAELossConfig:
    reconstruction: str = "l1"  # "l1" or "l2"
    kl_weight: float = 1e-3
    perceptual_weight: float = 0.0
    disc_weight: float = 0.0  # 0 switches the discriminator off
    disc_start: int = 0  # step at which the adversarial term begins

    def __post_init__(self):
        if self.reconstruction not in ("l1", "l2"):
            raise ValueError(f"reconstruction must be 'l1' or 'l2', got {self.reconstruction!r}.")


def reconstruction_loss(x: torch.Tensor, x_hat: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """mean |x - x_hat| (L1) or mean (x - x_hat)^2 (L2)."""
    return (x - x_hat).abs().mean() if kind == "l1" else (x - x_hat).pow(2).mean()


def kl_loss(posterior, x: torch.Tensor) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) summed over latent elements, averaged over the batch and divided by the
    number of values in one image x, so its scale does not change with image or latent size."""
    return posterior.kl().mean() / x[0].numel()


class PerceptualLoss(nn.Module):
    """sum_l mean_{h,w} |phi_l(x) / |phi_l(x)| - phi_l(x_hat) / |phi_l(x_hat)||^2

    over the stages l of a frozen feature network, features normalised to unit length along
    channels at every position (LPIPS with equal channel weights). `stages` is an `nn.Sequential`,
    e.g. the classifier's `body`; its parameters are frozen and it runs in eval mode.
    """

    def __init__(self, stages: nn.Sequential):
        super().__init__()
        self.stages = stages.eval().requires_grad_(False)

    def train(self, mode: bool = True):  # stays in eval mode: frozen BatchNorm statistics
        return super().train(False)

    def forward(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        loss, a, b = x.new_zeros(()), x, x_hat
        for stage in self.stages:
            a, b = stage(a), stage(b)
            loss = loss + (F.normalize(a, dim=1) - F.normalize(b, dim=1)).pow(2).sum(1).mean()
        return loss


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al., 2017): strided convolutions down to a map of logits, one per
    overlapping patch. With n_down = 2, a 32x32 input gives 8x8 logits, each seeing a 26x26 patch."""

    def __init__(self, in_channels: int = 1, width: int = 32, n_down: int = 2):
        super().__init__()
        layers, c = [nn.Conv2d(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2)], width
        for _ in range(n_down - 1):
            layers += [nn.Conv2d(c, 2 * c, 4, 2, 1), nn.GroupNorm(8, 2 * c), nn.LeakyReLU(0.2)]
            c *= 2
        layers += [nn.Conv2d(c, c, 3, 1, 1), nn.GroupNorm(8, c), nn.LeakyReLU(0.2), nn.Conv2d(c, 1, 3, 1, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):  # [B, C, H, W] -> [B, 1, H / 2^n_down, W / 2^n_down] logits
        return self.net(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """L_D = 1/2 (mean relu(1 - D(x)) + mean relu(1 + D(x_hat))) (Lim & Ye, 2017)."""
    return 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())


def generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """L_G = -mean D(x_hat): the autoencoder's side of the hinge GAN."""
    return -logits_fake.mean()


def adaptive_weight(l_rec: torch.Tensor, l_gan: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """lambda = |grad_w L_rec| / (|grad_w L_G| + 1e-4) at the decoder's last weight w, clamped to
    [0, 1e4] and detached (Esser et al., 2021, eq. 7): the adversarial gradient is kept on the
    scale of the reconstruction gradient whatever their losses' magnitudes."""
    g_rec = torch.autograd.grad(l_rec, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(l_gan, last_layer, retain_graph=True)[0]
    return (g_rec.norm() / (g_gan.norm() + 1e-4)).clamp(0.0, 1e4).detach()

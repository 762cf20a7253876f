"""A KL-regularised convolutional autoencoder (Kingma & Welling, 2014; Rombach et al., 2022, LDM).

The encoder maps x [B, C, H, W] to a diagonal Gaussian posterior q(z|x) = N(mu, diag(sigma^2)) over
z [B, latent_channels, H/f, W/f], f = 2^(levels - 1). The decoder maps z back to x. The diffusion
model works on scaled latents z_s = (z - shift_factor) * scaling_factor, where the factors are
measured on data after training so that z_s has unit variance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class VAEConfig:
    in_channels: int = 1
    channels: tuple[int, ...] = (16, 32, 64)  # width per level; f = 2 ** (len - 1)
    num_res_blocks: int = 1
    latent_channels: int = 4
    mid_attention: bool = True
    scaling_factor: float = 1.0
    shift_factor: float = 0.0

    def __post_init__(self):
        self.channels = tuple(self.channels)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channels) - 1)


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, c // 4) if c >= 8 else 1, c)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, twice, plus a (projected) skip connection."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = _norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over the H*W positions of a feature map, with a residual."""

    def __init__(self, c: int):
        super().__init__()
        self.norm, self.qkv, self.proj = _norm(c), nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, HW, C]
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class MidBlock(nn.Module):
    def __init__(self, c: int, attention: bool):
        super().__init__()
        self.res1, self.res2 = ResBlock(c, c), ResBlock(c, c)
        self.attn = SpatialSelfAttention(c) if attention else nn.Identity()

    def forward(self, x):
        return self.res2(self.attn(self.res1(x)))


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch = cfg.channels
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.levels = nn.ModuleList()
        c = ch[0]
        for i, c_out in enumerate(ch):
            blocks = [ResBlock(c if j == 0 else c_out, c_out) for j in range(cfg.num_res_blocks)]
            c = c_out
            down = nn.Conv2d(c, c, 3, stride=2, padding=1) if i < len(ch) - 1 else nn.Identity()
            self.levels.append(nn.Sequential(*blocks, down))
        self.mid = MidBlock(c, cfg.mid_attention)
        self.norm_out = _norm(c)
        self.conv_out = nn.Conv2d(c, 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x):  # [B, C, H, W] -> [B, 2 * latent, H/f, W/f]
        h = self.conv_in(x)
        for level in self.levels:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch = cfg.channels[::-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid = MidBlock(ch[0], cfg.mid_attention)
        self.levels = nn.ModuleList()
        c = ch[0]
        for i, c_out in enumerate(ch):
            blocks = [ResBlock(c if j == 0 else c_out, c_out) for j in range(cfg.num_res_blocks + 1)]
            c = c_out
            up = (nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest"),
                                nn.Conv2d(c, c, 3, padding=1)) if i < len(ch) - 1 else nn.Identity())
            self.levels.append(nn.Sequential(*blocks, up))
        self.norm_out = _norm(c)
        self.conv_out = nn.Conv2d(c, cfg.in_channels, 3, padding=1)

    def forward(self, z):  # [B, latent, h, w] -> [B, C, h*f, w*f]
        h = self.mid(self.conv_in(z))
        for level in self.levels:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussian:
    """q(z|x) = N(mean, exp(logvar)); logvar is clamped to [-30, 20] for numerical safety."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device,
                            dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) = 1/2 sum(mu^2 + sigma^2 - 1 - log sigma^2), per sample: [B]."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class AutoencoderKL(nn.Module):
    def __init__(self, config: VAEConfig | None = None):
        super().__init__()
        self.config = config or VAEConfig()
        self.encoder, self.decoder = Encoder(self.config), Decoder(self.config)

    def _check(self, x: torch.Tensor, channels: int, what: str):
        f = self.config.downsample_factor if what == "image" else 1
        if x.ndim != 4 or x.shape[1] != channels or x.shape[-1] % f or x.shape[-2] % f:
            raise ValueError(f"Expected an {what} batch [B, {channels}, H, W] with H and W divisible "
                             f"by {f}; got {tuple(x.shape)}.")

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        self._check(x, self.config.in_channels, "image")
        return DiagonalGaussian(self.encoder(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        self._check(z, self.config.latent_channels, "latent")
        return self.decoder(z)

    def forward(self, x, generator=None):
        posterior = self.encode(x)
        return self.decode(posterior.sample(generator)), posterior

    # The diffusion model's view: unit-variance latents.
    def scale(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def unscale(self, z_s: torch.Tensor) -> torch.Tensor:
        return z_s / self.config.scaling_factor + self.config.shift_factor

    @torch.no_grad()
    def encode_to_latents(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> scaled posterior means, the diffusion model's data."""
        return self.scale(self.encode(x).mode())

    @torch.no_grad()
    def decode_latents(self, z_s: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [-1, 1]."""
        return self.decode(self.unscale(z_s)).clamp(-1, 1)


def load_vae(path=None) -> AutoencoderKL:
    """The shipped VAE (or the one at `path`), in eval mode."""
    from ..weights import asset, load_model

    model, _ = load_model(AutoencoderKL, VAEConfig, path or asset("vae.safetensors"), "vae")
    return model.eval()

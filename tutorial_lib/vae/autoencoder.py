"""A KL-regularised convolutional autoencoder (Kingma & Welling, 2014; Rombach et al., 2022, LDM).

The encoder maps x [B, C, H, W] to a diagonal Gaussian posterior q(z|x) = N(mu, diag(sigma^2)) over
z [B, latent_channels, H/f, W/f], f = 2^(levels - 1). The decoder maps z back to x. The diffusion
model works on scaled latents z_s = (z - shift_factor) * scaling_factor, where the factors are
measured on data after training so that z_s has unit variance.

The architecture is LDM's, block for block, so that `vae/diffusers_interop.py` converts weights to
and from `diffusers.AutoencoderKL` exactly: ResNet blocks with GroupNorm (eps 1e-6) and SiLU,
down-sampling by a stride-2 convolution after padding one pixel on the right and bottom, nearest
up-sampling followed by a convolution, and a mid-block ResNet -> self-attention -> ResNet.

Precision: a VAE whose config sets `force_upcast` (diffusers' flag; SDXL's VAE overflows in float16
and decodes to NaN or black) encodes and decodes in float32 even when its weights are float16 or
bfloat16 (`upcast`), as diffusers' SDXL pipelines do; the flag is a precision policy, not part of
what the network computes, so it is left out of `weights.weights_hash`.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

NORM_EPS = 1e-6


@dataclass
class VAEConfig:
    in_channels: int = 1  # 1 for grayscale, 3 for RGB
    channels: tuple[int, ...] = (16, 32, 64)  # width per level; f = 2 ** (len - 1)
    num_res_blocks: int = 1  # per encoder level; the decoder has one more
    latent_channels: int = 4
    mid_attention: bool = True
    norm_groups: int = 8  # GroupNorm groups everywhere; must divide every width
    quant_conv: bool = False  # 1x1 convolutions around the latent, as in LDM and Stable Diffusion
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    force_upcast: bool = field(default=False, metadata={"hashed": False})  # encode/decode in float32 (see above)

    def __post_init__(self):
        self.channels = tuple(self.channels)
        bad = [c for c in self.channels if c % self.norm_groups]
        if not self.channels or bad or self.num_res_blocks < 1 or self.latent_channels < 1:
            raise ValueError(f"Invalid VAEConfig: every width in channels={self.channels} must be "
                             f"divisible by norm_groups={self.norm_groups}, with num_res_blocks >= 1 "
                             f"and latent_channels >= 1.")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channels) - 1)


def _norm(cfg: VAEConfig, c: int) -> nn.GroupNorm:
    return nn.GroupNorm(cfg.norm_groups, c, eps=NORM_EPS)


class ResBlock(nn.Module):
    """x + conv(SiLU(GN(conv(SiLU(GN(x)))))), with a 1x1 projection of x when widths differ."""

    def __init__(self, cfg: VAEConfig, c_in: int, c_out: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cfg, c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = _norm(cfg, c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Downsample(nn.Module):
    """Halve H and W: pad right and bottom by one, then a 3x3 convolution with stride 2."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x):  # [B, C, H, W] -> [B, C, H/2, W/2]
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour repeat, then a 3x3 convolution."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):  # [B, C, H, W] -> [B, C, 2H, 2W]
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over the H*W positions of a feature map, with a residual:
    x + out(softmax(q k^T / sqrt(C)) v), q, k, v = linear maps of GN(x) per position."""

    def __init__(self, cfg: VAEConfig, c: int):
        super().__init__()
        self.norm = _norm(cfg, c)
        self.q, self.k, self.v, self.out = (nn.Linear(c, c) for _ in range(4))

    def forward(self, x):
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # [B, C, H, W] -> [B, HW, C]
        attended = F.scaled_dot_product_attention(self.q(tokens), self.k(tokens), self.v(tokens))
        return x + self.out(attended).transpose(1, 2).reshape(b, c, h, w)


class MidBlock(nn.Module):
    def __init__(self, cfg: VAEConfig, c: int):
        super().__init__()
        self.res1, self.res2 = ResBlock(cfg, c, c), ResBlock(cfg, c, c)
        self.attn = SpatialSelfAttention(cfg, c) if cfg.mid_attention else nn.Identity()

    def forward(self, x):
        return self.res2(self.attn(self.res1(x)))


class Level(nn.Module):
    """ResNet blocks at one resolution, then an optional change of resolution."""

    def __init__(self, cfg: VAEConfig, c_in: int, c_out: int, n_blocks: int, resample: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList(ResBlock(cfg, c_in if j == 0 else c_out, c_out) for j in range(n_blocks))
        self.resample = resample

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x if self.resample is None else self.resample(x)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch = cfg.channels
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.levels = nn.ModuleList(
            Level(cfg, ch[max(i - 1, 0)], c, cfg.num_res_blocks, Downsample(c) if i < len(ch) - 1 else None)
            for i, c in enumerate(ch))
        self.mid = MidBlock(cfg, ch[-1])
        self.norm_out = _norm(cfg, ch[-1])
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x):  # [B, C, H, W] -> [B, 2 * latent, H/f, W/f] (mean and log-variance)
        h = self.conv_in(x)
        for level in self.levels:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch = cfg.channels[::-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid = MidBlock(cfg, ch[0])
        self.levels = nn.ModuleList(
            Level(cfg, ch[max(i - 1, 0)], c, cfg.num_res_blocks + 1, Upsample(c) if i < len(ch) - 1 else None)
            for i, c in enumerate(ch))
        self.norm_out = _norm(cfg, ch[-1])
        self.conv_out = nn.Conv2d(ch[-1], cfg.in_channels, 3, padding=1)

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


HALF = (torch.float16, torch.bfloat16)


@contextmanager
def upcast(vae):
    """Run `vae` (ours or a diffusers.AutoencoderKL) in float32 within the block if its config sets
    force_upcast and its weights are half precision, then cast it back; yields whether it did.
    diffusers' SDXL pipelines do the same around their VAE calls (`upcast_vae`)."""
    dtype = next(vae.parameters()).dtype
    if not (getattr(vae.config, "force_upcast", False) and dtype in HALF):
        yield False
        return
    vae.to(torch.float32)
    try:
        yield True
    finally:
        vae.to(dtype)


class AutoencoderKL(nn.Module):
    def __init__(self, config: VAEConfig | None = None):
        super().__init__()
        self.config = config or VAEConfig()
        self.encoder, self.decoder = Encoder(self.config), Decoder(self.config)
        moments, latent = 2 * self.config.latent_channels, self.config.latent_channels
        self.quant_conv = nn.Conv2d(moments, moments, 1) if self.config.quant_conv else nn.Identity()
        self.post_quant_conv = nn.Conv2d(latent, latent, 1) if self.config.quant_conv else nn.Identity()

    def _check(self, x: torch.Tensor, channels: int, what: str):
        f = self.config.downsample_factor if what == "image" else 1
        if x.ndim != 4 or x.shape[1] != channels or x.shape[-1] % f or x.shape[-2] % f:
            raise ValueError(f"Expected an {what} batch [B, {channels}, H, W] with H and W divisible "
                             f"by {f}; got {tuple(x.shape)}.")

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        self._check(x, self.config.in_channels, "image")
        with upcast(self) as upcasting:
            return DiagonalGaussian(self.quant_conv(self.encoder(x.float() if upcasting else x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        self._check(z, self.config.latent_channels, "latent")
        with upcast(self) as upcasting:
            return self.decoder(self.post_quant_conv(z.float() if upcasting else z))

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

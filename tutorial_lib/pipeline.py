"""Prompt(s) -> images: text encoder -> guided sampler over the denoiser -> VAE decoder."""

from __future__ import annotations

from pathlib import Path

import torch

from .diffusion.guidance import cfg_denoiser
from .diffusion.samplers import sample_ddim
from .diffusion.schedules import time_grid
from .models.tiny_transformer import TinyTransformer, TinyTransformerConfig
from .text.word_encoder import TextEmbedding, WordEncoder, WordEncoderConfig, check_prompts
from .vae.autoencoder import AutoencoderKL, load_vae
from .weights import WeightsError, load_model, save_weights, weights_hash


def _concat(a: TextEmbedding, b: TextEmbedding) -> TextEmbedding:
    return TextEmbedding(torch.cat([a.tokens, b.tokens]), torch.cat([a.mask, b.mask]))


class TextToImagePipeline:
    def __init__(self, denoiser: TinyTransformer, text_encoder: WordEncoder, vae: AutoencoderKL | None = None):
        self.denoiser, self.text_encoder = denoiser, text_encoder
        self.vae = vae if vae is not None else load_vae()

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def to(self, device):
        for m in (self.denoiser, self.text_encoder, self.vae):
            m.to(device)
        return self

    @torch.no_grad()
    def generate_latents(self, prompt, num_inference_steps: int = 25, guidance_scale: float = 3.0,
                         seed: int | None = 0, generator: torch.Generator | None = None,
                         callback=None) -> torch.Tensor:
        """Scaled latents [B, C, h, w] for prompt(s); the same seed gives the same latents."""
        prompts = check_prompts(prompt)
        if generator is None:
            generator = torch.Generator().manual_seed(0 if seed is None else seed)
        for m in (self.denoiser, self.text_encoder, self.vae):
            m.eval()  # condition dropout and any other training behaviour off
        cfg = self.denoiser.config
        noise = torch.randn(len(prompts), cfg.latent_channels, cfg.latent_size, cfg.latent_size,
                            generator=generator).to(self.device)
        cond = self.text_encoder.encode(prompts)
        null = self.text_encoder.encode([""] * len(prompts))  # exactly what training dropped to
        guided = cfg_denoiser(self.denoiser, guidance_scale, _concat)
        return sample_ddim(guided, noise, time_grid(num_inference_steps), (cond, null), callback)

    @torch.no_grad()
    def generate(self, prompt, **kwargs) -> torch.Tensor:
        """Images [B, 1, 32, 32] in [-1, 1] for prompt(s); keyword arguments as `generate_latents`."""
        return self.vae.decode_latents(self.generate_latents(prompt, **kwargs)).cpu()

    def __call__(self, prompt, **kwargs):
        """PIL images for prompt(s)."""
        from .viz import to_pil

        return [to_pil(img) for img in self.generate(prompt, **kwargs)]

    def save(self, directory: str | Path, extra: dict | None = None) -> Path:
        directory = Path(directory)
        meta = {"vae_hash": weights_hash(self.vae), **(extra or {})}
        save_weights(self.denoiser, directory / "denoiser.safetensors", "tiny_transformer", meta)
        save_weights(self.text_encoder, directory / "text_encoder.safetensors", "word_encoder")
        return directory

    @classmethod
    def load(cls, directory: str | Path, vae: AutoencoderKL | None = None) -> "TextToImagePipeline":
        directory = Path(directory)
        vae = vae if vae is not None else load_vae()
        denoiser, extra = load_model(TinyTransformer, TinyTransformerConfig,
                                     directory / "denoiser.safetensors", "tiny_transformer")
        if extra.get("vae_hash") != weights_hash(vae):
            raise WeightsError(f"{directory}: this denoiser was trained on latents of VAE "
                               f"{extra.get('vae_hash')}, but the VAE given is {weights_hash(vae)}; "
                               "retrain it on the current VAE's latents.")
        text_encoder, _ = load_model(WordEncoder, WordEncoderConfig,
                                     directory / "text_encoder.safetensors", "word_encoder")
        return cls(denoiser.eval(), text_encoder.eval(), vae)

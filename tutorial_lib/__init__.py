"""Latent text-to-image diffusion, built from scratch: the library behind the course notebooks."""

__version__ = "0.1.0"

"""What the Trainer reads to train on any image–caption data: latent shards joined with captions.

A record is one image's VAE posterior N(mean, std^2) (data/shards.py, encoded once) and its caption,
as a frozen encoder's cached embedding (text/embedding_cache.py) or, for a learned encoder, as the
string. `TextToImageRecords.__getitems__(indices)` returns one whole batch, read lazily from the
memory-mapped shards, so the Trainer's DataLoader workers read only the rows each rank needs:

    {"mean": [B, C, h, w], "std": [B, C, h, w]}         scaled latents: z_s = (z - shift) * scale
    + {"tokens": [B, L, D], "mask": [B, L]}             a frozen encoder's embeddings, or
    + {"caption": [B str]}                              the captions, for a learned encoder

`record_loss_fn` turns such a batch into the diffusion loss: x0 = mean (or a posterior sample
mean + std * n, with `posterior`), captions dropped to the null condition with probability
cond_drop (Ho & Salimans, 2022), then `text_to_image.diffusion_loss`.
"""

from __future__ import annotations

import torch

from ..text.base import NULL_PROMPT, TextEmbedding, TextEncoder, full_mask, padding_mask
from ..text.embedding_cache import CaptionEmbeddingCache
from .text_to_image import (Objective, TextToImageConfig, build, diffusion_loss, fit_text_to_image,
                            measure_sigma_data_into)
from .trainer import Trainer


class TextToImageRecords:
    """Latent shards (`data.shards.LatentShards`) joined with their captions' embeddings, if cached."""

    def __init__(self, latents, captions: CaptionEmbeddingCache | None = None):
        if captions is not None and len(captions) != len(latents):
            raise ValueError(f"The caption embeddings hold {len(captions)} records and the latents "
                             f"{len(latents)}: they were encoded from different data.")
        self.latents, self.captions = latents, captions

    def __len__(self) -> int:
        return len(self.latents)

    def __getitems__(self, indices: list[int]) -> dict:
        rows = self.latents.__getitems__(indices)
        scale = self.latents.index["scaling_factor"]
        batch = {"mean": self.latents.scaled(rows["mean"]), "std": rows["std"] * scale}
        if self.captions is None:
            return {**batch, "caption": rows["caption"]}
        text = self.captions.take(torch.as_tensor(indices))
        return {**batch, "tokens": text.tokens, "mask": padding_mask(text.mask)}  # None: no padding (on the CPU)

    def sigma_data_sample(self, n: int = 10_000) -> torch.Tensor:
        """The scaled posterior means of the first `n` records (to measure sigma_data for EDM)."""
        return self.__getitems__(list(range(min(n, len(self)))))["mean"]


def _drop_text(batch: dict, drop: torch.Tensor, null: TextEmbedding | None):
    """The batch's captions with the items where `drop` [B] is True replaced by the null condition."""
    if "caption" in batch:
        return [NULL_PROMPT if d else c for c, d in zip(batch["caption"], drop.tolist())]
    text = TextEmbedding(batch["tokens"], batch["mask"])  # null: on the same device
    keep = ~drop.to(text.tokens.device)
    tokens = torch.where(keep[:, None, None], text.tokens, null.tokens)
    if text.mask is None and null.mask is None:  # no padding in either: no mask
        return TextEmbedding(tokens, None)
    return TextEmbedding(tokens, torch.where(keep[:, None], full_mask(text), full_mask(null)))


def record_loss_fn(objective: Objective, null: TextEmbedding | None = None, posterior: bool = False):
    """The Trainer's loss_fn(model, batch, generator) for `TextToImageRecords` batches.

    null: the cached embedding of "" ([1, L, D] and [1, L] or None, `padding_mask` of the cache's
    `null(1)`) when the batch carries embeddings; None when it carries strings (a learned encoder
    encodes "" itself, and which captions are dropped is read on the host: a sync a step on a GPU).
    """
    nulls = {}  # device -> null there, copied once

    def loss_fn(model, batch, generator):
        x0, device = batch["mean"], generator.device  # draws on the generator's device: the trainer's GPU
        if posterior:  # z ~ N(mean, std^2), drawn from the trainer's generator (exact resume)
            x0 = x0 + batch["std"] * torch.randn(x0.shape, generator=generator, device=device).to(x0.device)
        drop = torch.rand(len(x0), generator=generator, device=device) < objective.cond_drop
        if null is not None and x0.device not in nulls:
            nulls[x0.device] = TextEmbedding(*(None if t is None else t.to(x0.device) for t in null))
        return diffusion_loss(model, x0, _drop_text(batch, drop, nulls.get(x0.device)), objective, generator)

    return loss_fn


def check_latent_shape(cfg: TextToImageConfig, shape: tuple[int, int, int]):
    """A clear error unless the denoiser of `cfg` reads latents of `shape` (C, h, w)."""
    m, patches = cfg.model, cfg.architecture in ("dit", "mmdit")
    channels, size = (m.in_channels, tuple(m.input_size)) if patches else \
        (m.latent_channels, (m.latent_size, m.latent_size))
    if (channels, size) != (shape[0], tuple(shape[1:])):
        raise ValueError(f"The {cfg.architecture} is configured for latents {channels}x{size[0]}x{size[1]} but the "
                         f"VAE made {shape[0]}x{shape[1]}x{shape[2]}: set its "
                         f"{'in_channels and input_size' if patches else 'latent_channels and latent_size'}"
                         " to match (the CLI does so), or encode with a VAE of the model's latent shape.")


def train_on_records(cfg: TextToImageConfig, records: TextToImageRecords, encoder: TextEncoder | None = None,
                     posterior: bool = False, resume: bool = False, sample_fn=None) -> Trainer:
    """Train on `records` through the same model, objective and Trainer as `train_text_to_image`.
    A frozen `cfg.text_encoder` needs the records' caption embeddings cached; a learned one reads strings."""
    check_latent_shape(cfg, records.latents.latent_shape)
    model = build(cfg, encoder, per_record=True)
    if (records.captions is None) != (model.text_encoder is not None):
        need = "strings (records without a caption cache)" if model.text_encoder is not None else \
            "cached embeddings (encode the captions first: text.embedding_cache.encode_caption_cache)"
        raise ValueError(f"The {cfg.text_encoder!r} text encoder is {'learned' if model.text_encoder else 'frozen'}: "
                         f"it reads captions as {need}.")
    measure_sigma_data_into(cfg, records.sigma_data_sample())
    null = None if records.captions is None else records.captions.null(1)
    if null is not None:
        null = TextEmbedding(null.tokens, padding_mask(null.mask))
    return fit_text_to_image(cfg, model, record_loss_fn(cfg.objective, null, posterior), records, resume, sample_fn)

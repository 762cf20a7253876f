"""Train notebook 01's text-conditioned denoiser on cached latents (x0-prediction, MSE).

Each step: draw latents x0 with their labels, a caption per item (template x synonym, from the
seeded generator), noise levels t ~ Beta(a, b) and noise eps; form x_t = alpha(t) x0 + sigma(t) eps;
replace the caption by "" with probability `cond_drop` (so the model also learns the unconditional
prediction that classifier-free guidance needs); minimise |D(x_t, t, caption) - x0|^2.
The text encoder trains jointly. An EMA of both is returned: that is what we sample with.

The config's objective knobs (diffusion/losses.py) default to exactly that recipe: other timestep
distributions and a timestep shift, min-SNR-gamma weights, offset noise, input perturbation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data.captions import all_training_captions
from ..data.fashion_mnist import CLASSES
from ..diffusion.losses import min_snr_weight, offset_noise, perturb_input, sample_timesteps, weighted_mse
from ..diffusion.schedules import COSINE
from ..models.tiny_transformer import TinyTransformer, TinyTransformerConfig
from ..text.word_encoder import WordEncoder, WordEncoderConfig
from .common import infinite_batches, seed_everything, warmup_cosine
from .ema import EMA


@dataclass
class DenoiserTrainConfig:
    steps: int = 3000
    batch_size: int = 128
    lr: float = 2e-3
    warmup: int = 100
    cond_drop: float = 0.1
    t_distribution: str = "beta"  # "uniform" | "beta" | "logit_normal": losses.sample_timesteps
    t_beta: tuple[float, float] = (1.0, 2.5)
    t_logit_normal: tuple[float, float] = (0.0, 1.0)  # (mean, std) of logit(t)
    t_shift: float = 1.0  # timestep bias: > 1 towards noise, < 1 towards data
    min_snr_gamma: float | None = None  # min-SNR-gamma weights on the x0 loss; None: plain MSE
    offset_noise: float = 0.0  # strength of per-channel offset noise
    input_perturbation: float = 0.0  # gamma of input perturbation
    ema_decay: float = 0.999
    seed: int = 0
    model: TinyTransformerConfig = field(default_factory=TinyTransformerConfig)
    text: WordEncoderConfig = field(default_factory=WordEncoderConfig)


def caption_table(text_encoder: WordEncoder) -> torch.Tensor:
    """Token ids of every training caption, per class: [classes, captions per class, max_len]."""
    return torch.stack([text_encoder.tokenize(all_training_captions(c)) for c in range(len(CLASSES))])


def train_denoiser(cache, cfg: DenoiserTrainConfig | None = None, device: str = "cpu",
                   log_every: int = 50):
    """Returns (EMA weights as ModuleDict(denoiser=..., text_encoder=...) on the CPU, in eval mode,
    {'step': [...], 'loss': [...]}). `TextToImagePipeline(nets["denoiser"], nets["text_encoder"], vae)` samples with them."""
    cfg = cfg or DenoiserTrainConfig()
    gen = seed_everything(cfg.seed)
    latents, labels = cache.tensors("train")
    latents, labels = latents.to(device), labels.to(device)

    nets = nn.ModuleDict({"denoiser": TinyTransformer(cfg.model), "text_encoder": WordEncoder(cfg.text)})
    nets.to(device).train()
    ema = EMA(nets, cfg.ema_decay)
    captions = caption_table(nets["text_encoder"]).to(device)
    null_ids = nets["text_encoder"].tokenize("").to(device)
    opt = torch.optim.AdamW(nets.parameters(), lr=cfg.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, cfg.steps, cfg.warmup))

    history = {"step": [], "loss": []}
    batches, running = infinite_batches(len(latents), cfg.batch_size, gen), []
    bar = tqdm(range(cfg.steps), desc="denoiser")
    for step in bar:
        idx = next(batches).to(device)
        x0, y = latents[idx], labels[idx]
        b = len(idx)
        pick = torch.randint(0, captions.shape[1], (b,), generator=gen).to(device)
        ids = captions[y, pick]  # [B, L]
        drop = (torch.rand(b, generator=gen) < cfg.cond_drop).to(device)
        ids = torch.where(drop[:, None], null_ids, ids)
        t = sample_timesteps(b, cfg.t_distribution, gen, beta=cfg.t_beta, logit_normal=cfg.t_logit_normal,
                             shift=cfg.t_shift).to(device)
        noise = offset_noise(torch.randn(x0.shape, generator=gen), cfg.offset_noise, gen)
        x_t = COSINE.add_noise(x0, t, perturb_input(noise, cfg.input_perturbation, gen).to(device))

        x0_hat = nets["denoiser"](x_t, t, nets["text_encoder"](ids))
        weight = None if cfg.min_snr_gamma is None else \
            min_snr_weight(*COSINE.alpha_sigma(t), "x0", cfg.min_snr_gamma)
        loss = weighted_mse(x0_hat, x0, weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(nets.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.update(nets, step)

        running.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == cfg.steps:
            history["step"].append(step + 1)
            history["loss"].append(sum(running) / len(running))
            bar.set_postfix(loss=f"{history['loss'][-1]:.4f}")
            running = []
    return ema.model.cpu().eval(), history

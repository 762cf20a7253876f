"""Train notebook 03's text-to-image DiT on cached latents with the `Trainer` (CLI: `train --model dit`).

One step, for a batch of latents x0 with class labels y (Ho & Salimans, 2022; Peebles & Xie, 2023):

    caption  <- a training caption of class y (template x synonym), "" with probability cond_drop
    t        <- the objective's timestep distribution;   eps <- N(0, I) (+ offset noise)
    x_t      =  alpha(t) x0 + sigma(t) (eps + input perturbation)
    loss     =  w(t) |F(x_t, t, text(caption)) - target|^2,  target = a x0 + b eps of the prediction
                (parametrizations.prediction_target), w = min-SNR-gamma or 1

or, for prediction "edm" (Karras et al., 2022; diffusion/edm.py), in sigma instead of t:

    sigma    <- ln sigma ~ N(P_mean, P_std^2);   n <- N(0, I) (+ offset noise)
    x        =  x0 + sigma (n + input perturbation)
    loss     =  |F(c_in x, c_noise, text(caption)) - F_target|^2    (edm.edm_loss: lambda(sigma) |D - x0|^2)

where D = c_skip x + c_out F is edm.EDMPrecond around the same caption-conditioned DiT, with the
latents' sigma_data (measured when training starts, then recorded in the config).

Captions are rows of a fixed table (every training caption, then ""), so "" is exactly the null
condition the pipeline samples with. A frozen text encoder (MiniLM, CLIP) is run once over the
table (`text.cache.caption_embeddings`) and never again; a learned one (the word encoder, a learned
one-hot table) trains with the DiT and is saved with it.

With `lora` (a LoRAConfig), the run fine-tunes init_from's denoiser through a LoRA adapter alone
(train/lora.py): every other weight is frozen, and the adapter is what the CLI saves.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..data.captions import all_training_captions
from ..data.fashion_mnist import CLASSES
from ..diffusion.edm import EDMPrecond, edm_loss, measure_sigma_data
from ..diffusion.losses import (TIMESTEP_DISTRIBUTIONS, min_snr_weight, offset_noise, perturb_input,
                                sample_timesteps, weighted_mse)
from ..diffusion.parametrizations import PREDICTIONS, prediction_target
from ..diffusion.schedules import Schedule, get_schedule
from ..models.dit import DiT, DiTConfig
from ..models.masking import check_mask_ratio, keep_pixels, num_kept, random_keep
from ..models.mmdit import MMDiT, MMDiTConfig
from ..models.moe import router_aux_loss, routing_stats
from ..models.tiny_transformer import TinyTransformer, TinyTransformerConfig
from ..models.unet import UNet, UNetConfig
from ..text import TEXT_ENCODERS, TextEmbedding, TextEncoder, caption_embeddings, text_encoder
from ..text.base import NULL_PROMPT, check_mask, padding_mask
from ..weights import atomic_write, read_component_config, read_component_weights
from .lora import LoRAConfig, add_lora
from .trainer import Trainer, TrainerConfig


_T_ONLY = ("schedule", "zero_terminal_snr", "t_distribution", "t_beta", "t_logit_normal", "t_shift",
           "min_snr_gamma")  # the Objective's fields that describe t and its weights
_EDM_ONLY = ("P_mean", "P_std", "sigma_data")


@dataclass
class Objective:
    """What the network learns: its prediction target on a noise schedule, and how t is drawn.

    Every (prediction, schedule) pair trains and samples: each prediction determines x0 on any
    schedule (diffusion/parametrizations.py; an eps model starts below SNR 0, `pipeline.start_level`),
    and `samplers.default_sampler(schedule)` steps it: flow Euler on the flow path, DDIM elsewhere
    (a flow-predicting model on the cosine schedule samples with DDIM: flow Euler integrates the
    flow path alone).

    prediction "edm" is Karras et al.'s (2022) objective (module docstring): the DiT is F inside
    `edm.EDMPrecond`, trained at ln sigma ~ N(P_mean, P_std^2) on data of std `sigma_data` (None:
    measured from the training latents when training starts, `train_text_to_image`, and recorded
    there; never assumed 0.5). It has no t: schedule, zero_terminal_snr, the t_* fields and
    min_snr_gamma (EDM's lambda(sigma) is its weight) must keep their defaults, as P_mean, P_std and
    sigma_data must for the other predictions. offset_noise and input_perturbation apply to its n as
    to eps. The pipeline samples it with EDM's Heun on the Karras grid; its schedule (cosine) is
    only the t coordinate in which the t-space samplers can step it."""

    prediction: str = "v"  # "x0" | "eps" | "v" | "flow" (diffusion/parametrizations.py) | "edm" (diffusion/edm.py)
    schedule: str = "cosine"  # "cosine" | "linear" | "scaled_linear" | "flow" (diffusion/schedules.py)
    zero_terminal_snr: bool = False
    cond_drop: float = 0.1  # probability of training on the null caption "" (classifier-free guidance)
    t_distribution: str = "uniform"  # "uniform" | "beta" | "logit_normal"
    t_beta: tuple[float, float] = (1.0, 2.5)
    t_logit_normal: tuple[float, float] = (0.0, 1.0)
    t_shift: float = 1.0  # > 1 biases t towards noise, < 1 towards data
    min_snr_gamma: float | None = None
    offset_noise: float = 0.0
    input_perturbation: float = 0.0
    P_mean: float = -1.2  # edm: ln sigma ~ N(P_mean, P_std^2) (Karras et al., 2022, Sec. 5)
    P_std: float = 1.2
    sigma_data: float | None = None  # edm: the latents' std; None: measured when training starts
    mask_ratio: float = 0.0  # DiT only: the fraction of patches dropped after the patch-mixer (models/masking.py)

    def __post_init__(self):
        self.t_beta, self.t_logit_normal = tuple(self.t_beta), tuple(self.t_logit_normal)
        if self.prediction not in (*PREDICTIONS, "edm"):
            raise ValueError(f"Unknown prediction {self.prediction!r}; choose from {', '.join(PREDICTIONS)}, edm.")
        edm = self.prediction == "edm"
        changed = [f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                   if f.name in (_T_ONLY if edm else _EDM_ONLY) and getattr(self, f.name) != f.default]
        if changed and edm:
            raise ValueError(f"prediction='edm' draws ln sigma ~ N(P_mean, P_std^2) and weights by EDM's "
                             f"lambda(sigma), with no t: {', '.join(changed)} do not apply; leave them at their "
                             f"defaults (offset_noise and input_perturbation do apply).")
        if changed:
            raise ValueError(f"{', '.join(changed)} are the EDM objective's (prediction='edm'); a "
                             f"{self.prediction} model draws t from t_distribution.")
        if edm and not (math.isfinite(self.P_mean) and 0 <= self.P_std < math.inf):
            raise ValueError(f"Need a finite P_mean and 0 <= P_std < inf, got P_mean={self.P_mean}, "
                             f"P_std={self.P_std}.")
        if self.sigma_data is not None and not 0 < self.sigma_data < math.inf:
            raise ValueError(f"sigma_data, the latents' std, must be positive and finite, got {self.sigma_data}; "
                             f"leave it None to measure it from the training latents.")
        if self.t_distribution not in TIMESTEP_DISTRIBUTIONS:
            raise ValueError(f"Unknown t_distribution {self.t_distribution!r}; choose from "
                             f"{', '.join(TIMESTEP_DISTRIBUTIONS)}.")
        check_mask_ratio(self.mask_ratio)
        if not 0 <= self.cond_drop < 1:
            raise ValueError(f"cond_drop is a probability in [0, 1), got {self.cond_drop}.")
        self.noise_schedule()  # a clear error for an unknown schedule

    def noise_schedule(self) -> Schedule:
        return get_schedule(self.schedule, self.zero_terminal_snr)


# architecture name -> (denoiser class, its config class)
ARCHITECTURES = {"dit": (DiT, DiTConfig), "tiny_transformer": (TinyTransformer, TinyTransformerConfig),
                 "mmdit": (MMDiT, MMDiTConfig), "unet": (UNet, UNetConfig)}


@dataclass
class TextToImageConfig:
    """One training run: the denoiser, the text encoder, the objective and the trainer's settings."""

    model: DiTConfig | TinyTransformerConfig | MMDiTConfig | UNetConfig = field(default_factory=DiTConfig)
    # "dit" (notebook 03), "tiny_transformer" (notebook 01), "mmdit" or "unet" (07): ARCHITECTURES
    architecture: str = "dit"
    text_encoder: str = "minilm"  # one of text.TEXT_ENCODERS
    text_encoder_kwargs: dict = field(default_factory=dict)  # e.g. {"dim": 128} for "word"
    objective: Objective = field(default_factory=Objective)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    init_from: str | None = None  # a pipeline folder whose denoiser (and learned encoder) training starts from
    lora: LoRAConfig | None = None  # fine-tune init_from's denoiser through a LoRA adapter alone (train/lora.py)

    def __post_init__(self):
        if self.lora is not None and not self.init_from:
            raise ValueError("A LoRA adapter fine-tunes a trained denoiser: set init_from (--init-from) to the "
                             "pipeline folder of the model to adapt.")
        if self.text_encoder not in TEXT_ENCODERS:
            raise ValueError(f"Unknown text encoder {self.text_encoder!r}; choose from "
                             f"{', '.join(TEXT_ENCODERS)}.")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"Unknown architecture {self.architecture!r}; choose from {', '.join(ARCHITECTURES)}.")
        config_class = ARCHITECTURES[self.architecture][1]
        if not isinstance(self.model, config_class):
            raise ValueError(f"architecture {self.architecture!r} is configured by a {config_class.__name__}, "
                             f"got a {type(self.model).__name__}.")
        if self.objective.mask_ratio and self.architecture != "dit":
            raise ValueError(f"Patch masking (mask_ratio={self.objective.mask_ratio}) needs the DiT; the "
                             f"{self.architecture} has no patch-mixer.")
        if self.objective.mask_ratio and self.model.num_experts and self.model.routing == "expert_choice":
            with torch.device("meta"):  # a clear error now, not at the first step
                self.model.moe_layer().capacity(num_kept(self.model.num_tokens, self.objective.mask_ratio))

    @classmethod
    def from_dict(cls, d: dict) -> "TextToImageConfig":
        """From the nested dict of `to_dict` (or a JSON config file); unknown keys are an error."""
        parts = {"model": ARCHITECTURES.get(d.get("architecture", "dit"), ARCHITECTURES["dit"])[1], "objective": Objective,
                 "trainer": TrainerConfig, "lora": LoRAConfig}
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"Unknown config keys {sorted(unknown)}.")
        kwargs = dict(d)
        for name, part in parts.items():
            if name in kwargs and isinstance(kwargs[name], dict):
                known = {f.name for f in dataclasses.fields(part)}
                bad = set(kwargs[name]) - known
                if bad:
                    raise ValueError(f"Unknown {name} config keys {sorted(bad)}; known: {sorted(known)}.")
                kwargs[name] = part(**kwargs[name])
        return cls(**kwargs)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))


def study_config(model: DiTConfig, steps: int, out_dir: str, *, mask_ratio: float = 0.0,
                 init_from: str | None = None, batch_size: int = 128, device: str = "cpu", seed: int = 0,
                 log_every: int | None = None) -> TextToImageConfig:
    """Notebook 06's study recipe: one short run of a MiniLM-conditioned DiT, the same for every study.

    v-prediction (Salimans & Ho, 2022) with min-SNR-5 weights (Hang et al., 2023), AdamW at lr 1e-3
    after a linear warm-up of min(100, steps / 4) steps, then a cosine decay to 5%, so that every
    budget, however short, ends its schedule; one checkpoint at the end, no TensorBoard. mask_ratio > 0
    trains with MaskDiT-style patch masking (models/masking.py); init_from continues a pipeline folder
    (the unmasked fine-tune). Used by notebook 06, scripts/masking_study.py and scripts/scaling_study.py.
    """
    return TextToImageConfig(
        model=model, text_encoder="minilm", init_from=init_from,
        objective=Objective(prediction="v", min_snr_gamma=5.0, mask_ratio=mask_ratio),
        trainer=TrainerConfig(steps=steps, batch_size=batch_size, lr=1e-3, warmup_steps=min(100, steps // 4),
                              schedule="cosine", checkpoint_every=steps, log_every=log_every or max(1, steps // 10),
                              out_dir=out_dir, device=device, tensorboard=False, seed=seed))


class CaptionConditioned(nn.Module):
    """What trains: a denoiser (the DiT, or notebook 01's tiny transformer) and, if it learns, the text
    encoder, conditioned on captions given in one of three forms:

        rows [B] (LongTensor)   rows of a fixed caption table (`captions`; class captions); a frozen
                                encoder is run once over the table, which is then a buffer
        TextEmbedding           a frozen encoder's embeddings, read from a cache (per-image captions)
        list of B str           the captions themselves, encoded now (a learned encoder)

    forward(x_t [B, C, H, W], t [B], text) -> F [B, C, H, W]. The null condition is always the encoding
    of "" (`null_row` of the table, `null_text()` otherwise).

    A table none of whose rows is padded (a one-hot table, captions of one length) gives its rows with
    mask None, so that the denoiser's attention runs with no mask; which it is, is read once, here on
    the host, rather than per batch from rows that live on the GPU (a sync each step). A learned
    encoder reads its captions as strings, so its rows are read on the host: one sync a step on a GPU
    (the frozen encoders of training at scale have none).
    """

    def __init__(self, transformer: nn.Module, encoder: TextEncoder, captions: list[str] | None = None):
        super().__init__()
        if encoder.dim != transformer.config.text_dim:
            raise ValueError(f"The {encoder.name!r} encoder gives {encoder.dim}-wide tokens but the denoiser "
                             f"reads text_dim={transformer.config.text_dim}; set the denoiser's text_dim.")
        self.transformer = transformer
        self.captions = None if captions is None else tuple(dict.fromkeys([*captions, NULL_PROMPT]))
        self.null_row = None if captions is None else self.captions.index(NULL_PROMPT)
        self.text_encoder = None if encoder.frozen else encoder
        if encoder.frozen:  # run once; buffers, not saved with the weights
            table = caption_embeddings(encoder, self.captions or [NULL_PROMPT])
            self.register_buffer("tokens", table.tokens, persistent=False)  # [rows, L, D]
            self.register_buffer("mask", check_mask(table.mask), persistent=False)  # [rows, L]
            self.padded = padding_mask(table.mask.cpu()) is not None

    @property
    def config(self):
        return self.transformer.config

    def null_text(self, batch_size: int) -> TextEmbedding:
        """The encoding of "" for `batch_size` items."""
        if self.text_encoder is not None:
            return self.text_encoder.null(batch_size)
        rows = torch.full((batch_size,), self.null_row or 0, device=self.tokens.device)
        return self._rows(rows)

    def text(self, cond) -> TextEmbedding:
        if isinstance(cond, TextEmbedding):
            return cond
        if isinstance(cond, (list, tuple)):
            if self.text_encoder is None:
                raise ValueError("Captions as strings need a learned text encoder; a frozen one's embeddings "
                                 "are read from their cache (text.embedding_cache) and given as a TextEmbedding.")
            return self.text_encoder.encode(list(cond))
        if self.text_encoder is None:
            return self._rows(cond)
        return self.text_encoder.encode([self.captions[i] for i in cond.tolist()])

    def _rows(self, rows: torch.Tensor) -> TextEmbedding:
        """Rows [B] of the frozen encoder's table: tokens [B, L, D], mask [B, L] (None: no row is padded)."""
        return TextEmbedding(self.tokens[rows], self.mask[rows] if self.padded else None)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, text, **kwargs) -> torch.Tensor:
        return self.transformer(x_t, t, self.text(text), **kwargs)


def class_caption_rows(model: CaptionConditioned) -> torch.Tensor:
    """Rows of each class's captions in the model's table: [classes, captions per class]."""
    index = {c: i for i, c in enumerate(model.captions)}
    return torch.tensor([[index[c] for c in all_training_captions(k)] for k in range(len(CLASSES))])


def diffusion_loss(model, x0: torch.Tensor, text, objective: Objective,
                   generator: torch.Generator) -> tuple[torch.Tensor, dict]:
    """The module docstring's loss for latents x0 [B, C, H, W] and their captions `text` (already
    dropped; any form `CaptionConditioned` reads); for prediction "edm", `edm_diffusion_loss`.

    With objective.mask_ratio > 0 the DiT sees a random (1 - mask_ratio) of each latent's patches after
    its patch-mixer and the loss counts those patches only (models/masking.py). A MoE DiT's routing
    statistics come back as metrics, and a token-choice router's balancing loss is added (models/moe.py)."""
    masking = {}
    if objective.mask_ratio:
        p = next(m for m in model.modules() if isinstance(m, DiT)).config.patch_size
        grid = (x0.shape[2] // p, x0.shape[3] // p)
        keep = random_keep(x0.shape[0], grid[0] * grid[1], objective.mask_ratio, generator, x0.device)
        masking = {"net_kwargs": {"keep": keep}, "loss_mask": keep_pixels(keep, grid, p)}
    loss = (edm_diffusion_loss if objective.prediction == "edm" else _t_diffusion_loss)(
        model, x0, text, objective, generator, **masking)
    if not isinstance(model, nn.Module):  # a plain callable (tests, notebooks): no routers
        return loss, {}
    aux = router_aux_loss(model)
    metrics = routing_stats(model)
    if aux is not None:
        metrics["router_aux_loss"] = aux.detach()
        loss = loss + aux
    return loss, metrics


def held_out_losses(model, x0: torch.Tensor, text: TextEmbedding, objective: Objective, chunks: int = 16,
                    seed: int = 1234) -> torch.Tensor:
    """The objective's loss on held-out latents x0 [N, C, H, W] with their captions `text`, in `chunks`
    equal parts -> [chunks]. One generator seeded `seed` draws the noise and t of every part, so every
    model given the same data sees the same noisy inputs: differences are the models'. The parts make a
    bootstrap over the data possible (notebook 06's scaling study)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return torch.stack([diffusion_loss(model, x0[i], TextEmbedding(text.tokens[i], text.mask[i]), objective,
                                           generator)[0].detach().cpu()
                            for i in torch.arange(len(x0)).chunk(chunks)])


def _t_diffusion_loss(model, x0: torch.Tensor, text, objective: Objective, generator: torch.Generator,
                      net_kwargs: dict | None = None, loss_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The loss in t (module docstring) for x0, prediction x0, eps, v or flow."""
    b = x0.shape[0]
    schedule = objective.noise_schedule()
    t = sample_timesteps(b, objective.t_distribution, generator, beta=objective.t_beta,
                         logit_normal=objective.t_logit_normal, shift=objective.t_shift).to(x0.device)
    eps = offset_noise(torch.randn(x0.shape, generator=generator, device=generator.device), objective.offset_noise,
                       generator)
    x_t = schedule.add_noise(x0, t, perturb_input(eps, objective.input_perturbation, generator).to(x0.device))
    eps = eps.to(x0.device)
    alpha, sigma = schedule.alpha_sigma_like(t, x0)
    target = prediction_target(objective.prediction, x0, eps, alpha, sigma)
    weight = None if objective.min_snr_gamma is None else \
        min_snr_weight(alpha, sigma, objective.prediction, objective.min_snr_gamma)
    return weighted_mse(model(x_t, t, text, **(net_kwargs or {})).float(), target, weight, loss_mask)


def edm_diffusion_loss(model, x0: torch.Tensor, text, objective: Objective, generator: torch.Generator,
                       net_kwargs: dict | None = None, loss_mask: torch.Tensor | None = None) -> torch.Tensor:
    """EDM's loss (`edm.edm_loss`) for latents x0 [B, C, H, W] and their captions (already dropped):
    n ~ N(0, I) (+ offset noise), then ln sigma ~ N(P_mean, P_std^2), with `model` (what the Trainer
    passes: the CaptionConditioned, DDP-wrapped or compiled) as F inside EDMPrecond. Wrapped here,
    not in `build`, the trained module and its checkpoints stay the DiT's, as for every prediction."""
    if objective.sigma_data is None:
        raise ValueError("The EDM loss needs the latents' sigma_data: train_text_to_image measures it "
                         "when training starts; else set Objective(sigma_data=edm.measure_sigma_data(latents)).")
    eps = offset_noise(torch.randn(x0.shape, generator=generator, device=generator.device), objective.offset_noise,
                       generator)
    inputs = perturb_input(eps, objective.input_perturbation, generator)
    return edm_loss(EDMPrecond(model, objective.sigma_data), x0, text, generator, P_mean=objective.P_mean,
                    P_std=objective.P_std, noise=eps.to(x0.device), input_noise=inputs.to(x0.device),
                    net_kwargs=net_kwargs, loss_mask=loss_mask)


def make_loss_fn(rows_per_class: torch.Tensor, null_row: int, objective: Objective):
    """The Trainer's loss_fn(model, (x0, y), generator): pick a caption per item, drop, diffuse.
    Every draw is on the generator's device (the Trainer's is on its GPU), and so is the caption
    table after the first step: nothing is copied from or to the host."""
    tables = {}  # device -> rows_per_class there

    def loss_fn(model, batch, generator):
        x0, y = batch
        b, device = len(y), generator.device
        if device not in tables:
            tables[device] = rows_per_class.to(device)
        pick = torch.randint(0, rows_per_class.shape[1], (b,), generator=generator, device=device)
        rows = tables[device][y.to(device), pick]
        drop = torch.rand(b, generator=generator, device=device) < objective.cond_drop
        rows = torch.where(drop, null_row, rows).to(x0.device)
        return diffusion_loss(model, x0, rows, objective, generator)

    return loss_fn


def build(cfg: TextToImageConfig, encoder: TextEncoder | None = None, per_record: bool = False) -> CaptionConditioned:
    """The training module for `cfg`; `encoder` (else built from the config) sets the denoiser's
    text_dim. Its caption table holds the class captions, or nothing with `per_record` (captions come
    with each record: `records.train_on_records`)."""
    torch.manual_seed(cfg.trainer.seed)  # a learned encoder's initial weights
    encoder = encoder or text_encoder(cfg.text_encoder, **cfg.text_encoder_kwargs)
    if encoder is None:
        raise RuntimeError(f"The {cfg.text_encoder!r} text encoder is not available here (see the "
                           "message above); choose 'minilm', 'word' or 'one_hot'.")
    if cfg.model.text_dim != encoder.dim:
        cfg.model = dataclasses.replace(cfg.model, text_dim=encoder.dim)
    torch.manual_seed(cfg.trainer.seed)  # the denoiser's initial weights, with or without `encoder`
    captions = None if per_record else all_training_captions()
    model = CaptionConditioned(ARCHITECTURES[cfg.architecture][0](cfg.model), encoder, captions)
    if cfg.init_from:
        init_from_pipeline(model, cfg.init_from)
    if cfg.lora is not None:  # the adapter alone trains: the denoiser's weights and a learned encoder are frozen
        if model.text_encoder is not None:
            model.text_encoder.requires_grad_(False)
        add_lora(model.transformer, cfg.lora, base=cfg.init_from)
    return model


def init_from_pipeline(model: CaptionConditioned, folder: str | Path):
    """Start from the denoiser (and a learned text encoder) of the pipeline in `folder`: a second stage,
    such as the unmasked fine-tune after masked training (notebook 06). The denoiser's config must
    be this run's; the optimizer, EMA and step start afresh."""
    folder = Path(folder)
    name, saved = read_component_config(folder / "transformer")
    if name == type(model.transformer).__name__ and set(saved) <= {f.name for f in dataclasses.fields(model.config)}:
        saved = json.loads(json.dumps(dataclasses.asdict(type(model.config)(**saved))))  # later fields: defaults
    ours = json.loads(json.dumps(dataclasses.asdict(model.config)))  # tuples -> lists, as saved
    if name != type(model.transformer).__name__ or saved != ours:
        diff = {k: (saved.get(k), ours.get(k)) for k in ours if saved.get(k) != ours.get(k)}
        raise ValueError(f"init_from {folder}: its {name} has another config than this run's "
                         f"{type(model.transformer).__name__}; (saved, this run) differ in {diff}. Train the "
                         f"second stage with the first stage's model config (the same preset).")
    model.transformer.load_state_dict(read_component_weights(folder / "transformer", name))
    if model.text_encoder is not None:
        text = folder / "text_encoder"
        model.text_encoder.load_state_dict(read_component_weights(text, read_component_config(text)[0]))


def train_text_to_image(cfg: TextToImageConfig, latents: torch.Tensor, labels: torch.Tensor,
                        encoder: TextEncoder | None = None, resume: bool = False,
                        sample_fn=None) -> Trainer:
    """Train on Fashion-MNIST latents [N, C, h, w] with class captions drawn per step from `labels` [N]
    (notebooks 01 and 03); `records.train_on_records` trains on any image–caption data instead.
    Returns the Trainer (see `fit_text_to_image`)."""
    measure_sigma_data_into(cfg, latents)
    model = build(cfg, encoder)
    loss_fn = make_loss_fn(class_caption_rows(model), model.null_row, cfg.objective)
    return fit_text_to_image(cfg, model, loss_fn, (latents, labels), resume, sample_fn)


def measure_sigma_data_into(cfg: TextToImageConfig, latents: torch.Tensor):
    """An EDM objective without sigma_data gets it measured from the training `latents`, into `cfg` (and
    so into config.json and the pipeline the CLI writes); on resume it is measured again, to the same bits."""
    if cfg.objective.prediction == "edm" and cfg.objective.sigma_data is None:
        cfg.objective = dataclasses.replace(cfg.objective, sigma_data=measure_sigma_data(latents))
        print(f"sigma_data = {cfg.objective.sigma_data:.4f}, measured from {len(latents)} training latents")


def fit_text_to_image(cfg: TextToImageConfig, model: CaptionConditioned, loss_fn, data, resume: bool = False,
                      sample_fn=None) -> Trainer:
    """Train `model` on `data` with the Trainer (or, with resume, continue from out_dir's newest good
    checkpoint, if it has one: a job that is restarted after a crash can always pass resume=True);
    returns the Trainer, whose `export_ema()` the pipeline samples with (`.transformer`, and
    `.text_encoder` if learned)."""
    trainer = Trainer(model, loss_fn, data, cfg.trainer, sample_fn)
    if resume and trainer.has_checkpoints():
        trainer.load_checkpoint()
    elif resume:
        print(f"resume: {trainer.checkpoint_dir} holds no checkpoint yet; starting at step 0.")
    if resume or not trainer.has_checkpoints():  # else fit refuses: keep that run's config
        text = json.dumps(cfg.to_dict(), indent=1)
        atomic_write(Path(cfg.trainer.out_dir) / "config.json", lambda tmp: Path(tmp).write_text(text))
    trainer.fit()
    return trainer

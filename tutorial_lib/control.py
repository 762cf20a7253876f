"""Controlling a trained pipeline: what `TextToImagePipeline.generate_latents` and `invert` check and build
for the editing and guidance options (the maths is in diffusion/editing.py and diffusion/guidance.py).

    negative_prompt      the reference condition of classifier-free guidance instead of the null one
    guide                autoguidance: another pipeline's x0 estimate as the reference, converted into the
                         main model's coordinate (t on its schedule, or EDM's sigma) through sigma = sigma_t /
                         alpha_t (diffusion/edm.py) where their schedules or parametrizations differ; it must
                         denoise the same latents (same VAE, same latent shape)
    init_latents, strength, mask
                         image-to-image and inpainting: the input's scaled latents [B or 1, C, h, w], the
                         fraction of the steps that run, and the mask [B or 1, 1, h, w] (1 = regenerate)
"""

from __future__ import annotations

import math

import torch

from .diffusion.edm import sigma_denoiser, sigma_of_t, time_denoiser
from .diffusion.editing import check_mask, check_strength
from .text import check_prompts
from .weights import weights_hash


def reference_condition(pipe, prompts: list[str], negative_prompt, guide):
    """What guidance moves away from, for prompts: the null condition, a negative prompt's embedding
    (a str for every prompt, or a list of one per prompt), or with a guide, the guide's own embedding of
    the prompts themselves."""
    if guide is not None:
        if negative_prompt is not None:
            raise ValueError("Autoguidance guides by the guide's prediction for the same prompt, not by a "
                             "negative prompt: pass guide= or negative_prompt=, not both.")
        encoder = guide.text_encoder
        return encoder.encode(prompts)
    if negative_prompt is None:
        return pipe.text_encoder.null(len(prompts))  # exactly what training dropped to
    negatives = check_prompts(negative_prompt)
    if isinstance(negative_prompt, str):
        negatives = negatives * len(prompts)
    if len(negatives) != len(prompts):
        raise ValueError(f"negative_prompt gives {len(negatives)} prompts for {len(prompts)} prompts: give one "
                         "str for all, or a list of the same length as the prompts.")
    return pipe.text_encoder.encode(negatives)


def check_guide(pipe, guide):
    """A guide must be a pipeline that denoises the same latents: the same VAE (weights hash) and latent
    shape. Its prediction and schedule may differ (`guide_denoiser` converts them)."""
    if not all(hasattr(guide, name) for name in ("x0_network", "latent_shape", "text_encoder", "vae", "device")):
        raise ValueError(f"guide is another TextToImagePipeline (e.g. TextToImagePipeline.from_pretrained("
                         f"asset('dit_t2i_guide'))), got {type(guide).__name__}.")
    if guide.device != pipe.device:
        raise ValueError(f"The guide is on {guide.device}, this pipeline on {pipe.device}: move it, guide.to({str(pipe.device)!r}).")
    ours, theirs = pipe.latent_shape, guide.latent_shape
    if ours != theirs:
        raise ValueError(f"The guide denoises {theirs} latents, this model {ours}: a guide must work in the same "
                         "latent space; train it on the same VAE's latents (e.g. dit_t2i_guide for dit_t2i).")
    ours, theirs = weights_hash(pipe.vae), weights_hash(guide.vae)
    if ours != theirs:
        raise ValueError(f"The guide was trained on the latents of VAE {theirs}, this model on VAE {ours}: a guide "
                         "must work in the same latent space; train it on this model's VAE.")


def sigma_reach(pipe) -> float:
    """The largest noise level sigma a pipeline's model can be evaluated at: its schedule's sigma(t = 1)
    (inf at SNR 0) for a VP or flow model; any finite sigma for an EDM one."""
    if pipe.config.prediction == "edm":
        return math.inf
    return sigma_of_t(pipe.noise_schedule, 1.0).item()


def guide_denoiser(pipe, guide, sigma_top: float):
    """The guide's unguided x0-denoiser in `pipe`'s coordinate (t on its schedule, or sigma for EDM): as
    it is where both step the same schedule the same way, else through sigma (edm.sigma_denoiser,
    edm.time_denoiser). `sigma_top`, the grid's highest level, must be within the guide's reach."""
    g, main_edm, guide_edm = guide.x0_network(), pipe.config.prediction == "edm", guide.config.prediction == "edm"
    if main_edm == guide_edm and (main_edm or guide.noise_schedule is pipe.noise_schedule):
        return g
    reach = sigma_reach(guide)
    if not (sigma_top < reach or (sigma_top == reach and not math.isinf(reach))):
        raise ValueError(f"Sampling starts at sigma = {sigma_top:.4g}, beyond what the guide ({guide.config.prediction} "
                         f"on the {guide.config.schedule} schedule) reaches ({reach:.4g}): start lower (t_max < 1, "
                         f"or sigma_max <= {reach:.4g}), or use a guide of this model's prediction and schedule.")
    g_sigma = g if guide_edm else sigma_denoiser(g, guide.noise_schedule)
    return g_sigma if main_edm else time_denoiser(g_sigma, pipe.noise_schedule)


def level_alpha_sigma(schedule, space: str):
    """level [B] -> (alpha, sigma) [B, 1, 1, 1] of x = alpha x0 + sigma n where a sampler steps `space`: "t"
    on `schedule`, or "sigma" (EDM's x = x0 + sigma n)."""
    if space == "sigma":
        return lambda sigma: (torch.ones_like(sigma).view(-1, 1, 1, 1), sigma.view(-1, 1, 1, 1))
    return lambda t: schedule.alpha_sigma(t.view(-1, 1, 1, 1))


def check_init(init_latents, strength, mask, shape: tuple, device, name: str = "init_latents") -> tuple:
    """(init_latents, strength, mask) checked and shaped for a batch of `shape` [B, C, h, w]: float32 on
    `device`, batch 1 expanded to B; strength defaults to 1 with init_latents (called `name` in errors)."""
    if init_latents is None:
        if strength is not None or mask is not None:
            raise ValueError(f"{'strength' if strength is not None else 'mask'} edits an input: pass its scaled "
                             "latents as init_latents (pipe.vae.encode_to_latents(images in [-1, 1])).")
        return None, None, None
    strength = 1.0 if strength is None else float(strength)
    check_strength(strength)
    if not torch.is_tensor(init_latents) or init_latents.ndim != 4 or init_latents.shape[1:] != shape[1:] \
            or init_latents.shape[0] not in (1, shape[0]):
        got = list(init_latents.shape) if torch.is_tensor(init_latents) else type(init_latents).__name__
        raise ValueError(f"{name} are the input's scaled latents [{shape[0]} or 1, {', '.join(map(str, shape[1:]))}] "
                         f"(pipe.vae.encode_to_latents of images [B, 1, 32, 32] in [-1, 1]), got {got}.")
    init_latents = init_latents.to(device, torch.float32).expand(shape)
    if mask is not None:
        mask = check_mask(torch.as_tensor(mask).to(device), init_latents).expand(shape[0], 1, *shape[2:])
    return init_latents, strength, mask

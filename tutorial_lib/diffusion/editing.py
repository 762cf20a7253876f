"""Editing with a trained denoiser: image-to-image, inpainting and DDIM inversion, over a sampler's grid.

A sampler integrates from noise at levels[0] down to the data at levels[-1] = 0 (samplers.py). Each
edit changes where it starts or what it holds fixed, not the sampler:

image-to-image (SDEdit, Meng et al., 2022): noise the input x0 to an intermediate level of the grid
and run the rest of it,
    x_start = alpha_l x0 + sigma_l n,    l = levels[first],    first = N - min(int(N * strength), N)
(`first_step`: diffusers' StableDiffusionImg2ImgPipeline.get_timesteps, so the last int(N strength)
of N steps run). strength 0 returns the input, strength 1 starts at the top of the grid, where at
SNR 0 (alpha = 0) x_start is the noise itself and the result is sampling from noise with that seed;
where the grid starts at SNR > 0 (an EDM sigma_max of 80, Stable Diffusion's betas) alpha x0 leaves
a trace of the input, as in diffusers. In EDM's sigma coordinate alpha = 1, sigma = the level.

inpainting by latent blending (`inpainting_denoiser`): with a mask m (1 = regenerate, 0 = keep), at
every level the kept region of the state is replaced by the input noised to that level with the same
noise, q_l = alpha_l x0 + sigma_l n, and the estimate there by x0 itself. A deterministic sampler's
step from q_t with x0_hat = x0 lands on q_s exactly (DDIM: eps_hat = n), a stochastic one on another
draw of q(x_s | x0), which the next evaluation replaces by q_s; the last step returns x0_hat, which
is x0 in the kept region, exactly. This is the blend of RePaint (Lugmayr et al., 2022, "RePaint:
Inpainting using Denoising Diffusion Probabilistic Models") without its resampling: RePaint also
jumps back up by a few levels (re-noising the blend) and denoises again, U times per level, to let
the generated region harmonise with the kept one; we step once per level. Stable Diffusion's
inpainting model does something else: a UNet fine-tuned with the mask and the masked image's latent
as 5 extra input channels (9 in all), so the network itself sees what to keep. Blending needs no
training and works with any model here, at the price of seams where the model never learns that the
regions must agree.

DDIM inversion (`invert_ddim`): the deterministic DDIM update (Song, Meng & Ermon, 2021) run upwards,
from the data at t = 0 to the top of the grid, gives the noise that DDIM (eta = 0, the same grid and
guidance) maps back to (nearly) the input: the ODE is invertible, and the only error is that each
step evaluates the denoiser at the level it goes to on the state it comes from
(`ddim_inversion_step`). Mokady et al. (2023, "Null-text Inversion for Editing Real Images using
Guided Diffusion Models") name it and show that it reconstructs at guidance 1 but drifts under
classifier-free guidance, which they correct by optimising the null embedding.
"""

from __future__ import annotations

import torch

from .schedules import Schedule


def check_strength(strength: float):
    if not 0 <= strength <= 1:
        raise ValueError(f"strength is the fraction of the sampling steps that run, in [0, 1] (0: the input "
                         f"unchanged, 1: from noise), got {strength}.")


def first_step(num_inference_steps: int, strength: float) -> int:
    """Where image-to-image starts in a grid of N = `num_inference_steps` steps: the index of its level,
    so that the last int(N strength) steps run. diffusers' StableDiffusionImg2ImgPipeline.get_timesteps:
        init_timestep = min(int(N strength), N),    t_start = max(N - init_timestep, 0).
    (int truncates: strength 0.29 of 100 steps runs 28, as there.)"""
    check_strength(strength)
    return max(num_inference_steps - min(int(num_inference_steps * strength), num_inference_steps), 0)


def noised(x0: torch.Tensor, noise: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """alpha x0 + sigma n, computed in the coefficients' dtype (float64 on a sampler's grid) and returned
    in x0's: at SNR 0 (alpha = cos(pi / 2) = 6e-17) that is the noise itself, bit for bit."""
    dtype = torch.promote_types(torch.as_tensor(alpha).dtype, x0.dtype)
    return (alpha * x0.to(dtype) + sigma * noise.to(dtype)).to(x0.dtype)


def check_mask(mask: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """An inpainting mask [B or 1, 1, h, w] of 0s and 1s at the latents' [B, C, h, w] resolution, as float."""
    b, _, h, w = latents.shape
    if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[2:] != (h, w) or mask.shape[0] not in (1, b):
        raise ValueError(f"The mask is [B or 1, 1, h, w] at the latents' resolution, here [{b} or 1, 1, {h}, {w}] "
                         f"(1 = regenerate, 0 = keep), got {list(mask.shape)}; downsample an image-resolution "
                         f"mask to the latent grid first (e.g. max-pool it by the VAE's factor).")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("The mask holds 1 (regenerate) or 0 (keep) only; threshold a soft mask first, e.g. "
                         "(mask > 0.5).float().")
    return mask.to(latents.dtype)


def inpainting_denoiser(denoiser, x0: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor, alpha_sigma):
    """Latent blending around an x0-denoiser `denoiser(x, level, cond)` (the module docstring): with
    q = alpha x0 + sigma n at the level (`alpha_sigma(level [B])` -> alpha, sigma broadcast over x),
        D'(x, level) = m D(m x + (1 - m) q, level) + (1 - m) x0,
    m = `mask` (1 = regenerate, 0 = keep), x0 the input latents, n the noise sampling started from."""
    keep = 1 - mask

    def denoise(x: torch.Tensor, level: torch.Tensor, cond=None) -> torch.Tensor:
        q = noised(x0, noise, *alpha_sigma(level))
        x0_hat = denoiser(mask * x + keep * q.to(x.dtype), level, cond)
        return mask * x0_hat + keep * x0.to(x0_hat.dtype)

    return denoise


def ddim_inversion_step(x: torch.Tensor, x0_hat: torch.Tensor, s, t, schedule: Schedule) -> torch.Tensor:
    """One DDIM step up, from x at level s to level t > s, with x0_hat = D(x, t): the denoiser
    evaluated at the level it goes to on the state it comes from (x_s ~ x_t for small steps), so
    that it never runs at s = 0. Its noise estimate at t, then DDIM's update (eq. 12, eta = 0)
    written from s:
        eps_hat = (x - alpha_t x0_hat) / sigma_t,
        x_t = alpha_t (x - sigma_s eps_hat) / alpha_s + sigma_t eps_hat.
    For an eps network eps_hat is its output and this is diffusers' DDIMInverseScheduler.step."""
    (alpha_s, sigma_s), (alpha_t, sigma_t) = schedule.alpha_sigma(s), schedule.alpha_sigma(t)
    eps_hat = (x - alpha_t * x0_hat) / sigma_t
    return (alpha_t * (x - sigma_s * eps_hat) / alpha_s + sigma_t * eps_hat).to(x.dtype)


@torch.no_grad()
def invert_ddim(denoiser, x0: torch.Tensor, ts: torch.Tensor, cond=None, callback=None, *,
                schedule: Schedule) -> torch.Tensor:
    """DDIM inversion: from the data x0 at ts[-1] = 0 up the strictly decreasing grid `ts` (as the
    samplers take it) to x at ts[0], with `ddim_inversion_step`; `samplers.sample_ddim` (eta = 0) on the
    same grid, denoiser and cond maps it back to about x0. callback(i, t, x, x0_hat) sees each step,
    from the bottom."""
    if ts.ndim != 1 or len(ts) < 2 or not (ts[1:] < ts[:-1]).all() or ts[-1] != 0:
        raise ValueError("DDIM inversion runs up a strictly decreasing grid that ends at the data, t = 0, "
                         "e.g. schedule.grid(steps).")
    x = x0
    for i, (s, t) in enumerate(zip(ts.flip(0)[:-1], ts.flip(0)[1:])):
        x0_hat = denoiser(x, t.expand(x.shape[0]).to(x.device), cond)
        if callback is not None:
            callback(i, t, x, x0_hat)
        x = ddim_inversion_step(x, x0_hat, s, t, schedule)
    return x

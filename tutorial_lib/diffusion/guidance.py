"""Guidance as a wrapper around an x0-denoiser: classifier-free guidance and three variants.

Every form here moves the conditional estimate away from a reference estimate,

    D_guided(x, t) = D_ref(x, t) + w * (D(x, t | cond) - D_ref(x, t)),

w = guidance_scale (1: the conditional prediction, w > 1 trades diversity for fidelity):

    classifier-free guidance (Ho & Salimans, 2022): D_ref = D(x, t | null), the same network on the
        condition training dropped to; a negative prompt puts its own embedding there instead (the
        "negative prompt" of Stable Diffusion's front ends: guidance pushes away from it).
    autoguidance (Karras et al., 2024, "Guiding a Diffusion Model with a Bad Version of Itself"):
        D_ref = D_guide(x, t | cond), a smaller and/or less-trained
        model of the same data, on the SAME condition. Its errors are those of the main model, only
        larger, so the difference points along what the main model does better, without CFG's loss
        of diversity.
    guidance interval (Kynkäänniemi et al., 2024, "Applying Guidance in a Limited Interval Improves
        Sample and Distribution Quality in Diffusion Models"): w applies only where the noise level
        sigma = sigma_t / alpha_t lies in (sigma_lo, sigma_hi], elsewhere w = 1 (the conditional
        prediction alone, one network evaluation): guidance at high noise is what collapses diversity,
        at low noise it barely matters.
    guidance rescale (Lin et al., 2024, "Common Diffusion Noise Schedules and Sample Steps are
        Flawed", Sec. 3.4, eqs. 15-16): strong guidance inflates the prediction's std; rescale it, per
        sample, to the conditional prediction's std and blend by phi:
            D_rescaled = D_guided * std(D_cond) / std(D_guided),
            D_final = phi D_rescaled + (1 - phi) D_guided.
        Applied here in x0 space, to the denoiser's estimate x0_hat, for every model (the paper applies
        it to its v-prediction model's output; diffusers' `rescale_noise_cfg` to the eps prediction).
        The combination above is affine with weights summing to 1, so guiding x0, eps, v or EDM's F gives
        the same x0_hat; the rescale is not, so where it is applied matters: the std of x0_hat is the
        image's, which is what over-exposure inflates.

All of them act on an x0-denoiser D(x, level, cond) -> x0_hat in any coordinate (t on a schedule, or
EDM's sigma); `sigma_of(level)` tells the interval where a level lies. The conditional and the
null/negative branch run as one batch of 2B; guidance applies to every latent channel.
"""

from __future__ import annotations

import math

import torch


def check_guidance(guidance_scale: float, interval=None, rescale: float = 0.0):
    """Clear errors for guidance settings `cfg_denoiser` cannot use."""
    if not math.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale must be finite (1: no guidance), got {guidance_scale}.")
    if interval is not None:
        if len(interval) != 2:
            raise ValueError(f"guidance_interval is (sigma_lo, sigma_hi), two noise levels, got {interval!r}.")
        lo, hi = (float(v) for v in interval)
        if not 0 <= lo <= hi:
            raise ValueError(f"guidance_interval (sigma_lo, sigma_hi) needs 0 <= sigma_lo <= sigma_hi, got "
                             f"({lo}, {hi}); give the lower noise level first, e.g. (0.28, 5.42) (Kynkäänniemi "
                             f"et al., 2024, EDM2-XXL); sigma_hi may be inf.")
    if not 0 <= rescale <= 1:
        raise ValueError(f"guidance_rescale phi blends the rescaled prediction in: 0 <= phi <= 1 (0: off; Lin et "
                         f"al. use 0.7), got {rescale}.")


def in_interval(sigma: torch.Tensor, interval) -> torch.Tensor:
    """Which levels sigma [B] lie in the guidance interval (sigma_lo, sigma_hi] (Kynkäänniemi et al.,
    2024): bool [B]. sigma = inf (SNR 0) lies in it only for sigma_hi = inf."""
    lo, hi = interval
    return (sigma > lo) & (sigma <= hi)


def rescale_guidance(guided: torch.Tensor, conditional: torch.Tensor, phi: float) -> torch.Tensor:
    """Lin et al. (2024), eqs. 15-16: the guided prediction [B, ...] rescaled to the conditional one's
    std (per sample, over all its other axes) and blended with it by phi,
        phi * guided * std(conditional) / std(guided) + (1 - phi) * guided."""
    if phi == 0:
        return guided
    dims = tuple(range(1, guided.ndim))
    ratio = conditional.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)
    return phi * guided * ratio + (1 - phi) * guided


def cfg_denoiser(denoiser, guidance_scale: float, concat_cond=None, *, reference=None, sigma_of=None,
                 interval=None, rescale: float = 0.0):
    """Wrap the x0-denoiser `denoiser(x, level, cond)` so that `cond = (cond, ref_cond)` is guided
    with `guidance_scale` (the module docstring):

    reference None   classifier-free guidance: ref_cond is the null (or a negative prompt's)
                     condition, run through `denoiser` in one batch with cond, joined by
                     `concat_cond(cond, ref_cond)` (their type is the denoiser's business)
    reference        autoguidance: D_ref = reference(x, level, ref_cond), a guide model's x0-denoiser
                     in the same coordinate and ref_cond its own embedding of the same prompts
    interval         (sigma_lo, sigma_hi): guide only where sigma_of(level) [B] lies in it
    rescale          phi of `rescale_guidance`, 0 (off) to 1

    Where w = 1 or no item's level is in the interval, only the conditional branch runs."""
    check_guidance(guidance_scale, interval, rescale)
    if interval is not None and sigma_of is None:
        raise ValueError("A guidance interval needs sigma_of(level), the noise level sigma of the denoiser's level.")

    def guided(x: torch.Tensor, level: torch.Tensor, cond_pair):
        cond, ref_cond = cond_pair
        active = None if interval is None else in_interval(sigma_of(level), interval).to(x.device)
        if guidance_scale == 1.0 or (active is not None and not bool(active.any())):
            return denoiser(x, level, cond)
        if reference is None:
            both = denoiser(torch.cat([x, x]), torch.cat([level, level]), concat_cond(cond, ref_cond))
            conditional, ref = both.chunk(2)
        else:
            conditional, ref = denoiser(x, level, cond), reference(x, level, ref_cond)
        out = rescale_guidance(ref + guidance_scale * (conditional - ref), conditional, rescale)
        if active is not None:  # items outside the interval: w = 1
            out = torch.where(active.view(-1, *([1] * (x.ndim - 1))), out, conditional)
        return out

    return guided

"""Classifier-free guidance (Ho & Salimans, 2022) as a wrapper around a denoiser.

    D_guided(x, t) = D(x, t, null) + w * (D(x, t, cond) - D(x, t, null))

w = guidance_scale: 1 gives the conditional prediction, 0 the unconditional one, w > 1 trades
diversity for fidelity. `null` must be exactly the condition training dropped to. Both branches
run as one batch of 2B, and guidance applies to every latent channel.
"""

from __future__ import annotations

import torch


def cfg_denoiser(denoiser, guidance_scale: float, concat_cond):
    """Wrap `denoiser(x, t, cond)` so that `cond = (cond, null)` is guided with `guidance_scale`.

    `concat_cond(cond, null)` joins the two conditions along the batch (their type is the
    denoiser's business: token embeddings, labels, ...).
    """
    def guided(x: torch.Tensor, t: torch.Tensor, cond_pair):
        cond, null = cond_pair
        if guidance_scale == 1.0:
            return denoiser(x, t, cond)
        out = denoiser(torch.cat([x, x]), torch.cat([t, t]), concat_cond(cond, null))
        conditional, unconditional = out.chunk(2)
        return unconditional + guidance_scale * (conditional - unconditional)

    return guided

"""Notebook 03's exercises: the shortcut and a planted bug for each."""

import torch

from tutorial_lib.diffusion.guidance import cfg_denoiser
from tutorial_lib.exercises import dit
from tutorial_lib.models.dit import DiT, DiTConfig
from tutorial_lib.models.layers import timestep_embedding

from . import Exercise

NOTEBOOK = "03_dit_classifier_free_guidance"


def _sine_first(t, dim):  # the halves in the other order, as in Vaswani et al.'s text embedding
    args = 1000.0 * t.double()[:, None] * 10_000.0 ** (-torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    return torch.cat([args.sin(), args.cos()], dim=1)


def _library_init(block):  # copy a fresh DiT's first block: DiT's own initialisation
    block.load_state_dict(DiT(DiTConfig(hidden_size=32, depth=1, num_heads=4, text_dim=24)).blocks[0].state_dict())


def _gates_only(block):  # forgets the cross-attention, the one branch without a gate
    torch.nn.init.zeros_(block.adaLN_modulation[-1].weight)
    torch.nn.init.zeros_(block.adaLN_modulation[-1].bias)


def _exact_denoiser(alpha, sigma, means, s):  # D(x, t, class) for the shortcut, a class of -1 = unconditional
    def denoiser(x, t, c):
        var_t = alpha**2 * s**2 + sigma**2
        per_class = means[:, None] + alpha * s**2 / var_t * (x[None] - alpha * means[:, None])
        posterior = (-(x[None] - alpha * means[:, None]) ** 2 / (2 * var_t)).softmax(0)
        mixed = (posterior * per_class).sum(0)
        return torch.where(c >= 0, per_class[c.clamp(min=0), torch.arange(len(x))], mixed)
    return denoiser


def _library_cfg(x_t, alpha, sigma, c, w, means, s):
    guided = cfg_denoiser(_exact_denoiser(alpha, sigma, means, s), w, lambda a, b: torch.cat([a, b]))
    n = len(x_t)
    return guided(x_t, torch.zeros(n), (torch.full((n,), c), torch.full((n,), -1)))


def _equal_average(x_t, alpha, sigma, c, w, means, s):  # the unconditional as a plain mean over classes
    var_t = alpha**2 * s**2 + sigma**2
    per_class = means[:, None] + alpha * s**2 / var_t * (x_t[None] - alpha * means[:, None])
    unconditional = per_class.mean(0)
    return unconditional + w * (per_class[c] - unconditional)


EXERCISES = [
    Exercise(dit.check_timestep_embedding, "timestep_embedding_from_scratch",
             shortcut=lambda t, dim: timestep_embedding(t, dim), bug=_sine_first, hint="the cosines come first"),
    Exercise(dit.check_adaln_zero, "adaln_zero_", shortcut=_library_init, bug=_gates_only, hint="cross_attn.out"),
    Exercise(dit.check_guided_mixture, "guided_mixture_x0", shortcut=_library_cfg, bug=_equal_average,
             hint="not an equal average", predicts=True),
]

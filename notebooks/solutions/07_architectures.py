"""Worked solutions to notebook 07's exercises (run through their checks by tests/test_exercises.py)."""

from tutorial_lib.train.lora import targeted


def adaln_single_saving(cfg):
    """Each block's adaLN MLP D -> 6D and the final layer's D -> 2D go; one shared D -> 6D MLP and the
    tables [6, D] per block and [2, D] for the final layer come."""
    d, depth = cfg.hidden_size, cfg.depth + cfg.mixer_depth
    removed = depth * (6 * d * d + 6 * d) + (2 * d * d + 2 * d)
    added = (6 * d * d + 6 * d) + depth * 6 * d + 2 * d
    return removed - added


def lora_parameters(denoiser, rank, targets):
    """A [r, d_in] and B [d_out, r] for every targeted linear layer."""
    layers = [denoiser.get_submodule(name) for name in targeted(denoiser, targets)]
    return sum(rank * (layer.in_features + layer.out_features) for layer in layers)

"""Notebook 03's exercises: patchify, and choosing the guidance scale by FID."""

from __future__ import annotations

import torch

from . import exercise_check


@exercise_check(refuses=[])
def check_patchify(answer) -> str | None:
    """answer(x [B, C, H, W], p) -> [B, (H/p)(W/p), p*p*C], patches in raster order, each flattened as
    (row in patch, column in patch, channel): the inverse of the DiT's unpatchify."""
    g = torch.Generator().manual_seed(0)
    for p in (1, 2, 4):
        x = torch.randn(2, 3, 8, 12, generator=g)
        b, c, hh, ww = x.shape
        h, w = hh // p, ww // p
        want = torch.einsum("bchpwq->bhwpqc", x.reshape(b, c, h, p, w, p)).reshape(b, h * w, p * p * c)
        got = torch.as_tensor(answer(x, p))
        if got.shape != want.shape:
            return f"patch {p}: expected shape {tuple(want.shape)}, got {tuple(got.shape)}."
        if not torch.equal(got, want):
            return f"patch {p}: the right shape, the wrong order; the DiT unpatchifies with einsum('bhwpqc->bchpwq')."
    return None


@exercise_check(refuses=[])
def check_best_scale_by_fid(answer) -> str | None:
    """answer(sweep: list of {"guidance_scale", "class_accuracy", "fid"}) -> the scale with the lowest FID
    (ties: the higher accuracy)."""
    sweep = [{"guidance_scale": w, "class_accuracy": a, "fid": f}
             for w, a, f in [(1.0, 0.84, 0.53), (1.5, 0.94, 0.21), (2.0, 0.97, 0.21), (4.5, 1.0, 0.55)]]
    got = answer(sweep)
    if got != 2.0:
        return f"expected 2.0 (FID 0.21, tied with 1.5 but more accurate), got {got}."
    if answer(sweep[:1]) != 1.0:
        return "a sweep of one scale must return that scale."
    return None

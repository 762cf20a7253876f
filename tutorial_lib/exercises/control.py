"""Notebook 08's exercises: DDIM inversion's round trip under guidance (with a prediction), inpainting as a
denoiser wrapper (so that any sampler inpaints), and CFG rescale in the v coordinate (where Lin et al.
applied it)."""

from __future__ import annotations

import torch

from ..diffusion.editing import ddim_inversion_step, inpainting_denoiser, invert_ddim
from ..diffusion.guidance import rescale_guidance
from ..diffusion.schedules import COSINE
from . import exercise_check


def _gaussian_x0(mean: float, sd: float):
    """The exact x0-denoiser of data N(mean, sd^2) per coordinate on the cosine schedule, x0_hat(x, t) with
    a 0-dim level t: E[x0 | x_t] = mean + alpha sd^2 / (alpha^2 sd^2 + sigma^2) (x_t - alpha mean)."""
    def x0_hat(x, t):
        a, s = COSINE.alpha_sigma(torch.as_tensor(t, dtype=torch.float64))
        return (mean + a * sd**2 / (a**2 * sd**2 + s**2) * (x - a * mean)).to(x.dtype)
    return x0_hat


def _guided(w: float):
    """CFG between two exact Gaussian denoisers: 'conditional' N(1, 0.5^2), 'unconditional' N(0, 1)."""
    cond, uncond = _gaussian_x0(1.0, 0.5), _gaussian_x0(0.0, 1.0)
    return lambda x, t: uncond(x, t) + w * (cond(x, t) - uncond(x, t))


def _round_trip_reference(x0_hat, z, ts, evaluate_at_target: bool = True):
    """Up the grid with DDIM's step run backwards (x0_hat at the level the step goes to), then DDIM down."""
    x, up = z, ts.flip(0)
    for s, t in zip(up[:-1], up[1:]):
        (a_s, s_s), (a_t, s_t) = COSINE.alpha_sigma(s), COSINE.alpha_sigma(t)
        x0 = x0_hat(x, t if evaluate_at_target else s)
        eps = (x - a_t * x0) / s_t
        x = a_t * (x - s_s * eps) / a_s + s_t * eps
    for t, s in zip(ts[:-1], ts[1:]):
        x0 = x0_hat(x, t)
        if s == 0:
            return x0
        (a_t, s_t), (a_s, s_s) = COSINE.alpha_sigma(t), COSINE.alpha_sigma(s)
        x = a_s * x0 + s_s * (x - a_t * x0) / s_t
    return x


@exercise_check(refuses=[invert_ddim, ddim_inversion_step])
def check_round_trip(answer) -> str | None:
    """answer(x0_hat, z, ts) -> DDIM inversion of z up the sampling grid ts, then DDIM back down: the
    reconstruction. Checked on 1-D Gaussian data with exact denoisers, unguided and guided."""
    g = torch.Generator().manual_seed(0)
    for steps, w in [(5, 1.0), (12, 1.0), (12, 3.0), (25, 3.0)]:
        z = (1.0 + 0.5 * torch.randn(16, 1, 2, 2, generator=g)).float()
        ts = COSINE.grid(steps)
        x0_hat = _guided(w)
        want = _round_trip_reference(x0_hat, z, ts)
        got = torch.as_tensor(answer(x0_hat, z.clone(), ts))
        if got.shape != z.shape:
            return f"the reconstruction has the input's shape {tuple(z.shape)}, got {tuple(got.shape)}."
        if torch.allclose(got.double(), want.double(), rtol=1e-4, atol=1e-4):
            continue
        if torch.allclose(got.double(), _round_trip_reference(x0_hat, z, ts, False).double(), rtol=1e-4, atol=1e-4):
            return ("the inversion evaluates x0_hat at the level the step comes from; evaluate it at the level the "
                    "step goes to (at t = 0 the estimate would be the input itself, and the first step would "
                    "learn nothing).")
        if torch.allclose(got.double(), z.double(), atol=1e-5):
            return "the answer returns its input unchanged: invert up the whole grid, then sample back down."
        return (f"{steps} steps, w = {w:g}: differs from the reference by {(got - want).abs().max().item():.2g}. "
                "Up: eps = (x - alpha_t x0_hat) / sigma_t, then x_t = alpha_t (x - sigma_s eps) / alpha_s + sigma_t eps; "
                "down: DDIM, returning x0_hat on the step onto t = 0.")
    return None


def _test_network(x, t, cond=None):
    """A nonlinear stand-in for a network's x0 estimate that mixes neighbouring positions (as attention and
    convolutions do), so that what it is fed in the kept region matters to the regenerated one."""
    shift = 0.0 if cond is None else cond
    mixed = 0.8 * x + 0.4 * x.roll(1, dims=-1) + 0.3 * x.roll(1, dims=-2) + 0.2 * x.mean(dim=(-2, -1), keepdim=True)
    return torch.tanh(mixed + shift) * (1 - 0.5 * t.view(-1, *[1] * (x.ndim - 1)).to(x.dtype))


def _inpainting_reference(denoiser, z, noise, mask, x, t, cond):
    a, s = COSINE.alpha_sigma_like(t, x)
    q = (a * z.double() + s * noise.double()).to(x.dtype)
    return mask * denoiser(mask * x + (1 - mask) * q, t, cond) + (1 - mask) * z


@exercise_check(refuses=[inpainting_denoiser])
def check_inpainting_denoiser(answer) -> str | None:
    """answer(denoiser, z, noise, mask, schedule) -> D'(x, t [B], cond): inpainting moved into the denoiser,
    D' = m D(m x + (1 - m)(alpha_t z + sigma_t noise), t) + (1 - m) z, m = mask (1 = regenerate)."""
    g = torch.Generator().manual_seed(1)
    for batch, mask_batch, cond in [(4, 1, None), (3, 3, 0.3), (5, 1, -0.2)]:
        z, noise = torch.randn(batch, 4, 8, 8, generator=g), torch.randn(batch, 4, 8, 8, generator=g)
        mask = (torch.rand(mask_batch, 1, 8, 8, generator=g) > 0.5).float()
        wrapped = answer(_test_network, z, noise, mask, COSINE)
        for level in (0.9, 0.5, 0.1):
            x = torch.randn(batch, 4, 8, 8, generator=g)
            t = torch.full((batch,), level, dtype=torch.float64)
            want = _inpainting_reference(_test_network, z, noise, mask, x, t, cond)
            got = torch.as_tensor(wrapped(x.clone(), t, cond))
            if got.shape != want.shape:
                return f"D' returns x0 estimates shaped like x, {tuple(x.shape)}; got {tuple(got.shape)}."
            if torch.allclose(got, want, rtol=1e-5, atol=1e-5):
                continue
            kept, regen = (mask == 0).expand_as(x), (mask == 1).expand_as(x)
            if not torch.allclose(got[kept], want[kept], atol=1e-5):
                return ("the kept region (mask 0) of the estimate is wrong: there the estimate is the input z itself, "
                        "so that the sampler lands exactly on the input.")
            if torch.allclose(got[regen], (mask * _test_network(x, t, cond))[regen], atol=1e-5):
                return ("the network sees x unchanged: feed it the kept region noised to the level, "
                        "m x + (1 - m)(alpha_t z + sigma_t noise), so that what it sees of the input is as noisy as x.")
            return (f"t = {level}: the regenerated region differs by {(got - want)[regen].abs().max().item():.2g}; "
                    "noise the input with the schedule's alpha_t, sigma_t at each item's level t [B] and the noise "
                    "sampling started from.")
    return None


def _rescale_in_v_reference(x, t, x0_cond, x0_guided, phi, schedule, per_sample: bool = True):
    a, s = schedule.alpha_sigma_like(t, x)
    to_v = lambda x0: a * (x - a * x0) / s - s * x0  # v = alpha eps - sigma x0, eps from x0
    v_c, v_g = to_v(x0_cond.double()), to_v(x0_guided.double())
    dims = tuple(range(1, x.ndim)) if per_sample else tuple(range(x.ndim))
    v = phi * v_g * v_c.std(dim=dims, keepdim=True) / v_g.std(dim=dims, keepdim=True) + (1 - phi) * v_g
    return (a * x.double() - s * v).to(x.dtype)  # x0 = alpha x - sigma v (alpha^2 + sigma^2 = 1)


@exercise_check(refuses=[rescale_guidance])
def check_rescale_in_v(answer) -> str | None:
    """answer(x, t [B], x0_cond, x0_guided, phi, schedule) -> x0_hat: CFG rescale (Lin et al., 2024, Sec. 3.4)
    applied to v = alpha eps - sigma x0, not to x0, then converted back to x0."""
    g = torch.Generator().manual_seed(2)
    for batch, phi in [(4, 0.7), (3, 1.0), (5, 0.0), (2, 0.5)]:
        x = torch.randn(batch, 4, 8, 8, generator=g)
        t = torch.rand(batch, generator=g, dtype=torch.float64) * 0.9 + 0.05
        x0_cond = 0.8 * torch.randn(batch, 4, 8, 8, generator=g)
        x0_guided = x0_cond + 2.5 * torch.randn(batch, 4, 8, 8, generator=g) * torch.linspace(0.3, 1.5, batch).view(-1, 1, 1, 1)
        want = _rescale_in_v_reference(x, t, x0_cond, x0_guided, phi, COSINE)
        got = torch.as_tensor(answer(x.clone(), t, x0_cond.clone(), x0_guided.clone(), phi, COSINE))
        if got.shape != want.shape:
            return f"return x0_hat shaped like x, {tuple(x.shape)}; got {tuple(got.shape)}."
        scale = want.abs().max().item()
        if torch.allclose(got, want, rtol=1e-4, atol=1e-4 * scale):
            continue
        dims = tuple(range(1, x.ndim))
        in_x0 = phi * x0_guided * x0_cond.std(dim=dims, keepdim=True) / x0_guided.std(dim=dims, keepdim=True) \
            + (1 - phi) * x0_guided
        if torch.allclose(got, in_x0, rtol=1e-4, atol=1e-4 * scale):
            return "that is the rescale in x0 space (the library's); convert both estimates to v first, rescale v, convert back."
        global_std = _rescale_in_v_reference(x, t, x0_cond, x0_guided, phi, COSINE, per_sample=False)
        if torch.allclose(got, global_std, rtol=1e-4, atol=1e-4 * scale):
            return "the std is taken over the whole batch; take it per sample (over each item's channels and pixels)."
        return (f"phi {phi:g}: differs by {(got - want).abs().max().item():.2g}. v = alpha eps - sigma x0 with "
                "eps = (x - alpha x0) / sigma; rescale the guided v to the conditional v's per-sample std, blend by "
                "phi, and return x0 = alpha x - sigma v.")
    return None

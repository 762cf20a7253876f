"""Worked solutions to notebook 08's exercises (run through their checks by tests/test_exercises.py)."""

from tutorial_lib.diffusion.schedules import COSINE


def round_trip(x0_hat, z, ts):
    schedule = COSINE  # the notebook passes its own SCHEDULE (the same cosine schedule)
    x, up = z, ts.flip(0)
    for s, t in zip(up[:-1], up[1:]):  # DDIM inversion: from s up to t, x0_hat at t
        (a_s, s_s), (a_t, s_t) = schedule.alpha_sigma(s), schedule.alpha_sigma(t)
        x0 = x0_hat(x, t)
        eps = (x - a_t * x0) / s_t
        x = a_t * (x - s_s * eps) / a_s + s_t * eps
    for t, s in zip(ts[:-1], ts[1:]):  # DDIM back down
        x0 = x0_hat(x, t)
        if s == 0:
            return x0
        (a_t, s_t), (a_s, s_s) = schedule.alpha_sigma(t), schedule.alpha_sigma(s)
        x = a_s * x0 + s_s * (x - a_t * x0) / s_t
    return x


def inpainting_wrapper(denoiser, z, noise, mask, schedule):
    def wrapped(x, t, cond=None):
        alpha, sigma = schedule.alpha_sigma_like(t, x)
        kept_noised = (alpha * z + sigma * noise).to(x.dtype)
        x0 = denoiser(mask * x + (1 - mask) * kept_noised, t, cond)
        return mask * x0 + (1 - mask) * z

    return wrapped


def rescale_in_v(x, t, x0_cond, x0_guided, phi, schedule):
    alpha, sigma = schedule.alpha_sigma_like(t, x)
    v_cond = (alpha * x - x0_cond) / sigma  # v = alpha eps - sigma x0 = (alpha x - x0) / sigma
    v_guided = (alpha * x - x0_guided) / sigma
    std = lambda v: v.std(dim=tuple(range(1, v.ndim)), keepdim=True)  # noqa: E731
    v = phi * v_guided * std(v_cond) / std(v_guided) + (1 - phi) * v_guided
    return (alpha * x - sigma * v).to(x.dtype)


"""Notebook 08's exercises: the shortcut and a planted bug for each."""

from tutorial_lib.diffusion.editing import inpainting_denoiser, invert_ddim
from tutorial_lib.diffusion.guidance import rescale_guidance
from tutorial_lib.diffusion.samplers import sample_ddim
from tutorial_lib.diffusion.schedules import COSINE
from tutorial_lib.exercises import control

from . import Exercise

NOTEBOOK = "08_controlling_a_trained_model"


def _library_round_trip(x0_hat, z, ts):
    denoiser = lambda x, t, cond=None: x0_hat(x, t[0])  # noqa: E731
    return sample_ddim(denoiser, invert_ddim(denoiser, z, ts, schedule=COSINE), ts, schedule=COSINE)


def _evaluated_where_it_comes_from(x0_hat, z, ts):  # the inversion's estimate at the lower level
    return control._round_trip_reference(x0_hat, z, ts, evaluate_at_target=False)


def _library_inpainting(denoiser, z, noise, mask, schedule):
    return inpainting_denoiser(denoiser, z, noise, mask, lambda t: schedule.alpha_sigma(t.view(-1, 1, 1, 1)))


def _network_sees_x_unchanged(denoiser, z, noise, mask, schedule):
    return lambda x, t, cond=None: mask * denoiser(x, t, cond) + (1 - mask) * z


def _library_rescale_in_x0(x, t, x0_cond, x0_guided, phi, schedule):
    return rescale_guidance(x0_guided, x0_cond, phi)


def _std_over_the_batch(x, t, x0_cond, x0_guided, phi, schedule):
    alpha, sigma = schedule.alpha_sigma_like(t, x)
    v_cond, v_guided = (alpha * x - x0_cond) / sigma, (alpha * x - x0_guided) / sigma
    v = phi * v_guided * v_cond.std() / v_guided.std() + (1 - phi) * v_guided
    return (alpha * x - sigma * v).float()


EXERCISES = [
    Exercise(control.check_round_trip, "round_trip", shortcut=_library_round_trip, bug=_evaluated_where_it_comes_from,
             hint="the level the step goes to", predicts=True),
    Exercise(control.check_inpainting_denoiser, "inpainting_wrapper", shortcut=_library_inpainting,
             bug=_network_sees_x_unchanged, hint="feed it the kept region noised"),
    Exercise(control.check_rescale_in_v, "rescale_in_v", shortcut=_library_rescale_in_x0, bug=_std_over_the_batch,
             hint="per sample"),
]

"""Training-objective knobs: timestep distributions, min-SNR weights, offset noise, input perturbation,
and the trainer's defaults, which must be the recipe notebook 01 was trained with."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tutorial_lib.diffusion.losses import (TIMESTEP_DISTRIBUTIONS, min_snr_weight, offset_noise,
                                           perturb_input, sample_timesteps, weighted_mse)
from tutorial_lib.diffusion.parametrizations import PREDICTIONS, prediction_target
from tutorial_lib.diffusion.schedules import COSINE, FLOW, get_schedule, sample_beta

INF = float("inf")


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- min-SNR
@pytest.mark.parametrize("target", PREDICTIONS)
def test_min_snr_weights_are_finite_at_snr_zero_and_infinity(target):
    alpha, sigma = torch.tensor([1.0, 0.0, 0.6]), torch.tensor([0.0, 1.0, 0.8])  # SNR inf, 0, 0.5625
    w = min_snr_weight(alpha, sigma, target, gamma=5.0)
    assert torch.isfinite(w).all() and (w >= 0).all()
    at_inf, at_zero = {"x0": (5.0, 0.0), "eps": (0.0, 1.0), "v": (0.0, 0.0), "flow": (0.0, 0.0)}[target]
    assert w[0].item() == at_inf and w[1].item() == at_zero


@pytest.mark.parametrize("schedule", [COSINE, FLOW, get_schedule("scaled_linear")], ids=lambda s: s.name)
def test_min_snr_weights_are_one_weighting_in_x0_space(schedule):
    """w_target * |target error|^2 = min(SNR, gamma) * |x0 error|^2 for every target: measured by
    moving x0_hat at fixed x_t and converting."""
    t = torch.tensor([0.05, 0.3, 0.6, 0.95], dtype=torch.float64)
    alpha, sigma = schedule.alpha_sigma(t[:, None])
    g = _gen()
    x0, eps = torch.randn(2, 4, 6, generator=g, dtype=torch.float64)
    x0_hat = x0 + 0.1 * torch.randn(4, 6, generator=g, dtype=torch.float64)
    eps_hat = eps - alpha / sigma * (x0_hat - x0)  # the same x_t
    x0_loss = min_snr_weight(alpha, sigma, "x0", 2.0) * (x0_hat - x0).pow(2)
    for target in PREDICTIONS:
        error = prediction_target(target, x0_hat, eps_hat, alpha, sigma) - \
            prediction_target(target, x0, eps, alpha, sigma)
        torch.testing.assert_close(min_snr_weight(alpha, sigma, target, 2.0) * error.pow(2), x0_loss)


def test_weighted_mse():
    pred, target = torch.randn(2, 3, 4, 4, generator=_gen(0)), torch.randn(2, 3, 4, 4, generator=_gen(1))
    assert torch.equal(weighted_mse(pred, target), F.mse_loss(pred, target))
    torch.testing.assert_close(weighted_mse(pred, target, torch.ones(2)), F.mse_loss(pred, target))
    torch.testing.assert_close(weighted_mse(pred, target, torch.tensor([2.0, 0.0])),
                               F.mse_loss(pred[0], target[0]))


# ----------------------------------------------------------------------------- timesteps
@pytest.mark.parametrize("distribution", TIMESTEP_DISTRIBUTIONS)
def test_timestep_distributions_are_seeded_and_in_range(distribution):
    a, b = sample_timesteps(5000, distribution, _gen(3)), sample_timesteps(5000, distribution, _gen(3))
    assert torch.equal(a, b) and a.shape == (5000,) and ((a >= 0) & (a <= 1)).all()
    assert not torch.equal(a, sample_timesteps(5000, distribution, _gen(4)))


def test_timestep_distributions():
    n = 20_000
    assert torch.equal(sample_timesteps(n, "beta", _gen(), beta=(1.0, 2.5)), sample_beta(n, 1.0, 2.5, _gen()))
    assert sample_timesteps(n, "uniform", _gen()).mean().item() == pytest.approx(0.5, abs=0.01)
    t = sample_timesteps(n, "logit_normal", _gen(), logit_normal=(0.5, 1.0))
    assert t.median().item() == pytest.approx(torch.sigmoid(torch.tensor(0.5)).item(), abs=0.01)
    shifted = sample_timesteps(n, "logit_normal", _gen(), logit_normal=(0.5, 1.0), shift=3.0)
    assert (shifted >= t).all() and shifted.mean() > t.mean() + 0.1  # the same draws, biased to noise
    with pytest.raises(ValueError, match="Unknown timestep distribution 'normal'"):
        sample_timesteps(4, "normal")


# ----------------------------------------------------------------------------- noise
def test_offset_noise_adds_one_offset_per_item_and_channel():
    noise = torch.randn(4, 3, 8, 8, generator=_gen())
    offset = offset_noise(noise, 0.5, _gen(1)) - noise
    assert torch.allclose(offset, offset[..., :1, :1].expand_as(offset))
    assert offset[..., 0, 0].std().item() == pytest.approx(0.5, rel=0.5)


@pytest.mark.parametrize("knob", [offset_noise, perturb_input])
def test_noise_knobs_off_change_nothing_and_draw_nothing(knob):
    """Off (the default), they return the noise itself and leave the generator where it was, so the
    trainer's random stream and so its result are exactly those of the recipe without them."""
    noise, g = torch.randn(2, 3, 4, 4), _gen()
    state = g.get_state()
    assert knob(noise, 0.0, g) is noise and torch.equal(g.get_state(), state)
    assert not torch.equal(knob(noise, 0.1, g), noise)


def test_input_perturbation_scale():
    noise = torch.zeros(10_000, 8)
    assert perturb_input(noise, 0.1, _gen()).std().item() == pytest.approx(0.1, rel=0.05)


# ----------------------------------------------------------------------------- trainer
def _tiny_run(tmp_path, model, text, **objective):
    from tutorial_lib.train.text_to_image import Objective, TextToImageConfig, train_text_to_image
    from tutorial_lib.train.trainer import TrainerConfig

    g = _gen()
    latents, labels = torch.randn(32, 4, 8, 8, generator=g), torch.randint(0, 10, (32,), generator=g)
    cfg = TextToImageConfig(model=model, architecture="tiny_transformer", text_encoder="word",
                            text_encoder_kwargs={"dim": text.dim},
                            objective=Objective(prediction="x0", t_distribution="beta", **objective),
                            trainer=TrainerConfig(steps=3, batch_size=8, warmup_steps=1, log_every=1, checkpoint_every=None,
                                                  tensorboard=False, out_dir=str(tmp_path)))
    return [r["loss"] for r in train_text_to_image(cfg, latents, labels).history]


def test_the_objective_knobs_change_notebook_01s_training(tiny_denoiser_config, tiny_text_config, tmp_path):
    plain = _tiny_run(tmp_path / "plain", tiny_denoiser_config, tiny_text_config)
    knobs = _tiny_run(tmp_path / "knobs", tiny_denoiser_config, tiny_text_config, t_shift=2.0, min_snr_gamma=5.0,
                      offset_noise=0.1, input_perturbation=0.1)
    assert all(torch.isfinite(torch.tensor(knobs))) and knobs != plain

"""The VAE's loss terms and its training loop, on tiny inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tutorial_lib.train.vae import VAETrainConfig, train_vae
from tutorial_lib.vae.autoencoder import DiagonalGaussian, VAEConfig
from tutorial_lib.vae.losses import (PatchDiscriminator, PerceptualLoss, VAELossConfig, adaptive_weight,
                                     generator_loss, hinge_d_loss, kl_loss, reconstruction_loss)


def test_reconstruction_losses():
    x, x_hat = torch.zeros(2, 1, 4, 4), torch.full((2, 1, 4, 4), 0.5)
    assert reconstruction_loss(x, x_hat, "l1").item() == pytest.approx(0.5)
    assert reconstruction_loss(x, x_hat, "l2").item() == pytest.approx(0.25)
    with pytest.raises(ValueError, match="l1"):
        VAELossConfig(reconstruction="l3")


def test_kl_loss_is_zero_for_a_standard_normal_and_per_pixel_otherwise():
    x = torch.zeros(3, 1, 16, 16)
    assert kl_loss(DiagonalGaussian(torch.zeros(3, 8, 4, 4)), x).item() == 0.0
    moments = torch.cat([torch.ones(3, 4, 4, 4), torch.zeros(3, 4, 4, 4)], dim=1)  # mu = 1, sigma = 1
    assert kl_loss(DiagonalGaussian(moments), x).item() == pytest.approx(0.5 * 64 / 256)


def _stages():
    torch.manual_seed(0)
    return nn.Sequential(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()),
                         nn.Sequential(nn.Conv2d(4, 8, 3, 2, 1), nn.ReLU()))


def test_perceptual_loss_is_zero_on_identical_images_and_frozen():
    loss_fn = PerceptualLoss(_stages())
    loss_fn.train()
    assert not loss_fn.stages.training  # BatchNorm statistics stay fixed
    x = torch.randn(2, 1, 8, 8)
    assert loss_fn(x, x).item() == 0.0
    x_hat = (x + 0.5 * torch.randn_like(x)).requires_grad_(True)
    loss = loss_fn(x, x_hat)
    loss.backward()
    assert loss.item() > 0 and x_hat.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in loss_fn.parameters())


def test_perceptual_loss_on_the_classifier_features(shipped_classifier, real_test):
    from tutorial_lib.data.fashion_mnist import to_model_images

    import copy

    loss_fn = PerceptualLoss(copy.deepcopy(shipped_classifier.body))
    x = to_model_images(real_test[0][:8])
    near = loss_fn(x, (x + 0.05 * torch.randn_like(x)).clamp(-1, 1))
    far = loss_fn(x, x.flip(0))  # other garments
    assert 0 < near < far


def test_patch_discriminator_and_hinge_losses():
    disc = PatchDiscriminator(in_channels=1, width=8, n_down=2)
    assert disc(torch.randn(3, 1, 32, 32)).shape == (3, 1, 8, 8)
    confident = torch.full((2, 1, 4, 4), 2.0)
    assert hinge_d_loss(confident, -confident).item() == 0.0  # both sides beyond the margin
    assert hinge_d_loss(torch.zeros(2, 1), torch.zeros(2, 1)).item() == pytest.approx(1.0)
    assert generator_loss(confident).item() == -2.0


def test_adaptive_weight_balances_gradient_norms():
    w = torch.ones(3, requires_grad=True)
    l_rec, l_gan = (2.0 * w).sum(), (0.5 * w).sum()  # gradients 2 and 0.5 per element
    lam = adaptive_weight(l_rec, l_gan, w)
    assert lam.item() == pytest.approx(2.0 / (0.5 + 1e-4 / 3**0.5), rel=1e-3) and not lam.requires_grad


def test_train_vae_with_every_term_is_seeded(real_test):
    from tutorial_lib.data.fashion_mnist import to_model_images

    images = to_model_images(real_test[0][:64])
    cfg = VAETrainConfig(steps=3, batch_size=8, model=VAEConfig(channels=(8, 8), norm_groups=4),
                         loss=VAELossConfig(perceptual_weight=0.1, disc_weight=0.5, disc_start=1))
    vae, history = train_vae(cfg, images=images, log_every=1)
    assert [h["step"] for h in history] == [0, 1, 2]
    assert "gan" not in history[0] and {"rec", "kl", "perceptual", "gan", "lambda", "disc"} <= set(history[2])
    assert not vae.training and vae.config.scaling_factor > 0
    again, history_again = train_vae(cfg, images=images, log_every=1)
    assert history == history_again
    assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), again.state_dict().values()))


def test_perceptual_loss_refuses_rgb(real_test):
    cfg = VAETrainConfig(steps=1, model=VAEConfig(in_channels=3, channels=(8,), norm_groups=4),
                         loss=VAELossConfig(perceptual_weight=0.1))
    with pytest.raises(ValueError, match="perceptual"):
        train_vae(cfg, images=torch.zeros(4, 3, 8, 8))

"""The KL autoencoder: shapes, the posterior, input checks, weights round trip, shipped quality."""

from __future__ import annotations

import pytest
import torch

from tutorial_lib.data.fashion_mnist import to_model_images
from tutorial_lib.eval.reconstruction import psnr, reconstruct
from tutorial_lib.vae.autoencoder import AutoencoderKL, DiagonalGaussian, VAEConfig, load_vae
from tutorial_lib.weights import WeightsError, load_into, load_model, save_weights


def test_tiny_vae_shapes(tiny_vae):
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    posterior = tiny_vae.encode(x)
    assert posterior.mean.shape == posterior.logvar.shape == (2, 4, 8, 8)
    assert tiny_vae.decode(posterior.mode()).shape == (2, 1, 16, 16)
    x_hat, post = tiny_vae(x, generator=torch.Generator().manual_seed(0))
    assert x_hat.shape == x.shape and post.kl().shape == (2,)
    assert tiny_vae.encode_to_latents(x).shape == (2, 4, 8, 8)
    assert tiny_vae.config.downsample_factor == 2


def test_other_image_sizes_divisible_by_f(tiny_vae):
    assert tiny_vae.encode(torch.zeros(1, 1, 32, 24)).mean.shape == (1, 4, 16, 12)


def test_kl_of_standard_normal_posterior_is_exactly_zero():
    moments = torch.zeros(3, 8, 4, 4)  # mean 0, logvar 0
    kl = DiagonalGaussian(moments).kl()
    assert kl.shape == (3,) and torch.equal(kl, torch.zeros(3))


def test_kl_matches_closed_form():
    mean, logvar = torch.full((1, 2, 2, 2), 0.5), torch.full((1, 2, 2, 2), -1.0)
    kl = DiagonalGaussian(torch.cat([mean, logvar], dim=1)).kl()
    expected = 8 * 0.5 * (0.25 + torch.exp(torch.tensor(-1.0)) - 1 + 1)
    torch.testing.assert_close(kl, expected.reshape(1))


def test_posterior_sample_is_seeded_and_mode_is_mean():
    moments = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(0))
    post = DiagonalGaussian(moments)
    a = post.sample(torch.Generator().manual_seed(1))
    b = post.sample(torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, post.sample(torch.Generator().manual_seed(2)))
    assert torch.equal(post.mode(), moments[:, :4])


def test_scale_and_unscale_are_inverse(tiny_vae):
    z = torch.randn(2, 4, 8, 8)
    scaled = tiny_vae.scale(z)
    torch.testing.assert_close(scaled, (z - 0.1) * 1.5)
    torch.testing.assert_close(tiny_vae.unscale(scaled), z)


@pytest.mark.parametrize("shape", [(2, 1, 15, 16), (2, 1, 16, 17), (2, 3, 16, 16), (1, 16, 16), (16, 16)])
def test_wrong_image_shape_is_a_value_error(tiny_vae, shape):
    with pytest.raises(ValueError, match="image"):
        tiny_vae.encode(torch.zeros(shape))


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (2, 8, 8, 8), (4, 8, 8)])
def test_wrong_latent_shape_is_a_value_error(tiny_vae, shape):
    with pytest.raises(ValueError, match="latent"):
        tiny_vae.decode(torch.zeros(shape))


def test_save_load_round_trip_is_identical(tiny_vae, tmp_path):
    path = save_weights(tiny_vae, tmp_path / "vae.safetensors", "vae", {"note": "tiny"})
    loaded, extra = load_model(AutoencoderKL, VAEConfig, path, "vae")
    assert extra == {"note": "tiny"} and loaded.config == tiny_vae.config
    loaded.eval()
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded.encode(x).mean, tiny_vae.encode(x).mean)
        assert torch.equal(loaded.decode_latents(tiny_vae.encode_to_latents(x)),
                           tiny_vae.decode_latents(tiny_vae.encode_to_latents(x)))
    assert load_vae(path).config == tiny_vae.config


def test_load_into_a_model_of_another_config_is_refused(tiny_vae, tmp_path):
    path = save_weights(tiny_vae, tmp_path / "vae.safetensors", "vae")
    other = AutoencoderKL(VAEConfig(channels=(8, 16), latent_channels=2, norm_groups=4))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(WeightsError, match="latent_channels"):
        load_into(other, path, "vae")
    # Refused before anything was loaded: the model is untouched.
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def test_load_into_same_config_works(tiny_vae, tiny_vae_config, tmp_path):
    path = save_weights(tiny_vae, tmp_path / "vae.safetensors", "vae", {"a": 1})
    torch.manual_seed(123)
    fresh = AutoencoderKL(VAEConfig(**vars(tiny_vae_config)))
    assert load_into(fresh, path, "vae") == {"a": 1}
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), tiny_vae.state_dict().values()))


def test_shipped_vae_reconstructs_test_images(shipped_vae, real_test):
    x = to_model_images(real_test[0][:200])
    x_hat = reconstruct(shipped_vae, x)
    assert x_hat.shape == x.shape and x_hat.min() >= -1 and x_hat.max() <= 1
    assert psnr(x, x_hat) > 26.0


def test_psnr_reference_values():
    x = torch.zeros(1, 1, 4, 4)
    assert psnr(x, x + 0.2) == pytest.approx(20.0, abs=1e-4)  # error 0.1 on [0, 1] pixels
    assert psnr(x, torch.full_like(x, 5.0)) == pytest.approx(-10 * torch.log10(torch.tensor(0.25)).item())


def test_shipped_vae_latents_are_about_unit_variance(shipped_vae, real_test):
    """The measured scaling/shift factors make the diffusion model's data ~ zero mean, unit std."""
    z = shipped_vae.encode_to_latents(to_model_images(real_test[0][:300]))
    assert z.shape == (300, 4, 8, 8)
    assert abs(z.mean().item()) < 0.2 and 0.8 < z.std().item() < 1.2


@pytest.mark.parametrize("kwargs", [dict(channels=(8, 12), norm_groups=8), dict(channels=()),
                                    dict(num_res_blocks=0), dict(latent_channels=0)])
def test_invalid_config_is_refused(kwargs):
    with pytest.raises(ValueError, match="VAEConfig"):
        VAEConfig(**kwargs)


@pytest.mark.parametrize("channels,f", [((8,), 1), ((8, 8), 2), ((8, 8, 8), 4), ((8, 8, 8, 8), 8)])
def test_downsampling_levels_and_rgb(channels, f):
    vae = AutoencoderKL(VAEConfig(in_channels=3, channels=channels, norm_groups=4, latent_channels=2,
                                  mid_attention=False)).eval()
    x = torch.zeros(1, 3, 16, 24)
    z = vae.encode(x).mode()
    assert vae.config.downsample_factor == f and z.shape == (1, 2, 16 // f, 24 // f)
    assert vae.decode(z).shape == x.shape


def test_shipped_vae_matches_its_targets(shipped_vae, real_test, shipped_classifier):
    """Issue 3's bar on 1,000 test images: PSNR >= 26 dB and classifier accuracy on
    reconstructions within 2 points of the originals."""
    from tutorial_lib.eval.metrics import class_accuracy

    x, labels = to_model_images(real_test[0][:1000]), real_test[1][:1000]
    x_hat = reconstruct(shipped_vae, x)
    assert psnr(x, x_hat) >= 26.0
    assert class_accuracy(shipped_classifier, x, labels) - class_accuracy(shipped_classifier, x_hat, labels) <= 0.02


def test_evaluate_vae_reports_every_metric_consistently(tiny_vae, real_test, tmp_path, monkeypatch):
    from tutorial_lib.eval import metrics, reconstruction
    from tutorial_lib.eval.metrics import class_accuracy
    from tutorial_lib.models.classifier import ClassifierConfig, FashionClassifier

    few = lambda split: (real_test[0][:60], real_test[1][:60])  # noqa: E731
    monkeypatch.setenv("TUTORIAL_DATA", str(tmp_path))
    monkeypatch.setattr(metrics, "load_fashion_mnist", few)
    monkeypatch.setattr(reconstruction, "load_fashion_mnist", few)
    torch.manual_seed(0)
    clf = FashionClassifier(ClassifierConfig(channels=(8, 16), blocks_per_level=1)).eval()
    result = reconstruction.evaluate_vae(tiny_vae, n=50, classifier=clf)
    x, labels = to_model_images(real_test[0][:50]), real_test[1][:50]
    assert result["n"] == 50
    assert result["psnr_db"] == pytest.approx(psnr(x, reconstruct(tiny_vae, x)))
    assert result["accuracy_originals"] == pytest.approx(class_accuracy(clf, x, labels))
    assert result["accuracy_reconstructions"] == pytest.approx(class_accuracy(clf, reconstruct(tiny_vae, x), labels))
    assert result["fid_reconstructions"] > 0 and result["fid_reals_baseline"] >= 0
    metrics.test_features.cache_clear()
    metrics._test_stats.cache_clear()

"""Our VAE and `diffusers.AutoencoderKL` are the same network: weights convert both ways exactly."""

from __future__ import annotations

import copy

import pytest
import torch

from tutorial_lib.vae.autoencoder import AutoencoderKL, VAEConfig
from tutorial_lib.vae.diffusers_interop import diffusers_config, from_diffusers, to_diffusers
from tutorial_lib.weights import weights_hash

diffusers = pytest.importorskip("diffusers")

CONFIGS = {
    "gray-f2-attention": VAEConfig(channels=(8, 16), norm_groups=4),
    "rgb-f4-two-blocks-quant-conv": VAEConfig(in_channels=3, channels=(8, 16, 16), num_res_blocks=2,
                                              latent_channels=2, norm_groups=8, quant_conv=True),
    "f8-no-attention": VAEConfig(channels=(8, 8, 16, 16), mid_attention=False, norm_groups=4,
                                 scaling_factor=0.5, shift_factor=0.1),
}


def _perturbed(config: VAEConfig) -> AutoencoderKL:
    """Random weights everywhere, norms included, so that no layer can hide as an identity."""
    torch.manual_seed(0)
    vae = AutoencoderKL(config).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return vae


def _assert_same_outputs(ours, theirs, config, atol=1e-5):
    x = torch.rand(2, config.in_channels, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x).mean, theirs.encode(x).latent_dist.mean, rtol=0, atol=atol)
        torch.testing.assert_close(ours.encode(x).logvar, theirs.encode(x).latent_dist.logvar, rtol=0, atol=atol)
        z = ours.encode(x).mean
        torch.testing.assert_close(ours.decode(z), theirs.decode(z).sample, rtol=0, atol=atol)


@pytest.mark.parametrize("name", CONFIGS)
def test_ours_to_diffusers_and_back(name):
    config = CONFIGS[name]
    ours = _perturbed(config)
    theirs = to_diffusers(ours)
    _assert_same_outputs(ours, theirs, config)
    back = from_diffusers(theirs)
    assert back.config == config
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), ours.state_dict().values()))


def test_diffusers_to_ours_from_a_fresh_diffusers_model():
    torch.manual_seed(0)
    theirs = diffusers.AutoencoderKL(block_out_channels=(8, 16), norm_num_groups=4, latent_channels=4,
                                     in_channels=1, out_channels=1, layers_per_block=1,
                                     down_block_types=("DownEncoderBlock2D",) * 2,
                                     up_block_types=("UpDecoderBlock2D",) * 2).eval()
    ours = from_diffusers(theirs)
    assert ours.config.quant_conv and ours.config.scaling_factor == pytest.approx(0.18215)
    _assert_same_outputs(ours, theirs, ours.config)


def test_the_shipped_vae_round_trips_through_diffusers(shipped_vae, real_test):
    from tutorial_lib.data.fashion_mnist import to_model_images

    theirs = to_diffusers(shipped_vae)
    assert theirs.config.scaling_factor == pytest.approx(shipped_vae.config.scaling_factor)
    x = to_model_images(real_test[0][:16])
    with torch.no_grad():
        torch.testing.assert_close(shipped_vae.encode(x).mean, theirs.encode(x).latent_dist.mean, rtol=0, atol=1e-5)
        z = shipped_vae.encode(x).mean
        torch.testing.assert_close(shipped_vae.decode(z), theirs.decode(z).sample, rtol=0, atol=1e-5)
    back = from_diffusers(theirs)
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), shipped_vae.state_dict().values()))


def test_diffusers_config_names_the_same_network():
    kwargs = diffusers_config(CONFIGS["f8-no-attention"])
    assert kwargs["block_out_channels"] == (8, 8, 16, 16) and kwargs["mid_block_add_attention"] is False
    assert kwargs["use_quant_conv"] is False and kwargs["shift_factor"] == 0.1


def test_unsupported_diffusers_blocks_are_refused():
    class Fake:
        config = type("C", (), dict(down_block_types=("AttnDownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",)))

    with pytest.raises(ValueError, match="DownEncoderBlock2D"):
        from_diffusers(Fake())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_force_upcast_is_kept_and_a_half_precision_vae_runs_in_float32(dtype):
    torch.manual_seed(0)
    theirs = diffusers.AutoencoderKL(block_out_channels=(8, 16), norm_num_groups=4, latent_channels=4,
                                     in_channels=3, out_channels=3, layers_per_block=1, force_upcast=True,
                                     down_block_types=("DownEncoderBlock2D",) * 2,
                                     up_block_types=("UpDecoderBlock2D",) * 2).eval()
    ours = from_diffusers(theirs)
    assert ours.config.force_upcast and to_diffusers(ours).config.force_upcast
    reference = copy.deepcopy(ours).to(dtype).float()  # the half weights, computed in float32
    half = ours.to(dtype)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        mean = half.encode(x.to(dtype)).mean
        image = half.decode(mean.to(dtype))
        assert mean.dtype == image.dtype == torch.float32  # computed in float32 ...
        assert next(half.parameters()).dtype == dtype  # ... and cast back afterwards
        torch.testing.assert_close(mean, reference.encode(x.to(dtype).float()).mean, rtol=0, atol=0)
        torch.testing.assert_close(image, reference.decode(mean.to(dtype).float()), rtol=0, atol=0)
        half.config.force_upcast = False  # without the flag it runs in its own dtype
        assert half.encode(x.to(dtype)).mean.dtype == half.decode(mean.to(dtype)).dtype == dtype


def test_force_upcast_leaves_the_weights_hash_alone():
    ours = from_diffusers(to_diffusers(_perturbed(CONFIGS["f8-no-attention"])))
    flipped = copy.deepcopy(ours)
    flipped.config.force_upcast = not ours.config.force_upcast
    assert weights_hash(flipped) == weights_hash(ours)

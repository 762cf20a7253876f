"""The text-to-image pipeline: seeding, output format, input checks, save/load, and the shipped model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tutorial_lib.data.captions import CLASS_PROMPTS
from tutorial_lib.pipeline import TextToImagePipeline
from tutorial_lib.weights import WeightsError, asset, weights_hash

STEPS = 4  # sampling steps for the random-weight pipeline: only plumbing is tested


@pytest.fixture
def pipe(tiny_denoiser, tiny_text_encoder, shipped_vae):
    return TextToImagePipeline(tiny_denoiser, tiny_text_encoder, shipped_vae)


def test_same_seed_same_images(pipe):
    a = pipe.generate(["a bag", "a coat"], num_inference_steps=STEPS, seed=7)
    b = pipe.generate(["a bag", "a coat"], num_inference_steps=STEPS, seed=7)
    assert torch.equal(a, b)
    gen = pipe.generate(["a bag", "a coat"], num_inference_steps=STEPS,
                        generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, gen)  # seed=n is the same as a generator seeded with n


def test_different_seed_different_images(pipe):
    a = pipe.generate("a bag", num_inference_steps=STEPS, seed=0)
    b = pipe.generate("a bag", num_inference_steps=STEPS, seed=1)
    assert not torch.allclose(a, b)


def test_output_shape_and_range(pipe):
    images = pipe.generate(["a bag", "a dress", "sneakers"], num_inference_steps=STEPS, guidance_scale=5.0)
    assert images.shape == (3, 1, 32, 32) and images.dtype == torch.float32
    assert images.min() >= -1.0 and images.max() <= 1.0
    assert images.device.type == "cpu"


def test_generate_latents_shape_and_callback(pipe):
    steps = []
    z = pipe.generate_latents("a bag", num_inference_steps=STEPS,
                              callback=lambda i, t, x, x0: steps.append((i, x.shape, x0.shape)))
    assert z.shape == (1, 4, 8, 8)
    assert [i for i, _, _ in steps] == list(range(STEPS))
    assert all(s == (1, 4, 8, 8) and s0 == (1, 4, 8, 8) for _, s, s0 in steps)


def test_guidance_changes_the_images(pipe):
    a = pipe.generate("a bag", num_inference_steps=STEPS, guidance_scale=1.0)
    b = pipe.generate("a bag", num_inference_steps=STEPS, guidance_scale=4.0)
    assert not torch.allclose(a, b)


def test_call_returns_pil_images(pipe):
    images = pipe(["a bag", "a coat"], num_inference_steps=STEPS)
    assert isinstance(images, list) and len(images) == 2
    assert all(isinstance(im, Image.Image) and im.mode == "L" and im.size == (32, 32) for im in images)


def test_pil_images_match_tensors(pipe):
    tensor = pipe.generate("a bag", num_inference_steps=STEPS, seed=3)
    pil = pipe("a bag", num_inference_steps=STEPS, seed=3)[0]
    expected = tensor[0, 0].add(1).mul(127.5).round().to(torch.uint8)
    assert torch.equal(torch.tensor(np.array(pil)), expected)


def test_empty_prompt_list_is_a_value_error(pipe):
    with pytest.raises(ValueError, match="empty"):
        pipe.generate([], num_inference_steps=STEPS)


@pytest.mark.parametrize("bad", [3, None, ["a bag", 3]])
def test_wrong_prompt_type_is_a_type_error(pipe, bad):
    with pytest.raises(TypeError):
        pipe.generate(bad, num_inference_steps=STEPS)


def test_pipeline_leaves_models_in_eval_mode(pipe):
    pipe.denoiser.train()
    pipe.text_encoder.train()
    a = pipe.generate("a bag", num_inference_steps=STEPS)
    assert not pipe.denoiser.training and not pipe.text_encoder.training
    assert torch.equal(a, pipe.generate("a bag", num_inference_steps=STEPS))


def test_save_load_round_trip(pipe, tmp_path, shipped_vae):
    pipe.save(tmp_path / "model", extra={"command": "pytest"})
    assert {p.name for p in (tmp_path / "model").iterdir()} == {"denoiser.safetensors",
                                                                "text_encoder.safetensors"}
    loaded = TextToImagePipeline.load(tmp_path / "model", vae=shipped_vae)
    assert loaded.denoiser.config == pipe.denoiser.config
    assert loaded.text_encoder.config == pipe.text_encoder.config
    a = pipe.generate(["a bag", "an ankle boot"], num_inference_steps=STEPS, seed=5)
    b = loaded.generate(["a bag", "an ankle boot"], num_inference_steps=STEPS, seed=5)
    assert torch.equal(a, b)


def test_load_without_vae_uses_the_shipped_vae(pipe, tmp_path, shipped_vae):
    pipe.save(tmp_path / "model")
    loaded = TextToImagePipeline.load(tmp_path / "model")
    assert weights_hash(loaded.vae) == weights_hash(shipped_vae)


def test_load_with_a_different_vae_is_refused(pipe, tmp_path, tiny_vae):
    pipe.save(tmp_path / "model")
    with pytest.raises(WeightsError, match="VAE") as info:
        TextToImagePipeline.load(tmp_path / "model", vae=tiny_vae)
    assert weights_hash(tiny_vae) in str(info.value)


# ----------------------------------------------------------------------------- training and the shipped model
class _FakeCache:
    def __init__(self, n=64):
        g = torch.Generator().manual_seed(0)
        self.z, self.y = torch.randn(n, 4, 8, 8, generator=g), torch.arange(n) % 10

    def tensors(self, split="train"):
        return self.z, self.y


def test_train_denoiser_smoke(shipped_vae, tiny_denoiser_config, tiny_text_config):
    from tutorial_lib.train.denoiser import DenoiserTrainConfig, train_denoiser

    cfg = DenoiserTrainConfig(steps=6, batch_size=16, warmup=2, model=tiny_denoiser_config,
                              text=tiny_text_config, seed=0)
    nets, history = train_denoiser(_FakeCache(), cfg, log_every=3)
    assert history["step"] == [3, 6] and all(loss > 0 for loss in history["loss"])
    pipe = TextToImagePipeline(**nets, vae=shipped_vae)
    images = pipe.generate("a bag", num_inference_steps=STEPS)
    assert images.shape == (1, 1, 32, 32)
    # Seeded: the same config trains the same weights.
    nets2, history2 = train_denoiser(_FakeCache(), cfg, log_every=3)
    assert history2 == history
    pipe2 = TextToImagePipeline(**nets2, vae=shipped_vae)
    assert torch.equal(pipe2.generate("a bag", num_inference_steps=STEPS), images)


def test_shipped_model_draws_the_class_asked_for(shipped_vae, shipped_classifier):
    """The shipped notebook-01 model loads against the shipped VAE and follows the class prompts."""
    from tutorial_lib.eval.metrics import class_accuracy

    pipe = TextToImagePipeline.load(asset("tiny_t2i"), vae=shipped_vae)
    prompts = [p for p in CLASS_PROMPTS for _ in range(4)]
    images = pipe.generate(prompts, num_inference_steps=20, guidance_scale=3.0, seed=0)
    labels = [i for i in range(10) for _ in range(4)]
    assert class_accuracy(shipped_classifier, images, labels) >= 0.8


def test_denoising_strip(pipe):
    from tutorial_lib.viz import denoising_strip, grid

    images, ts = denoising_strip(pipe, "a bag", num_inference_steps=6, columns=4)
    assert images.shape == (8, 1, 32, 32) and len(ts) == 4
    assert ts[0] == 1.0 and ts == sorted(ts, reverse=True) and min(ts) > 0
    g = grid(images, nrow=4)
    assert g.shape == (2 * 34 + 2, 4 * 34 + 2) and 0 <= g.min() and g.max() <= 1

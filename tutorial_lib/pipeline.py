"""Prompt(s) -> images: text encoder -> guided sampler over the denoiser -> VAE decoder.

    cond, null = text_encoder(prompts), text_encoder("")           # null: what training dropped to
    D          = the prediction F (x0, eps, v or flow) converted to x0 (parametrizations),
                 or for an EDM model c_skip x + c_out F (edm.EDMPrecond)
    x0_hat     = D(x, t, null) + w (D(x, t, cond) - D(x, t, null))  # guidance.cfg_denoiser, every channel
    latents    = sampler(x0_hat, noise, the schedule's grid of num_inference_steps levels, or
                 Karras et al.'s sigma grid for an EDM model or sampler)
    images     = vae.decode(latents)

Beyond that: image-to-image, inpainting and DDIM inversion (`generate_latents`' init_latents, strength,
mask; `invert`: diffusion/editing.py), negative prompts, guidance intervals, guidance rescale and
autoguidance (negative_prompt, guidance_interval, guidance_rescale, guide: diffusion/guidance.py), checked
and wired by control.py.

Saved in diffusers' directory layout (`save_pretrained`), so the folder is also a diffusers pipeline:

    model_index.json              the pipeline class, each component's (library, class), sampling config
    tutorial_pipeline.py          two lines that import this class: diffusers' custom-pipeline hook
    transformer/                  config.json + diffusion_pytorch_model.safetensors (DiT, MMDiT, UNet,
                                  TinyTransformer; the UNet's keys are "unet." + diffusers' own, models/unet.py)
    text_encoder/                 config.json (+ weights for a learned encoder; a pretrained one is
                                  named and hashed with its dtype, its weights come from its own package)
    vae/                          a diffusers.AutoencoderKL folder (vae.diffusers_interop)

`TextToImagePipeline.from_pretrained(folder)` reads it with no diffusers machinery;
`diffusers.DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` builds the same
pipeline through diffusers' loader when tutorial_lib is installed.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path

import torch
from diffusers import DiffusionPipeline, ModelMixin
from diffusers.configuration_utils import ConfigMixin
from safetensors import SafetensorError
from safetensors.torch import save_file

from .control import check_guide, check_init, guide_denoiser, level_alpha_sigma, reference_condition
from .diffusion.edm import EDMPrecond, karras_sigmas, sigma_denoiser, sigma_of_t, t_of_sigma, time_denoiser
from .diffusion.editing import first_step, inpainting_denoiser, invert_ddim, noised
from .diffusion.guidance import cfg_denoiser, check_guidance
from .diffusion.parametrizations import PREDICTIONS, well_defined, x0_denoiser
from .diffusion.samplers import SAMPLERS, SIGMA_SAMPLERS, check_churn, samplers_for
from .diffusion.schedules import Schedule, get_schedule
from .models.dit import DiT, DiTConfig
from .models.mmdit import MMDiT, MMDiTConfig
from .models.tiny_transformer import TinyTransformer, TinyTransformerConfig
from .models.unet import UNet, UNetConfig
from .text import (MiniLMEncoder, OneHotConfig, OneHotEncoder, TextEmbedding, TextEncoder,
                   WordEncoder, WordEncoderConfig, check_prompts, load_clip_encoder)
from .text.base import full_mask
from .vae.autoencoder import AutoencoderKL, load_vae
from .vae.diffusers_interop import from_diffusers, to_diffusers
from .weights import (COMPONENT_WEIGHTS as WEIGHTS, WeightsError, atomic_write, read_component_config,
                      missing_message, read_component_weights, weights_hash)

SHIM = "tutorial_pipeline"
# Components saved as (config dataclass + safetensors): class name -> (class, config class).
TRAINED = {"DiT": (DiT, DiTConfig), "TinyTransformer": (TinyTransformer, TinyTransformerConfig),
           "MMDiT": (MMDiT, MMDiTConfig), "UNet": (UNet, UNetConfig),
           "WordEncoder": (WordEncoder, WordEncoderConfig), "OneHotEncoder": (OneHotEncoder, OneHotConfig)}
EPS_T_MAX = 0.99  # alpha = 0.016, SNR 2.5e-4 on the cosine schedule (DDPM's linear one ends at 4e-5)
MODEL_OPTIONS = ("prediction", "schedule", "zero_terminal_snr", "sigma_data")  # what the transformer learned
SAMPLING_OPTIONS = ("sampler", "t_max", "sigma_min", "sigma_max", "rho", "S_churn", "S_tmin", "S_tmax",
                    "S_noise")  # how to sample it: recorded, and overridable per call (`generate_latents`)
OPTIONS = MODEL_OPTIONS + SAMPLING_OPTIONS  # the sampling config in model_index.json
PRETRAINED = ("MiniLMEncoder", "CLIPEncoder")  # saved as a name and a weights hash, not weights


def _concat(a: TextEmbedding, b: TextEmbedding) -> TextEmbedding:
    """Two conditions as one batch; the shorter token axis is padded (mask False). No padding in
    either, of the same length: no mask (None), as theirs."""
    if a.mask is None and b.mask is None and a.tokens.shape[1] == b.tokens.shape[1]:
        return TextEmbedding(torch.cat([a.tokens, b.tokens]), None)
    length = max(a.tokens.shape[1], b.tokens.shape[1])

    def pad(e: TextEmbedding) -> TextEmbedding:
        extra = length - e.tokens.shape[1]
        return TextEmbedding(torch.nn.functional.pad(e.tokens, (0, 0, 0, extra)),
                             torch.nn.functional.pad(full_mask(e), (0, extra)))

    a, b = pad(a), pad(b)
    return TextEmbedding(torch.cat([a.tokens, b.tokens]), torch.cat([a.mask, b.mask]))


def latent_shape(transformer) -> tuple[int, int, int]:
    """(C, H, W) of the latents the denoiser was built for."""
    cfg = transformer.config
    if isinstance(cfg, (DiTConfig, MMDiTConfig, UNetConfig)):
        return (cfg.in_channels, *cfg.input_size)
    return cfg.latent_channels, cfg.latent_size, cfg.latent_size


def start_level(prediction: str, schedule: Schedule) -> float:
    """Where sampling starts: t = 1, except where a `prediction` says nothing about x0 there (eps on a
    schedule that ends at SNR 0), which starts at EPS_T_MAX instead. An EDM model starts at the sigma
    grid's sigma_max whatever the schedule: t_max = 1."""
    if prediction == "edm":
        return 1.0
    return 1.0 if well_defined(prediction, *schedule.alpha_sigma(torch.ones(1, dtype=torch.float64))) \
        else EPS_T_MAX


def check_options(options: dict, schedule: Schedule):
    """Clear errors for pipeline `options` (OPTIONS -> value) that cannot sample on `schedule`: each
    names what would."""
    o = options
    prediction, sampler = o["prediction"], o["sampler"]
    if prediction not in (*PREDICTIONS, "edm"):
        raise ValueError(f"Unknown prediction {prediction!r}; choose from {', '.join(PREDICTIONS)}, edm.")
    if sampler not in (*SAMPLERS, *SIGMA_SAMPLERS):
        raise ValueError(f"Unknown sampler {sampler!r}; choose from {', '.join([*SAMPLERS, *SIGMA_SAMPLERS])}.")
    if sampler not in samplers_for(schedule):
        raise ValueError(f"The {sampler} sampler does not step the {o['schedule']} schedule; on it choose "
                         f"from {', '.join(samplers_for(schedule))}.")
    if not 0 < o["t_max"] <= 1:
        raise ValueError(f"t_max, the noise level sampling starts from, must be in (0, 1], got {o['t_max']}.")
    if prediction == "edm":
        if o["t_max"] != 1:
            raise ValueError(f"An EDM model starts at the sigma grid's sigma_max, not at a level t: leave "
                             f"t_max at 1 (got {o['t_max']}) and set sigma_max.")
        if o["sigma_data"] is None or not 0 < o["sigma_data"] < math.inf:
            raise ValueError(f"An EDM pipeline needs the sigma_data its model was trained with (the run's "
                             f"objective.sigma_data), positive and finite; got {o['sigma_data']}.")
    elif o["sigma_data"] is not None:
        raise ValueError(f"sigma_data is the EDM preconditioning's (prediction='edm'); a {prediction} model "
                         f"has none, got sigma_data={o['sigma_data']}.")
    karras_sigmas(1, o["sigma_min"], o["sigma_max"], o["rho"])  # its errors for a grid it cannot make
    check_churn(o["S_churn"], o["S_tmin"], _upper(o["S_tmax"]), o["S_noise"])
    if o["S_churn"] > 0 and sampler not in SIGMA_SAMPLERS:
        raise ValueError(f"S_churn > 0 adds noise in EDM's samplers (Karras et al., 2022, Algorithm 2), not "
                         f"in {sampler}: sample with {' or '.join(SIGMA_SAMPLERS)}, or set S_churn=0.")


def _upper(S_tmax: float | None) -> float:
    """S_tmax as the samplers take it: None (JSON has no inf) is no upper bound."""
    return math.inf if S_tmax is None else S_tmax


# ----------------------------------------------------------------------------- component folders
def _pretrained_key(encoder) -> dict:
    """How a pretrained encoder is saved: the key (hash) of its weights and their dtype, so that a
    half-precision copy is recognised as the installed weights cast to that dtype."""
    return {"key": encoder.cache_key(), "dtype": str(encoder.model.dtype).removeprefix("torch.")}


def _check_pretrained(module, folder: Path, config: dict):
    """The installed encoder, cast to the saved dtype, must hash to the saved key."""
    dtype = getattr(torch, config.get("dtype", "float32"))  # folders saved before dtypes were recorded
    cast = module if dtype == torch.float32 else copy.deepcopy(module).to(dtype)
    if cast.cache_key() != config["key"]:
        raise WeightsError(f"{folder}: the installed {type(module).__name__} ({cast.cache_key()}) is not the "
                           f"one this pipeline was trained with ({config['key']}); install that version.")


def save_component(module: torch.nn.Module, folder: Path):
    """config.json (the class name and its config) and, for trained modules, the weights."""
    name = type(module).__name__
    if name in TRAINED:
        config = dataclasses.asdict(module.config)
        tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
        atomic_write(folder / WEIGHTS, lambda tmp: save_file(tensors, tmp))
    elif name == "MiniLMEncoder":
        config = {"max_length": module.max_length, **_pretrained_key(module)}
    elif name == "CLIPEncoder":
        config = {"model_name": module.model_id, "max_length": module.max_length, **_pretrained_key(module)}
    else:
        raise TypeError(f"Cannot save a {name} as a pipeline component; known: "
                        f"{', '.join([*TRAINED, *PRETRAINED])}.")
    text = json.dumps({"_class_name": name, **config}, indent=1, sort_keys=True)
    atomic_write(folder / "config.json", lambda tmp: Path(tmp).write_text(text))


def load_component(folder: str | Path) -> torch.nn.Module:
    """The module `save_component` wrote into `folder`, in eval mode."""
    folder = Path(folder)
    name, config = read_component_config(folder)
    if name in TRAINED:
        cls, config_cls = TRAINED[name]
        state = read_component_weights(folder, name)
        try:
            module = cls(config_cls(**config))
            module.load_state_dict(state)
        except (TypeError, RuntimeError, ValueError) as err:
            raise WeightsError(f"{folder}: the weights do not fit the {name} config beside them "
                               f"({type(err).__name__}: {str(err)[:300]}).") from err
    elif name == "MiniLMEncoder":
        module = MiniLMEncoder(max_length=config["max_length"])
    elif name == "CLIPEncoder":
        module = load_clip_encoder(config["model_name"], config["max_length"])
        if module is None:
            raise RuntimeError(f"{folder}: this pipeline reads CLIP ({config['model_name']}), which is "
                               "neither on the Hub (offline?) nor in the local cache.")
    else:
        raise WeightsError(f"{folder}: unknown component class {name!r}.")
    if name in PRETRAINED:
        _check_pretrained(module, folder, config)
    return module.eval()


class PipelineComponent(ModelMixin, ConfigMixin):
    """How diffusers' loader reads one of our component folders: its `from_pretrained` returns the
    course's module (DiT, WordEncoder, ...) itself, not an instance of this class."""

    @classmethod
    def from_pretrained(cls, path, subfolder: str | None = None, torch_dtype=None, **_):
        folder = Path(path) / (subfolder or "")
        if (folder / "model_index.json").is_file():  # diffusers' loader passes the pipeline folder
            missing = [f"{name}/" for name in ("transformer", "text_encoder") if not (folder / name).is_dir()]
            raise WeightsError(missing_message(f"{folder} has no {' and no '.join(missing)} folder"))
        module = load_component(folder)
        return module.to(dtype=torch_dtype) if torch_dtype is not None else module


def _parse_to(args, device, dtype, torch_dtype) -> tuple[torch.device | None, torch.dtype | None]:
    """`to`'s arguments as diffusers' `DiffusionPipeline.to` takes them: a device and/or a dtype,
    positional (device first) or by keyword; `torch_dtype` is `from_pretrained`'s name for dtype."""
    if len(args) > 2 or (len(args) == 2 and isinstance(args[0], torch.dtype)):
        raise ValueError("to() takes a device, a dtype, or (device, dtype) in that order, e.g. "
                         "pipe.to('cuda', torch.float16).")
    dtypes = [a for a in (*args, dtype, torch_dtype) if isinstance(a, torch.dtype)]
    devices = [a for a in (*args, device) if a is not None and not isinstance(a, torch.dtype)]
    if len(dtypes) > 1 or len(devices) > 1 or len(dtypes) < sum(d is not None for d in (dtype, torch_dtype)):
        raise ValueError(f"to() takes one device and one torch.dtype (dtype= or torch_dtype=, not both), "
                         f"got {args}, device={device}, dtype={dtype}, torch_dtype={torch_dtype}.")
    if dtypes and not dtypes[0].is_floating_point:
        raise ValueError(f"A pipeline runs in a floating-point dtype (torch.float32, torch.float16, "
                         f"torch.bfloat16), got {dtypes[0]}.")
    return (torch.device(devices[0]) if devices else None), (dtypes[0] if dtypes else None)


# ----------------------------------------------------------------------------- the pipeline
class TextToImagePipeline(DiffusionPipeline):
    """`pipe(prompt or prompts, num_inference_steps, guidance_scale, seed or generator)` -> PIL images.

    transformer   a denoiser F(x_t [B, C, H, W], t [B], TextEmbedding) -> [B, C, H, W]: the DiT, the
                  MMDiT, the UNet, or notebook 01's TinyTransformer; it predicts `prediction` on the `schedule`
    text_encoder  a tutorial_lib TextEncoder (the one it was trained with)
    vae           our AutoencoderKL (or a diffusers one, converted, in its dtype); default: the shipped
                  VAE, in the transformer's dtype
    prediction    x0, eps, v, flow (on `schedule`), or edm: the transformer is F of edm.EDMPrecond,
                  applied here with the `sigma_data` it was trained with
    sampler       one of diffusion.samplers.SAMPLERS or SIGMA_SAMPLERS that steps `schedule`
                  (`samplers_for`): every pair of model and sampler samples, through the edm.py
                  adapters where their coordinates differ (an EDM model in t: `edm.time_denoiser`;
                  a VP or flow model in sigma: `edm.sigma_denoiser`)
    t_max         the noise level sampling starts from; below 1 for eps on a schedule ending at SNR 0
    sigma_min, sigma_max, rho
                  the Karras grid (`edm.karras_sigmas`; the paper's 0.002, 80, 7) of the EDM samplers,
                  and of the t-space ones on an EDM model (its t grid, `edm.t_of_sigma`). Wherever
                  the model or the sampler steps in t, sigma_max is capped at the schedule's
                  sigma(t_max) = sigma_t / alpha_t (inf at SNR 0: no cap; 14.6 at the end of Stable
                  Diffusion's betas): sampling never starts above where the schedule reaches.
    S_churn, S_tmin, S_tmax, S_noise
                  the EDM samplers' churn (Karras et al., 2022, Algorithm 2; 0: deterministic,
                  Algorithm 1); S_tmax None: no upper bound

    `num_inference_steps` N counts steps, the intervals of a grid of N + 1 levels, for every sampler,
    not network evaluations: heun and edm_heun evaluate twice a step except onto the data, 2N - 1
    times (heun's first step from SNR 0 is Euler's: 2N - 2), the others N times; with guidance each
    evaluation is one batch of 2B. The initial noise is the seed's standard normal draw for every
    sampler: the sigma samplers scale it to sigma_max themselves (and on an EDM model the t-space
    ones start from alpha_t sigma_max times it), so one seed serves every sampler.

    Precision (`to(dtype)`, `from_pretrained(..., torch_dtype=)`): each network runs in its own dtype,
    while the sampler's state x_t, classifier-free guidance and the sampler's arithmetic stay in
    float32 (its coefficients in float64; the EDM samplers keep their state, and EDMPrecond its
    coefficients, in float64): x_t is cast to the transformer's dtype for each call and
    its output back to float32, and the final latents to the VAE's dtype to decode. In half
    precision a step's small update x_s - x_t would be rounded to 8 (bf16) or 11 (fp16) bits of
    x_t, and those errors would add up over the steps; kept in float32, only the networks' own
    rounding remains.
    """

    _optional_components = ["vae"]  # a component diffusers loads, though the default is the shipped VAE

    def __init__(self, transformer, text_encoder, vae=None, prediction: str = "x0", schedule: str = "cosine",
                 zero_terminal_snr: bool = False, sampler: str = "ddim", t_max: float = 1.0,
                 sigma_data: float | None = None, sigma_min: float = 0.002, sigma_max: float = 80.0,
                 rho: float = 7.0, S_churn: float = 0.0, S_tmin: float = 0.0, S_tmax: float | None = None,
                 S_noise: float = 1.0):
        super().__init__()
        options = {k: v for k, v in locals().items() if k in OPTIONS}  # the arguments named in OPTIONS
        noise_schedule = get_schedule(schedule, zero_terminal_snr)
        check_options(options, noise_schedule)
        if not isinstance(text_encoder, TextEncoder):
            raise TypeError(f"text_encoder must be a tutorial_lib TextEncoder, got {type(text_encoder).__name__}.")
        if vae is None:
            vae = load_vae().to(next(transformer.parameters()).dtype)
        elif not isinstance(vae, AutoencoderKL):
            vae = from_diffusers(vae).to(vae.dtype)  # e.g. diffusers' loader handed us its own AutoencoderKL
        if text_encoder.dim != transformer.config.text_dim:
            raise ValueError(f"The text encoder gives {text_encoder.dim}-wide tokens, the transformer reads "
                             f"{transformer.config.text_dim}: they were not trained together.")
        if latent_shape(transformer)[0] != vae.config.latent_channels:
            raise ValueError(f"The transformer denoises {latent_shape(transformer)[0]}-channel latents, the "
                             f"VAE makes {vae.config.latent_channels}.")
        self.register_modules(transformer=transformer, text_encoder=text_encoder, vae=vae)
        self.register_to_config(**options)
        self.noise_schedule = noise_schedule

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The transformer's dtype (the class docstring's "Precision")."""
        return next(self.transformer.parameters()).dtype

    def to(self, *args, device=None, dtype=None, torch_dtype=None) -> "TextToImagePipeline":
        """Move and/or cast the transformer, the text encoder and the VAE, as diffusers' pipelines:
        `to("cuda")`, `to(torch.float16)`, `to("cuda", torch.float16)`, `to(device=..., dtype=...)`,
        or `torch_dtype=` for dtype. Returns the pipeline itself."""
        device, dtype = _parse_to(args, device, dtype, torch_dtype)
        for m in (self.transformer, self.text_encoder, self.vae):
            m.to(device=device, dtype=dtype)
        return self

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the latents this pipeline's denoiser draws (`latent_shape` of its transformer)."""
        return latent_shape(self.transformer)

    def x0_network(self):
        """The unguided x0-denoiser in the model's own coordinate: D(x_t, t [B], cond) for a VP or flow
        model (its prediction converted, `parametrizations.x0_denoiser`), D(x, sigma [B], cond) for an EDM
        one (EDMPrecond with the recorded sigma_data). The transformer sees x and the caption tokens in
        its dtype; conversion and preconditioning run in x's."""
        dtype = self.dtype

        def network(x: torch.Tensor, t: torch.Tensor, text: TextEmbedding) -> torch.Tensor:
            return self.transformer(x.to(dtype), t, TextEmbedding(text.tokens.to(dtype), text.mask)).to(x.dtype)

        if self.config.prediction == "edm":
            return EDMPrecond(network, self.config.sigma_data)
        return x0_denoiser(network, self.config.prediction, self.noise_schedule)

    def denoiser(self, guidance_scale: float, *, guide=None, guidance_interval=None, guidance_rescale: float = 0.0,
                 sigma_top: float = math.inf):
        """The guided x0_hat in the model's own coordinate (`x0_network`), D(level, (cond, ref_cond)):
        classifier-free guidance with ref_cond the null or a negative prompt's condition, or with `guide`
        (another pipeline; ref_cond its embedding of the prompts) autoguidance, optionally in a
        `guidance_interval` (sigma_lo, sigma_hi) and rescaled by `guidance_rescale` (diffusion/guidance.py:
        every variant acts on x0_hat, the same as guiding the network's own target except the rescale).
        `sigma_top` is the highest level sampling will reach (for a guide's conversion, control.py).
        `generate_latents` adapts it to a sampler in the other coordinate."""
        edm = self.config.prediction == "edm"
        reference = None if guide is None else guide_denoiser(self, guide, sigma_top)
        sigma_of = (lambda s: s) if edm else (lambda t: sigma_of_t(self.noise_schedule, t))
        return cfg_denoiser(self.x0_network(), guidance_scale, _concat, reference=reference, sigma_of=sigma_of,
                            interval=guidance_interval, rescale=guidance_rescale)

    def _sigmas(self, num_inference_steps: int, o: dict) -> torch.Tensor:
        """The Karras grid of options `o` (float64, num_inference_steps + 1 levels down to 0), sigma_max
        capped at sigma(t_max) on the schedule wherever the model or the sampler steps in t (the
        class docstring)."""
        sigma_max = o["sigma_max"]
        if self.config.prediction != "edm" or o["sampler"] in SAMPLERS:
            sigma_max = min(sigma_max, sigma_of_t(self.noise_schedule, o["t_max"]).item())
        return karras_sigmas(num_inference_steps, o["sigma_min"], sigma_max, o["rho"])

    def _check_churn_reach(self, sigmas: torch.Tensor, o: dict):
        """Churn raises a level sigma to (1 + gamma) sigma (`samplers.sample_edm_heun`); a VP model must
        have been trained there, so that level may not pass the schedule's top (14.6 on scaled_linear)."""
        top = sigma_of_t(self.noise_schedule, 1.0).item()
        gamma = min(o["S_churn"] / (len(sigmas) - 1), math.sqrt(2) - 1)
        churned = [s for s in sigmas.tolist() if o["S_tmin"] <= s <= _upper(o["S_tmax"])]
        if gamma > 0 and churned and max(churned) * (1 + gamma) > top:
            raise ValueError(f"With S_churn={o['S_churn']}, churn would raise sigma = {max(churned):.4g} to "
                             f"{max(churned) * (1 + gamma):.4g}, above the {self.config.schedule} schedule's top "
                             f"sigma {top:.4g}: set S_tmax <= {top / (1 + gamma):.4g} or lower sigma_max.")

    def _options(self, overrides: dict) -> dict:
        """The pipeline's OPTIONS with per-call `overrides` of its SAMPLING_OPTIONS, checked."""
        unknown = sorted(set(overrides) - set(SAMPLING_OPTIONS))
        if unknown:
            raise TypeError(f"Unknown sampling options {unknown}; a call overrides {', '.join(SAMPLING_OPTIONS)} "
                            f"({', '.join(MODEL_OPTIONS)} are the model's).")
        options = {**{k: self.config[k] for k in OPTIONS}, **overrides}
        check_options(options, self.noise_schedule)
        return options

    def _plan(self, num_inference_steps: int, o: dict) -> tuple[str, torch.Tensor, float]:
        """How options `o` sample: (the coordinate the sampler steps, "sigma" or "t"; its grid of
        num_inference_steps + 1 levels; the factor from standard-normal noise to the state at the grid's
        top, where the sampler does not apply it: alpha_t sigma_max for an EDM model in t, else 1)."""
        if o["sampler"] in SIGMA_SAMPLERS:  # x = sigma_max noise, stepped in sigma
            sigmas = self._sigmas(num_inference_steps, o)
            if self.config.prediction != "edm":
                self._check_churn_reach(sigmas, o)
            return "sigma", sigmas, 1.0
        if self.config.prediction == "edm":  # the t grid of the sigma grid, from x_t = alpha_t x_sigma
            sigmas = self._sigmas(num_inference_steps, o)
            ts = t_of_sigma(self.noise_schedule, sigmas)
            return "t", ts, (self.noise_schedule.alpha_sigma(ts[0])[0] * sigmas[0]).item()
        ts = self.noise_schedule.grid(num_inference_steps, t_max=o["t_max"])
        if not well_defined(self.config.prediction, *self.noise_schedule.alpha_sigma(ts[:1])):
            raise ValueError(f"An {self.config.prediction} prediction says nothing about the image at "
                             f"t_max = {o['t_max']}, where the {self.config.schedule} schedule's SNR is 0; "
                             f"start below it (e.g. t_max=0.99) or train v or flow (notebook 04).")
        return "t", ts, 1.0

    def _in_coordinate(self, denoiser, space: str):
        """The model-coordinate `denoiser` as the sampler's `space` ("sigma" or "t") takes it."""
        edm = self.config.prediction == "edm"
        if space == "sigma" and not edm:
            return sigma_denoiser(denoiser, self.noise_schedule)
        if space == "t" and edm:
            return time_denoiser(denoiser, self.noise_schedule)
        return denoiser

    def _conditions(self, prompt, negative_prompt, guide):
        """(prompts, (cond, ref_cond)) with every network in eval mode (condition dropout off)."""
        prompts = check_prompts(prompt)
        for pipe in (self,) if guide is None else (self, guide):
            for m in (pipe.transformer, pipe.text_encoder, pipe.vae):
                m.eval()
        return prompts, (self.text_encoder.encode(prompts), reference_condition(self, prompts, negative_prompt, guide))

    @torch.no_grad()
    def generate_latents(self, prompt, num_inference_steps: int = 25, guidance_scale: float = 3.0,
                         seed: int | None = 0, generator: torch.Generator | None = None,
                         callback=None, eta: float = 0.0, *, latents: torch.Tensor | None = None,
                         init_latents: torch.Tensor | None = None, strength: float | None = None,
                         mask: torch.Tensor | None = None, negative_prompt=None, guidance_interval=None,
                         guidance_rescale: float = 0.0, guide=None, **options) -> torch.Tensor:
        """Scaled latents [B, C, H, W], float32, for prompt(s); the same seed gives the same latents.

        `num_inference_steps` counts steps, not network evaluations (the class docstring).
        `generator` may live on the CPU (as `seed`'s does) or on the pipeline's device: noise is
        drawn on the generator's device and moved, so a seed gives the same draws on any device.
        `latents` replaces that draw: standard-normal noise [B, C, H, W] (diffusers' name), e.g. `invert`'s.
        `eta` is DDIM's (Song et al., 2021, eq. 16; 0: deterministic, 1: ancestral), for the ddim
        sampler only. `options` override the pipeline's SAMPLING_OPTIONS for this call, e.g.
        sampler="edm_heun", S_churn=40, S_tmin=0.05, S_tmax=50, S_noise=1.003.

        Editing (diffusion/editing.py), on every model and sampler:
        init_latents   the input's scaled latents [B or 1, C, H, W]: image-to-image from the grid's level
                       at `strength` (0: the input itself; 1, the default: the top of the grid, which at
                       SNR 0 is sampling from the same noise); the last int(strength N) steps run
        mask           [B or 1, 1, H, W], 1 = regenerate, 0 = keep (with init_latents): inpainting by
                       latent blending; the kept region comes back exactly
        Guidance (diffusion/guidance.py):
        negative_prompt  a str, or a list with one per prompt: the condition guidance moves away from
                       instead of the null one
        guidance_interval  (sigma_lo, sigma_hi): guide only at noise levels sigma in (sigma_lo, sigma_hi]
        guidance_rescale   phi in [0, 1]: rescale the guided x0_hat's std to the conditional one's
        guide          another TextToImagePipeline on the same latents: autoguidance, its conditional
                       x0_hat is the reference instead of the null condition's"""
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps is an int >= 1, got {num_inference_steps!r}.")
        o = self._options(options)
        if eta != 0 and o["sampler"] != "ddim":
            raise ValueError(f"eta is the ddim sampler's; this pipeline samples with {o['sampler']}.")
        check_guidance(guidance_scale, guidance_interval, guidance_rescale)
        if guide is not None:
            check_guide(self, guide)
        prompts, cond = self._conditions(prompt, negative_prompt, guide)
        if generator is None:
            generator = torch.Generator().manual_seed(0 if seed is None else seed)
        shape = (len(prompts), *latent_shape(self.transformer))
        init_latents, strength, mask = check_init(init_latents, strength, mask, shape, self.device)
        if latents is not None and (not torch.is_tensor(latents) or tuple(latents.shape) != shape):
            raise ValueError(f"latents are the starting noise, shape {list(shape)}, got "
                             f"{list(latents.shape) if torch.is_tensor(latents) else type(latents).__name__}.")
        noise = (torch.randn(shape, generator=generator, device=generator.device) if latents is None
                 else latents).to(self.device, torch.float32)
        space, levels, scale = self._plan(num_inference_steps, o)
        first = 0 if init_latents is None else first_step(num_inference_steps, strength)
        if first == num_inference_steps:  # strength 0: no step runs
            return init_latents.clone()
        levels = levels[first:]
        sigma_top = (levels[0] if space == "sigma" else sigma_of_t(self.noise_schedule, levels[0])).item()
        denoiser = self._in_coordinate(self.denoiser(guidance_scale, guide=guide, guidance_interval=guidance_interval,
                                                     guidance_rescale=guidance_rescale, sigma_top=sigma_top), space)
        alpha_sigma = level_alpha_sigma(self.noise_schedule, space)
        if init_latents is None:
            x = noise * scale
        else:  # the input noised to the first level; the sigma samplers scale their argument by it
            x = noised(init_latents, noise, *alpha_sigma(levels[:1])) if space == "t" \
                else (noise.double() + init_latents.double() / levels[0]).float()
            if mask is not None:
                denoiser = inpainting_denoiser(denoiser, init_latents, noise, mask, alpha_sigma)
        if space == "sigma":
            return SIGMA_SAMPLERS[o["sampler"]](denoiser, x, levels, cond, callback, S_churn=o["S_churn"],
                                                S_tmin=o["S_tmin"], S_tmax=_upper(o["S_tmax"]),
                                                S_noise=o["S_noise"], generator=generator)
        kwargs = {"schedule": self.noise_schedule}
        if o["sampler"] in ("ddpm", "ddim"):
            kwargs["generator"] = generator
        if o["sampler"] == "ddim":
            kwargs["eta"] = eta
        return SAMPLERS[o["sampler"]](denoiser, x, levels, cond, callback, **kwargs)

    @torch.no_grad()
    def invert(self, latents: torch.Tensor, prompt, num_inference_steps: int = 50, guidance_scale: float = 1.0,
               negative_prompt=None, callback=None, **options) -> torch.Tensor:
        """DDIM inversion (diffusion/editing.py; Song et al., 2021; Mokady et al., 2023): the noise [B, C, H, W]
        from which `generate_latents(prompt, num_inference_steps, guidance_scale, sampler="ddim",
        latents=noise)` (eta 0, the same options) returns about `latents`, the input's scaled latents.
        The deterministic DDIM step runs up the ddim sampler's grid, from t = 0 to its top (t_max; an EDM
        model's t grid of its sigma grid); it reconstructs best at guidance 1 (at 50 steps on dit_t2i to
        within the tolerance tests/test_editing.py states)."""
        if options.get("sampler", "ddim") != "ddim":
            raise ValueError(f"Inversion runs DDIM's deterministic step; sample its noise back with "
                             f"sampler='ddim' (eta 0), not {options['sampler']!r}.")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps is an int >= 1, got {num_inference_steps!r}.")
        o = self._options({**options, "sampler": "ddim"})
        check_guidance(guidance_scale)
        prompts, cond = self._conditions(prompt, negative_prompt, None)
        shape = (len(prompts), *latent_shape(self.transformer))
        x0, _, _ = check_init(latents, None, None, shape, self.device, "latents")
        _, ts, scale = self._plan(num_inference_steps, o)
        denoiser = self._in_coordinate(self.denoiser(guidance_scale), "t")
        return invert_ddim(denoiser, x0, ts, cond, callback, schedule=self.noise_schedule) / scale

    @torch.no_grad()
    def generate(self, prompt, **kwargs) -> torch.Tensor:
        """Images [B, 1, 32, 32] in [-1, 1], float32 on the CPU, for prompt(s); keyword arguments as
        `generate_latents`. The VAE decodes in its own dtype."""
        latents = self.generate_latents(prompt, **kwargs)
        vae_dtype = next(self.vae.parameters()).dtype
        return self.vae.decode_latents(latents.to(vae_dtype)).float().cpu()

    def __call__(self, prompt, **kwargs):
        """PIL images for prompt(s)."""
        from .viz import to_pil

        return [to_pil(img) for img in self.generate(prompt, **kwargs)]

    # ------------------------------------------------------------------------- save / load
    def save_pretrained(self, directory: str | Path, with_vae: bool = True, **info) -> Path:
        """Write the diffusers layout (module docstring); `info` (JSON) goes into model_index.json
        under "_tutorial_lib" (e.g. the training command and its figures). `with_vae=False` leaves the
        VAE out (it must be the shipped one, which loading then uses), to save space."""
        import diffusers

        directory = Path(directory)
        save_component(self.transformer, directory / "transformer")
        save_component(self.text_encoder, directory / "text_encoder")
        if with_vae:
            to_diffusers(self.vae).save_pretrained(directory / "vae", safe_serialization=True)
        elif weights_hash(self.vae) != weights_hash(load_vae()):
            raise ValueError("with_vae=False is for pipelines on the shipped VAE; this one has another.")
        component = [__name__, PipelineComponent.__name__]
        index = {"_class_name": [SHIM, type(self).__name__], "_diffusers_version": diffusers.__version__,
                 "transformer": component, "text_encoder": component,
                 "vae": ["diffusers", "AutoencoderKL"] if with_vae else [None, None],  # None: the shipped VAE
                 **{k: self.config[k] for k in OPTIONS},
                 "_tutorial_lib": {"vae_hash": weights_hash(self.vae), **info}}
        shim = (f'"""Lets diffusers.DiffusionPipeline.from_pretrained(this folder) build the pipeline: '
                f'needs `pip install tutorial_lib`."""\n'
                f"from {__name__} import {PipelineComponent.__name__}, {type(self).__name__}  # noqa: F401\n")
        atomic_write(directory / f"{SHIM}.py", lambda tmp: Path(tmp).write_text(shim))
        text = json.dumps(index, indent=1)
        atomic_write(directory / "model_index.json", lambda tmp: Path(tmp).write_text(text))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, vae: AutoencoderKL | None = None,
                        torch_dtype: torch.dtype | None = None) -> "TextToImagePipeline":
        """Load a folder written by `save_pretrained`; `vae` replaces its VAE only if it is the same one.
        Every part loads in float32 (whatever dtype it was saved in), then `torch_dtype` casts it."""
        directory = Path(directory)
        index_path = directory / "model_index.json"
        if not index_path.is_file():
            raise WeightsError(f"{directory} is not a saved pipeline (no model_index.json).")
        index = json.loads(index_path.read_text())
        saved_hash = index.get("_tutorial_lib", {}).get("vae_hash")
        if vae is not None and saved_hash != weights_hash(vae):
            raise WeightsError(f"{directory}: this denoiser was trained on latents of VAE {saved_hash}, "
                               f"but the VAE given is {weights_hash(vae)}; retrain it on that VAE's latents.")
        if vae is None and not (directory / "vae").is_dir():
            vae = load_vae()  # saved with_vae=False: the shipped VAE
            if weights_hash(vae) != saved_hash:
                raise WeightsError(missing_message(f"{directory} has no vae/ folder, and its denoiser was trained "
                                            f"on VAE {saved_hash}, not on the shipped one"))
        if vae is None:
            from diffusers import AutoencoderKL as DiffusersAutoencoderKL

            try:
                theirs = DiffusersAutoencoderKL.from_pretrained(directory / "vae", low_cpu_mem_usage=False)
            except (OSError, SafetensorError) as err:
                raise WeightsError(missing_message(f"{directory / 'vae'} does not load as a diffusers AutoencoderKL "
                                            f"({str(err)[:300]})")) from err
            vae = from_diffusers(theirs)
        options = {k: index[k] for k in OPTIONS if k in index}
        pipe = cls(load_component(directory / "transformer"), load_component(directory / "text_encoder"),
                   vae, **options)
        return pipe if torch_dtype is None else pipe.to(torch_dtype=torch_dtype)

    @staticmethod
    def training_info(directory: str | Path) -> dict:
        """What `save_pretrained(..., **info)` recorded (training command, figures), with the VAE hash."""
        return json.loads((Path(directory) / "model_index.json").read_text()).get("_tutorial_lib", {})

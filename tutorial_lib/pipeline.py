"""Prompt(s) -> images: text encoder -> guided sampler over the denoiser -> VAE decoder.

    cond, null = text_encoder(prompts), text_encoder("")           # null: what training dropped to
    F_guided   = F(x, t, null) + w (F(x, t, cond) - F(x, t, null))  # guidance.cfg_denoiser, every channel
    x0_hat     = the prediction F_guided (x0, eps, v or flow) converted to x0 (parametrizations)
    latents    = sampler(x0_hat, noise, the schedule's grid of num_inference_steps levels)
    images     = vae.decode(latents)

Saved in diffusers' directory layout (`save_pretrained`), so the folder is also a diffusers pipeline:

    model_index.json              the pipeline class, each component's (library, class), sampling config
    tutorial_pipeline.py          two lines that import this class: diffusers' custom-pipeline hook
    transformer/                  config.json + diffusion_pytorch_model.safetensors (DiT or TinyTransformer)
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
from pathlib import Path

import torch
from diffusers import DiffusionPipeline, ModelMixin
from diffusers.configuration_utils import ConfigMixin
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .diffusion.guidance import cfg_denoiser
from .diffusion.parametrizations import PREDICTIONS, well_defined, x0_denoiser
from .diffusion.samplers import SAMPLERS, samplers_for
from .diffusion.schedules import Schedule, get_schedule
from .models.dit import DiT, DiTConfig
from .models.tiny_transformer import TinyTransformer, TinyTransformerConfig
from .text import (MiniLMEncoder, OneHotConfig, OneHotEncoder, TextEmbedding, TextEncoder,
                   WordEncoder, WordEncoderConfig, check_prompts, load_clip_encoder)
from .vae.autoencoder import AutoencoderKL, load_vae
from .vae.diffusers_interop import from_diffusers, to_diffusers
from .weights import WeightsError, atomic_write, weights_hash

WEIGHTS = "diffusion_pytorch_model.safetensors"
SHIM = "tutorial_pipeline"
# Components saved as (config dataclass + safetensors): class name -> (class, config class).
TRAINED = {"DiT": (DiT, DiTConfig), "TinyTransformer": (TinyTransformer, TinyTransformerConfig),
           "WordEncoder": (WordEncoder, WordEncoderConfig), "OneHotEncoder": (OneHotEncoder, OneHotConfig)}
EPS_T_MAX = 0.99  # alpha = 0.016, SNR 2.5e-4 on the cosine schedule (DDPM's linear one ends at 4e-5)
OPTIONS = ("prediction", "schedule", "zero_terminal_snr", "sampler", "t_max")  # sampling config in model_index.json
PRETRAINED = ("MiniLMEncoder", "CLIPEncoder")  # saved as a name and a weights hash, not weights


def _concat(a: TextEmbedding, b: TextEmbedding) -> TextEmbedding:
    """Two conditions as one batch; the shorter token axis is padded (mask False)."""
    length = max(a.tokens.shape[1], b.tokens.shape[1])

    def pad(e: TextEmbedding) -> TextEmbedding:
        extra = length - e.tokens.shape[1]
        return TextEmbedding(torch.nn.functional.pad(e.tokens, (0, 0, 0, extra)),
                             torch.nn.functional.pad(e.mask, (0, extra)))

    a, b = pad(a), pad(b)
    return TextEmbedding(torch.cat([a.tokens, b.tokens]), torch.cat([a.mask, b.mask]))


def latent_shape(transformer) -> tuple[int, int, int]:
    """(C, H, W) of the latents the denoiser was built for."""
    cfg = transformer.config
    if isinstance(cfg, DiTConfig):
        return (cfg.in_channels, *cfg.input_size)
    return cfg.latent_channels, cfg.latent_size, cfg.latent_size


def start_level(prediction: str, schedule: Schedule) -> float:
    """Where sampling starts: t = 1, except where a `prediction` says nothing about x0 there (eps on a
    schedule that ends at SNR 0), which starts at EPS_T_MAX instead."""
    return 1.0 if well_defined(prediction, *schedule.alpha_sigma(torch.ones(1, dtype=torch.float64))) \
        else EPS_T_MAX


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


def _missing(what: str) -> str:
    return f"{what}; copy the whole folder that save_pretrained wrote, or save the pipeline again."


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
    path = folder / "config.json"
    if not folder.is_dir():
        raise WeightsError(_missing(f"{folder.parent} has no {folder.name}/ folder"))
    if not path.is_file():
        raise WeightsError(_missing(f"{folder} is not a pipeline component folder (no config.json)"))
    config = json.loads(path.read_text())
    name = config.pop("_class_name", None)
    if name in TRAINED:
        cls, config_cls = TRAINED[name]
        if not (folder / WEIGHTS).is_file():
            raise WeightsError(_missing(f"{folder} has no {WEIGHTS}: the {name}'s weights are missing"))
        try:
            state = load_file(str(folder / WEIGHTS))
        except (SafetensorError, OSError) as err:
            raise WeightsError(_missing(f"{folder / WEIGHTS} is not a readable safetensors file ({err}): "
                                        "truncated or corrupted")) from err
        try:
            module = cls(config_cls(**config))
            module.load_state_dict(state)
        except (TypeError, RuntimeError) as err:
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
            raise WeightsError(_missing(f"{folder} has no {' and no '.join(missing)} folder"))
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

    transformer   a denoiser F(x_t [B, C, H, W], t [B], TextEmbedding) -> [B, C, H, W]: the DiT, or
                  notebook 01's TinyTransformer; it predicts `prediction` on the `schedule`
    text_encoder  a tutorial_lib TextEncoder (the one it was trained with)
    vae           our AutoencoderKL (or a diffusers one, converted, in its dtype); default: the shipped
                  VAE, in the transformer's dtype
    sampler       one of diffusion.samplers.SAMPLERS that steps `schedule` (`samplers_for`)
    t_max         the noise level sampling starts from; below 1 for eps on a schedule ending at SNR 0

    Precision (`to(dtype)`, `from_pretrained(..., torch_dtype=)`): each network runs in its own dtype,
    while the sampler's state x_t, classifier-free guidance and the sampler's arithmetic stay in
    float32 (its coefficients in float64): x_t is cast to the transformer's dtype for each call and
    its output back to float32, and the final latents to the VAE's dtype to decode. In half
    precision a step's small update x_s - x_t would be rounded to 8 (bf16) or 11 (fp16) bits of
    x_t, and those errors would add up over the steps; kept in float32, only the networks' own
    rounding remains.
    """

    _optional_components = ["vae"]  # a component diffusers loads, though the default is the shipped VAE

    def __init__(self, transformer, text_encoder, vae=None, prediction: str = "x0", schedule: str = "cosine",
                 zero_terminal_snr: bool = False, sampler: str = "ddim", t_max: float = 1.0):
        super().__init__()
        if not 0 < t_max <= 1:
            raise ValueError(f"t_max, the noise level sampling starts from, must be in (0, 1], got {t_max}.")
        if prediction not in PREDICTIONS:
            raise ValueError(f"Unknown prediction {prediction!r}; choose from {', '.join(PREDICTIONS)}.")
        if sampler not in SAMPLERS:
            raise ValueError(f"Unknown sampler {sampler!r}; choose from {', '.join(SAMPLERS)}.")
        noise_schedule = get_schedule(schedule, zero_terminal_snr)
        if sampler not in samplers_for(noise_schedule):
            raise ValueError(f"The {sampler} sampler does not step the {schedule} schedule; on it choose "
                             f"from {', '.join(samplers_for(noise_schedule))}.")
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
        self.register_to_config(prediction=prediction, schedule=schedule,
                                zero_terminal_snr=zero_terminal_snr, sampler=sampler, t_max=t_max)
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

    def denoiser(self, guidance_scale: float):
        """D(x_t, t, (cond, null)) -> guided x0_hat: what the samplers integrate. The transformer sees
        x_t and the caption tokens in its dtype; guidance and conversion run in x_t's."""
        dtype = self.dtype

        def network(x: torch.Tensor, t: torch.Tensor, text: TextEmbedding) -> torch.Tensor:
            return self.transformer(x.to(dtype), t, TextEmbedding(text.tokens.to(dtype), text.mask)).to(x.dtype)

        guided = cfg_denoiser(network, guidance_scale, _concat)
        return x0_denoiser(guided, self.config.prediction, self.noise_schedule)

    @torch.no_grad()
    def generate_latents(self, prompt, num_inference_steps: int = 25, guidance_scale: float = 3.0,
                         seed: int | None = 0, generator: torch.Generator | None = None,
                         callback=None, eta: float = 0.0) -> torch.Tensor:
        """Scaled latents [B, C, H, W], float32, for prompt(s); the same seed gives the same latents.

        `generator` may live on the CPU (as `seed`'s does) or on the pipeline's device: noise is
        drawn on the generator's device and moved, so a seed gives the same draws on any device.
        `eta` is DDIM's (Song et al., 2021, eq. 16; 0: deterministic, 1: ancestral), for the ddim
        sampler only."""
        prompts = check_prompts(prompt)
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps is an int >= 1, got {num_inference_steps!r}.")
        if eta != 0 and self.config.sampler != "ddim":
            raise ValueError(f"eta is the ddim sampler's; this pipeline samples with {self.config.sampler}.")
        if generator is None:
            generator = torch.Generator().manual_seed(0 if seed is None else seed)
        for m in (self.transformer, self.text_encoder, self.vae):
            m.eval()  # condition dropout and any other training behaviour off
        shape = (len(prompts), *latent_shape(self.transformer))
        noise = torch.randn(shape, generator=generator, device=generator.device).to(self.device)  # float32
        cond = self.text_encoder.encode(prompts)
        null = self.text_encoder.null(len(prompts))  # exactly what training dropped to
        sampler = SAMPLERS[self.config.sampler]
        kwargs = {"schedule": self.noise_schedule}
        if self.config.sampler in ("ddpm", "ddim"):
            kwargs["generator"] = generator
        if self.config.sampler == "ddim":
            kwargs["eta"] = eta
        ts = self.noise_schedule.grid(num_inference_steps, t_max=self.config.t_max)
        if not well_defined(self.config.prediction, *self.noise_schedule.alpha_sigma(ts[:1])):
            raise ValueError(f"An {self.config.prediction} prediction says nothing about the image at "
                             f"t_max = {self.config.t_max}, where the {self.config.schedule} schedule's SNR is 0; "
                             f"start below it (e.g. t_max=0.99) or train v or flow (notebook 04).")
        return sampler(self.denoiser(guidance_scale), noise, ts, (cond, null), callback, **kwargs)

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
                raise WeightsError(_missing(f"{directory} has no vae/ folder, and its denoiser was trained "
                                            f"on VAE {saved_hash}, not on the shipped one"))
        if vae is None:
            from diffusers import AutoencoderKL as DiffusersAutoencoderKL

            try:
                theirs = DiffusersAutoencoderKL.from_pretrained(directory / "vae", low_cpu_mem_usage=False)
            except (OSError, SafetensorError) as err:
                raise WeightsError(_missing(f"{directory / 'vae'} does not load as a diffusers AutoencoderKL "
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

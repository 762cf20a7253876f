"""Command line: `python -m tutorial_lib COMMAND --help`.

  train-classifier   train the yardstick classifier       -> tutorial_lib/assets/classifier.safetensors
  train-vae          train the KL autoencoder             -> tutorial_lib/assets/vae.safetensors
  encode-latents     encode Fashion-MNIST once into the latent cache under data/
  train              train a text-to-image model on the cached latents: notebook 03's DiT (--model dit),
                     notebook 07's MMDiT (--model mmdit) or UNet (--model unet), or notebook 01's tiny
                     transformer (--model tiny_transformer); torchrun: DDP or FSDP
  sample             write a sample grid, one row per prompt (--prompt "..."; default: the class prompts)
  evaluate           class accuracy and feature-space FID of a model's samples
  posthoc-ema        EDM2 post-hoc EMA of a `train --model dit --posthoc-ema` run: reconstruct
                     sigma_rels from its snapshots, optionally evaluate them, save one as a pipeline
  demo               train briefly, write a sample grid, evaluate (the README's first command)

A wrong input (a bad flag value, a missing folder, weights that do not fit: `user_errors()`) prints one
line and exits with status 2; TUTORIAL_DEBUG=1 shows the full traceback instead. Called in-process
with an argument list, `main(argv)` raises those errors as they are (for notebooks and tests).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from .paths import ASSETS_DIR


def _cmd_train_classifier(a):
    from .train.classifier import train_classifier
    from .weights import save_weights

    a.out = _out_file(a.out, "classifier.safetensors")
    model, acc = train_classifier(epochs=a.epochs, batch_size=a.batch_size, seed=a.seed, device=a.device)
    save_weights(model, a.out, "classifier", {"test_accuracy": acc, "epochs": a.epochs, "seed": a.seed})
    print(json.dumps({"test_accuracy": round(acc, 4), "weights": str(a.out)}))


def _cmd_train_vae(a):
    from .eval.reconstruction import evaluate_vae
    from .train.vae import VAETrainConfig, train_vae
    from .vae.autoencoder import VAEConfig
    from .vae.losses import VAELossConfig
    from .weights import save_weights

    a.out = _out_file(a.out, "vae.safetensors")
    model = VAEConfig(channels=tuple(int(c) for c in a.channels.split(",")), num_res_blocks=a.res_blocks,
                      latent_channels=a.latent_channels, norm_groups=a.norm_groups,
                      mid_attention=not a.no_mid_attention)
    loss = VAELossConfig(reconstruction=a.reconstruction, kl_weight=a.kl_weight,
                         perceptual_weight=a.perceptual_weight, disc_weight=a.disc_weight,
                         disc_start=a.disc_start)
    cfg = VAETrainConfig(steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed, model=model,
                         loss=loss, init=str(a.init) if a.init else None)
    start = time.perf_counter()
    vae, _ = train_vae(cfg, device=a.device)
    seconds = time.perf_counter() - start
    metrics = evaluate_vae(vae)
    record = {**asdict(cfg), "model": asdict(vae.config)}  # with --init, the model is the loaded one
    save_weights(vae, a.out, "vae", {**metrics, "train_seconds": seconds, "train_config": record})
    print(json.dumps({**metrics, "train_seconds": round(seconds), "scaling_factor": vae.config.scaling_factor,
                      "shift_factor": vae.config.shift_factor, "weights": str(a.out)}))


def _load_vae(path: Path | None):
    """The shipped VAE (None), our weights file (.safetensors), a diffusers AutoencoderKL folder, or a
    Hub id of one when online (e.g. stabilityai/sdxl-vae), as our AutoencoderKL (the pipeline's VAE
    class; a diffusers one converts exactly)."""
    from .vae.autoencoder import load_vae

    if path is None or path.suffix == ".safetensors":
        return load_vae(path)
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    from .vae.diffusers_interop import from_diffusers

    if path.exists() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"--vae {path}: not a diffusers AutoencoderKL folder (no config.json) "
                                "nor a .safetensors file of ours.")
    if not path.exists() and len(path.parts) != 2:
        raise FileNotFoundError(f"--vae {path}: no such folder or file (nor a Hub id, owner/name).")
    try:
        theirs = DiffusersAutoencoderKL.from_pretrained(str(path), low_cpu_mem_usage=False)
    except OSError as err:  # a Hub id offline, or not a VAE
        raise FileNotFoundError(f"--vae {path}: not a local folder, and it could not be loaded from the Hub "
                                f"({type(err).__name__}); go online once, or pass a local AutoencoderKL folder.") from err
    return from_diffusers(theirs)


def _encode_data(a, info):
    """Encode --data with --vae into latent shards (each rank its own shards, images decoded in DataLoader
    workers, the VAE in bfloat16 on a GPU unless its config sets force_upcast), and with a frozen
    --text-encoder, run on --device, its captions into an embedding cache beside them; every rank waits
    for all. Returns (TextToImageRecords, the VAE on the CPU)."""
    import torch

    from .data.shards import DTYPES, LatentShards, encode_shards
    from .data.sources import Preprocess, SourceSpec
    from .paths import data_root
    from .text import text_encoder
    from .text.embedding_cache import CaptionEmbeddingCache, encode_caption_cache
    from .train import distributed
    from .train.records import TextToImageRecords

    vae = _load_vae(a.vae).to(a.device)
    spec = SourceSpec.resolve(a.data, split=a.split, image_column=a.image_column, text_column=a.text_column,
                              label_column=a.label_column, limit=a.limit)
    resize = a.resize or ("center_crop" if a.resolution else "none")
    preprocess = Preprocess(a.resolution, resize, vae.config.in_channels)
    root = a.latents_dir or data_root() / "shards"

    def wait():
        distributed.barrier(info)

    folder = encode_shards(spec, vae, root, preprocess, a.shard_size, DTYPES[a.latent_dtype], rank=info.rank,
                           world_size=info.world_size, num_workers=a.decode_workers, barrier=wait,
                           vae_dtype=torch.bfloat16 if torch.device(a.device).type == "cuda" else None)
    latents = LatentShards(folder)
    captions = None
    encoder = text_encoder(a.text_encoder) if a.text_encoder not in (None, "word") else None
    if encoder is not None and encoder.frozen:
        cache = folder / f"text-{encoder.cache_key()}"
        encode_caption_cache(latents.captions(), encoder.to(a.device), cache, rank=info.rank,
                             world_size=info.world_size, barrier=wait)
        captions = CaptionEmbeddingCache(cache, encoder.cache_key(), latents.captions())
        encoder.cpu()
    return TextToImageRecords(latents, captions), vae.cpu()


def _cmd_encode_latents(a):
    from .train import distributed

    if a.data is None:
        from .data.latents import latent_cache

        print(latent_cache())
        return
    with distributed.process_group() as info:
        records, _ = _encode_data(a, info)
    print(records.latents)
    if records.captions is not None:
        print(f"caption embeddings: {records.captions.folder} ({records.captions.index['num_rows']} rows)")


def _load_pipe(a):
    from .pipeline import TextToImagePipeline

    return TextToImagePipeline.from_pretrained(a.model).to(a.device)


def _sample_grid(pipe, path: Path, per_prompt: int, steps: int, guidance_scale: float, seed: int,
                 sampling: dict, prompts=None):
    """Sample `per_prompt` images of each prompt (default: the class prompts) and save them to `path` as a
    grid, one row per prompt labelled with it; returns the images [len(prompts) * per_prompt, 1, H, W]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .data.captions import CLASS_PROMPTS
    from .viz import show_grid

    prompts = list(prompts or CLASS_PROMPTS)
    images = pipe.generate([p for p in prompts for _ in range(per_prompt)], num_inference_steps=steps,
                           guidance_scale=guidance_scale, seed=seed, **sampling)
    path.parent.mkdir(parents=True, exist_ok=True)
    plt.close(show_grid(images, per_prompt, row_labels=prompts, path=path))
    return images


def _save_images(images, prompts: list[str], per_prompt: int, folder: Path):
    """Each image as FOLDER/prompt-PP_image-II.png and the prompts as FOLDER/prompts.txt (prompt PP on line
    PP + 1); a previous run's prompt-*_image-*.png there are removed first, so the folder is this run's."""
    from .viz import to_pil

    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("prompt-*_image-*.png"):
        old.unlink()
    pw, iw = max(2, len(str(len(prompts) - 1))), max(2, len(str(per_prompt - 1)))
    for i, image in enumerate(images):
        to_pil(image).save(folder / f"prompt-{i // per_prompt:0{pw}d}_image-{i % per_prompt:0{iw}d}.png")
    (folder / "prompts.txt").write_text("".join(p + "\n" for p in prompts))


def _evaluate(pipe, a) -> dict:
    from .eval.metrics import evaluate_pipeline

    results, guidance = {}, _guidance(a)
    for kind in a.prompts.split(","):
        r, _ = evaluate_pipeline(pipe, kind, per_prompt=a.per_prompt, num_inference_steps=a.inference_steps,
                                 guidance_scale=a.guidance_scale, seed=a.seed, **_sampling(a), **guidance)
        if "guide" in guidance:
            r["guide"] = f"{a.guide} ({r['guide']})"
        results[kind] = _rounded(r)
    return results


def _rounded(value):
    """Floats to 4 decimals, in nested dicts too (for JSON a person reads)."""
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return round(value, 4) if isinstance(value, float) else value


def _floats(text: str) -> tuple[float, ...]:
    """'0.05,0.10' -> (0.05, 0.1), for argparse."""
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    """'q,kv,out' -> ('q', 'kv', 'out'), for argparse."""
    names = tuple(n.strip() for n in text.split(","))
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


def _positive(text: str) -> int:
    """'8' -> 8, an int >= 1, for argparse."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _prompt_sets(text: str) -> str:
    """'class,held_out', checked (unknown names are a usage error before any model loads), for argparse."""
    from .data.captions import prompt_set

    for kind in text.split(","):
        try:
            prompt_set(kind)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    return text


# Per-architecture defaults of the flags left unset: notebook 01's recipe for its tiny transformer
# (x0-prediction, t ~ Beta(1, 2.5), a word encoder trained with it), notebook 03's for the DiT, the MMDiT
# and the UNet (notebook 07 compares them at one recipe).
ARCHITECTURE_DEFAULTS = {
    "tiny_transformer": {"preset": "cpu", "text_encoder": "word", "prediction": "x0", "t_distribution": "beta"},
    "dit": {"preset": "tiny", "text_encoder": "minilm", "prediction": "v", "t_distribution": "uniform"},
    "mmdit": {"preset": "tiny", "text_encoder": "minilm", "prediction": "v", "t_distribution": "uniform"},
    "unet": {"preset": "tiny", "text_encoder": "minilm", "prediction": "v", "t_distribution": "uniform"},
}


def _model_config(a):
    """The denoiser's config: a preset of the architecture, with the text encoder's width."""
    from .models import dit, mmdit, tiny_transformer, unet

    return {"dit": dit, "mmdit": mmdit, "unet": unet, "tiny_transformer": tiny_transformer}[a.model].preset(a.preset)


def _train_config(a):
    from .train.lora import LoRAConfig
    from .train.text_to_image import Objective, TextToImageConfig
    from .train.trainer import TrainerConfig

    if a.config:
        cfg = TextToImageConfig.from_dict(json.loads(Path(a.config).read_text()))
        cfg.trainer.device = cfg.trainer.device or a.device  # the file's device wins; else --device
        return cfg
    for name, value in ARCHITECTURE_DEFAULTS[a.model].items():
        if getattr(a, name) is None:
            setattr(a, name, value)
    objective = Objective(prediction=a.prediction, schedule=a.schedule, zero_terminal_snr=a.zero_terminal_snr,
                          cond_drop=a.cond_drop, t_distribution=a.t_distribution, t_shift=a.t_shift,
                          min_snr_gamma=a.min_snr_gamma, offset_noise=a.offset_noise,
                          input_perturbation=a.input_perturbation, P_mean=a.p_mean, P_std=a.p_std,
                          sigma_data=a.sigma_data, mask_ratio=a.mask_ratio)
    trainer = TrainerConfig(steps=a.steps, batch_size=a.batch_size, lr=a.lr, warmup_steps=a.warmup,
                            schedule=a.lr_schedule, lr_decay_start=a.lr_decay_start,
                            grad_accum_steps=a.grad_accum, ema_decay=a.ema_decay,
                            posthoc_ema_sigma_rels=a.posthoc_ema, posthoc_snapshot_every=a.posthoc_snapshot_every,
                            mixed_precision=a.mixed_precision, compile=a.compile, seed=a.seed,
                            out_dir=str(a.out / "run"), checkpoint_every=a.checkpoint_every,
                            parallelism=a.parallelism, dist_timeout_minutes=a.dist_timeout,
                            activation_checkpointing=a.activation_checkpointing,
                            num_workers=a.num_workers, device=a.device)
    kwargs = {"dim": _model_config(a).text_dim} if a.text_encoder == "word" else {}
    if a.lora_rank is None and (a.lora_alpha is not None or a.lora_targets is not None):
        raise ValueError("--lora-alpha and --lora-targets shape a LoRA adapter: give its --lora-rank too.")
    lora = None if a.lora_rank is None else LoRAConfig(a.lora_rank, a.lora_alpha, a.lora_targets)
    return TextToImageConfig(model=_model_config(a), architecture=a.model, text_encoder=a.text_encoder,
                             text_encoder_kwargs=kwargs, objective=objective, trainer=trainer,
                             init_from=None if a.init_from is None else str(a.init_from), lora=lora)


def _cmd_train(a):
    from .train import distributed

    cfg = _train_config(a)
    # Join the process group first, so that only rank 0 encodes the cache; leave it at the end, also on error.
    with distributed.process_group(cfg.trainer.dist_timeout_minutes) as info:
        return _train(a, cfg, info)


def _train(a, cfg, info):
    """`train`'s work once the process group is joined: data, training, then the pipeline on rank 0."""
    from .data.latents import latent_cache
    from .diffusion.samplers import default_sampler
    from .pipeline import TextToImagePipeline, start_level
    from .text import text_encoder
    from .train import distributed
    from .train.records import train_on_records
    from .train.text_to_image import train_text_to_image

    start = time.perf_counter()
    if a.data is None:  # Fashion-MNIST with class captions (notebooks 01 and 03)
        vae = None
        latents, labels = distributed.main_first(latent_cache, info).tensors("train")
        start = time.perf_counter()
        trainer = train_text_to_image(cfg, latents, labels, resume=a.resume)
    else:
        a.text_encoder = cfg.text_encoder
        records, vae = _encode_data(a, info)
        if not a.config:  # a config file says exactly what to build: train_on_records checks it
            cfg.model = _fit_latents(cfg, records.latents.latent_shape)
        start = time.perf_counter()
        trainer = train_on_records(cfg, records, posterior=a.posterior, resume=a.resume)
    seconds = time.perf_counter() - start
    ema = trainer.export_ema()  # every rank takes part; rank 0 gets the model
    if not info.is_main:
        return None
    record = {"command": "python -m tutorial_lib " + " ".join(a.argv), "train_seconds": seconds,
              "final_loss": trainer.history[-1]["loss"], "train_config": cfg.to_dict()}
    if cfg.lora is not None:
        return _save_adapter(trainer, ema, a.out, record)
    encoder = ema.text_encoder or text_encoder(cfg.text_encoder, **cfg.text_encoder_kwargs)
    o = cfg.objective  # an EDM run's sigma_data, measured when training started, is recorded here
    pipe = TextToImagePipeline(ema.transformer, encoder, vae, prediction=o.prediction, schedule=o.schedule,
                               zero_terminal_snr=o.zero_terminal_snr, sigma_data=o.sigma_data,
                               sampler=default_sampler(o.noise_schedule(), o.prediction),
                               t_max=start_level(o.prediction, o.noise_schedule()))
    pipe.save_pretrained(a.out, with_vae=not a.without_vae, **record)
    print(json.dumps({"model": str(a.out), "train_seconds": round(seconds, 1),
                      "final_loss": round(record["final_loss"], 4)}))
    return pipe


def _save_adapter(trainer, ema, out: Path, record: dict):
    """A LoRA run's result: the EMA's adapter alone in OUT, in peft's format (train/lora.py), with the run's
    record and the adapter's size against the denoiser's in OUT/training.json."""
    from .train.lora import save_lora, trainable_share

    adapter, base = trainable_share(trainer.model.transformer)
    save_lora(ema.transformer, out, **record, adapter_parameters=adapter, base_parameters=base)
    print(json.dumps({"adapter": str(out), "adapter_parameters": adapter, "base_parameters": base,
                      "train_seconds": round(record["train_seconds"], 1), "final_loss": round(record["final_loss"], 4)}))


def _fit_latents(cfg, shape):
    """The preset's config for latents of `shape` (C, h, w): presets are sized for the shipped VAE's 4x8x8,
    so their channels and size follow the VAE given with --data."""
    import dataclasses

    c, h, w = shape
    if cfg.architecture in ("dit", "mmdit", "unet"):
        return dataclasses.replace(cfg.model, in_channels=c, input_size=(h, w))
    if h != w:
        raise ValueError(f"The tiny transformer takes square latents; the VAE made {c}x{h}x{w}.")
    return dataclasses.replace(cfg.model, latent_channels=c, latent_size=h)


def _cmd_sample(a):
    from .data.captions import CLASS_PROMPTS

    a.out = _out_file(a.out, "samples.png")
    if not a.out.suffix:
        raise ValueError(f"--out {a.out} is the grid's image file: give it an extension, e.g. {a.out}.png, or "
                         "an existing folder to write samples.png in.")
    if a.prompt and not all(p.strip() for p in a.prompt):
        raise ValueError("--prompt: a prompt is empty.")
    prompts = list(a.prompt or CLASS_PROMPTS)
    pipe = _load_pipe(a)
    sampling = {**_sampling(a), **_guidance(a), **_editing(a, pipe)}
    images = _sample_grid(pipe, a.out, a.num_images, a.inference_steps, a.guidance_scale, a.seed, sampling, prompts)
    folder = a.out.with_suffix("")
    _save_images(images, prompts, a.num_images, folder)
    print(f"sample grid: {a.out}\nimages: {folder}/ ({len(images)}: prompt-PP_image-II.png, prompts in prompts.txt)")


def _cmd_evaluate(a):
    print(json.dumps(_evaluate(_load_pipe(a), a), indent=1))


def _guidance(a) -> dict:
    """The guidance flags given (--negative-prompt, --guidance-interval, --guidance-rescale, --guide; `sample`
    and `evaluate` have them), as keyword arguments of `generate`; --guide loaded as a pipeline on --device."""
    from .pipeline import TextToImagePipeline

    interval, guide = getattr(a, "guidance_interval", None), getattr(a, "guide", None)
    kwargs = {"negative_prompt": getattr(a, "negative_prompt", None),
              "guidance_rescale": getattr(a, "guidance_rescale", None),
              "guidance_interval": None if interval is None else tuple(interval),
              "guide": None if guide is None else TextToImagePipeline.from_pretrained(guide).to(a.device)}
    return {k: v for k, v in kwargs.items() if v is not None}


def _read_image(path: Path, size: tuple[int, int], channels: int, mode: str):
    """An image file as a tensor [1, C, H, W] of `size` (resized if it is not, aspect not kept): `mode`
    "image" gives values in [-1, 1], "mask" 1 where the pixel is light (>= 128: regenerate), 0 where dark."""
    import numpy as np
    import torch
    from PIL import Image

    if not path.is_file():
        raise FileNotFoundError(2, f"No such image file (--{'init-image' if mode == 'image' else 'mask'})", str(path))
    try:
        with Image.open(path) as image:
            image = image.convert("L" if channels == 1 or mode == "mask" else "RGB")
    except OSError as err:
        raise ValueError(f"{path}: not an image file PIL can read ({err}).") from err
    h, w = size
    if image.size != (w, h):
        image = image.resize((w, h), Image.NEAREST if mode == "mask" else Image.BICUBIC)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy())
    pixels = pixels[None] if pixels.ndim == 2 else pixels.permute(2, 0, 1)
    return (pixels >= 128).float()[None] if mode == "mask" else (pixels / 127.5 - 1)[None]


def _editing(a, pipe) -> dict:
    """--init-image, --strength and --mask as `generate`'s init_latents, strength and mask: the image resized to
    the model's resolution and encoded by its VAE; the mask (light = regenerate, dark = keep) at that resolution,
    max-pooled onto the latent grid (a latent cell is regenerated if any of its pixels is)."""
    import torch

    from .pipeline import latent_shape

    if a.init_image is None:
        if a.strength is not None or a.mask is not None:
            raise ValueError(f"{'--strength' if a.strength is not None else '--mask'} edits an input image: give it "
                             "with --init-image PATH.")
        return {}
    factor = pipe.vae.config.downsample_factor
    _, h, w = latent_shape(pipe.transformer)
    image = _read_image(a.init_image, (h * factor, w * factor), pipe.vae.config.in_channels, "image")
    vae_dtype = next(pipe.vae.parameters()).dtype
    with torch.no_grad():
        latents = pipe.vae.encode_to_latents(image.to(pipe.device, vae_dtype)).float()
    kwargs = {"init_latents": latents, "strength": a.strength}
    if a.mask is not None:
        mask = _read_image(a.mask, (h * factor, w * factor), 1, "mask")
        kwargs["mask"] = torch.nn.functional.max_pool2d(mask, factor)
    return {k: v for k, v in kwargs.items() if v is not None}


# ----------------------------------------------------------------------------- post-hoc EMA
def _averaged_parts(pipe) -> dict:
    """The pipeline's modules that training averaged, by their name in the trained model (and in its
    snapshots): the transformer, and the text encoder where it was learned."""
    parts = {"transformer": pipe.transformer}
    if not pipe.text_encoder.frozen:
        parts["text_encoder"] = pipe.text_encoder
    return parts


def _check_fits(parts: dict, shapes: dict, snapshots: Path, model: Path):
    """Refuse snapshots whose tensors (names and shapes) are not exactly those of the pipeline's `parts`."""
    from .weights import WeightsError

    ours = {f"{name}.{k}": list(v.shape) for name, m in parts.items() for k, v in m.state_dict().items()}
    if shapes == ours:
        return
    wrong = [f"{k} {shapes[k]} vs {ours[k]}" for k in sorted(shapes.keys() & ours.keys()) if shapes[k] != ours[k]]
    problems = [f"{what} {names[:3]}{' ...' if len(names) > 3 else ''}" for what, names in
                (("missing", sorted(ours.keys() - shapes.keys())), ("unexpected", sorted(shapes.keys() - ours.keys())),
                 ("shape (snapshot vs pipeline)", wrong)) if names]
    raise WeightsError(f"The snapshots in {snapshots} do not fit the pipeline in {model} (another run or "
                       f"config?): {'; '.join(problems)}.")


def _load_parts(parts: dict, state: dict):
    """Load a trained-model state ("transformer.*", "text_encoder.*") into the pipeline's parts, strictly."""
    for name, module in parts.items():
        prefix = name + "."
        module.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)


def _cmd_posthoc_ema(a):
    """Reconstruct the post-hoc EMAs of --sigma-rels (train/ema.py) from a run's snapshots in one pass;
    with --evaluate, measure each and the pipeline's stored EMA on the same noise; with --out, save one."""
    from .pipeline import TextToImagePipeline
    from .train.ema import SnapshotError, load_snapshots, reconstruct_emas
    from .weights import atomic_write

    sigma_rels = tuple(dict.fromkeys(a.sigma_rels))
    sweep = len(sigma_rels) > 1
    if a.out and sweep and not a.evaluate:
        raise ValueError(f"--out saves one pipeline: give one --sigma-rels, or add --evaluate to save the one of "
                         f"{list(sigma_rels)} with the lowest class-prompt FID.")
    if a.out and sweep and "class" not in a.prompts.split(","):
        raise ValueError("--out with several sigma_rels saves the lowest class-prompt FID: include class in --prompts.")
    if a.out and a.out.resolve() == a.model.resolve():
        raise ValueError(f"--out {a.out} is the source pipeline: write to another folder, so its stored EMA stays.")
    folder = a.snapshots or a.model / "run" / "posthoc_ema"
    if not folder.is_dir():
        raise SnapshotError(f"No post-hoc EMA snapshots folder {folder}: train with `train --model dit --posthoc-ema "
                            "0.05,0.10 --posthoc-snapshot-every N` (it writes OUT/run/posthoc_ema), or pass "
                            "--snapshots.")
    snapshots = load_snapshots(folder)
    pipe = TextToImagePipeline.from_pretrained(a.model).to(a.device)
    parts = _averaged_parts(pipe)
    _check_fits(parts, snapshots[-1].shapes, folder, a.model)
    emas = reconstruct_emas(snapshots, sigma_rels, a.step)
    command = "python -m tutorial_lib " + " ".join(a.argv)
    record = {"model": str(a.model), "snapshots": str(folder), "step": emas[0].step,
              "tracked_sigma_rels": list(snapshots[0].sigma_rels), "command": command,
              "sigma_rels": {str(e.sigma_rel): {"gamma": e.gamma, "residual": e.residual} for e in emas}}
    chosen = emas[0]
    if a.evaluate:
        record["sampling"] = {"prompts": a.prompts, "per_prompt": a.per_prompt, "inference_steps": a.inference_steps,
                              "guidance_scale": a.guidance_scale, "seed": a.seed, **_sampling(a)}
        record["stored"] = _evaluate(pipe, a)  # the fixed EMA the pipeline was saved with, before any load
        for e in emas:
            _load_parts(parts, e.state_dict)
            record["sigma_rels"][str(e.sigma_rel)]["metrics"] = _evaluate(pipe, a)
        if sweep and a.out:
            chosen = min(emas, key=lambda e: record["sigma_rels"][str(e.sigma_rel)]["metrics"]["class"]["fid"])
    if a.out:
        _load_parts(parts, chosen.state_dict)
        posthoc = {"sigma_rel": chosen.sigma_rel, "step": chosen.step, "snapshots": str(folder), "command": command}
        if sweep:
            posthoc["chosen_by"] = f"lowest class-prompt FID of sigma_rels {list(sigma_rels)}"
        info = {k: v for k, v in TextToImagePipeline.training_info(a.model).items() if k != "vae_hash"}
        pipe.save_pretrained(a.out, with_vae=(a.model / "vae").is_dir(), **{**info, "posthoc_ema": posthoc})
        record["saved"] = {"out": str(a.out), **posthoc}
    text = json.dumps(record, indent=1)
    if a.json:
        a.json = _out_file(a.json, "posthoc_ema.json")
        atomic_write(a.json, lambda tmp: Path(tmp).write_text(text + "\n"))
    print(text)


def _cmd_demo(a):
    from .budget import current, pick

    budget = current()
    steps = a.steps or pick(smoke=20, default=1200, full=6000)
    a.per_prompt = a.per_prompt or pick(smoke=10, default=50, full=100)
    a.out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(a.out / "model" / "run", ignore_errors=True)  # the demo's own previous run: start afresh
    _shipped_grid(a)
    print(f"demo, budget {budget!r}: training the notebook-01 model for {steps} steps on {a.device}")
    train = build_parser().parse_args(
        ["train", "--model", "tiny_transformer", "--preset", a.preset or "cpu", "--steps", str(steps),
         "--batch-size", str(a.batch_size), "--lr", str(a.lr), "--seed", str(a.seed), "--device", a.device,
         "--out", str(a.out / "model")])
    train.argv = ["train", *a.argv[1:]]
    pipe = _cmd_train(train)
    grid = a.out / "samples.png"
    _sample_grid(pipe, grid, 8, a.inference_steps, a.guidance_scale, a.seed, _sampling(a))
    metrics = _evaluate(pipe, a)
    (a.out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print(json.dumps(metrics, indent=1))
    print(f"sample grid (one row per class prompt): {grid.resolve()}")
    print(f"metrics: {(a.out / 'metrics.json').resolve()}")


def _shipped_grid(a):
    """First, in seconds: the shipped DiT's samples of the class prompts, before the demo trains its own."""
    from .pipeline import TextToImagePipeline
    from .weights import asset

    grid = a.out / "shipped_dit_t2i.png"
    try:
        pipe = TextToImagePipeline.from_pretrained(asset("dit_t2i")).to(a.device)
    except (ImportError, RuntimeError) as err:  # MiniLM's package missing: the demo goes on without it
        print(f"demo: skipping the shipped DiT's grid ({err})")
        return
    _sample_grid(pipe, grid, 8, a.inference_steps, a.guidance_scale, a.seed, _sampling(a))
    print(f"the shipped DiT (notebook 03), one row per class prompt: {grid.resolve()}")


def _add_data(p):
    from .data.shards import DTYPES
    from .data.sources import BUILTINS, RESIZE_POLICIES

    g = p.add_argument_group("data", "any image-caption source, encoded once into latent shards (default, "
                             "without --data: Fashion-MNIST with class captions from the latent cache)")
    g.add_argument("--data", help="an imagefolder (images + metadata.jsonl with a caption column), parquet "
                   f"file(s) or folder, a built-in ({', '.join(BUILTINS)}), or a Hub dataset name (online)")
    g.add_argument("--split", default="train", help="the split to read (default: %(default)s)")
    g.add_argument("--image-column", default="image", help="the image column (default: %(default)s)")
    g.add_argument("--text-column", default="caption", help="the caption column (default: %(default)s)")
    g.add_argument("--label-column", help="a class-label column to keep with the records (default: none)")
    g.add_argument("--limit", type=int, help="use the first LIMIT records only")
    g.add_argument("--resolution", type=int, help="image size before encoding (default: the images' own, "
                   "which must then all be equal)")
    g.add_argument("--resize", choices=RESIZE_POLICIES,
                   help="how images reach --resolution: center_crop (short side, then the centre), resize "
                   "(aspect not kept), pad (centred on background; Fashion-MNIST's 28 -> 32), none (all "
                   "must already match) (default: center_crop with --resolution, else none)")
    g.add_argument("--vae", type=Path, help="a diffusers AutoencoderKL folder, or our .safetensors weights "
                   "(default: the shipped VAE)")
    g.add_argument("--latent-dtype", choices=tuple(DTYPES), default="bfloat16",
                   help="storage dtype of the latent shards (default: %(default)s)")
    g.add_argument("--shard-size", type=_positive, default=4096, help="records per shard (default: %(default)s)")
    g.add_argument("--latents-dir", type=Path, help="where encodings live (default: data/shards)")
    g.add_argument("--decode-workers", type=int, help="DataLoader workers per rank that decode and resize "
                   "images (default: the cores shared among the node's ranks, at most 8)")


def _add_common(p):
    from .budget import device

    p.add_argument("--device", default=device(), help="cpu or cuda (default: cuda if present)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")


def _add_train(p, steps):
    p.add_argument("--preset", help="model size: tiny (default), tiny-moe, tiny-mixer, tiny-single, tiny-integrator, "
                   "tiny-guide (notebook 08's autoguidance guide), "
                   "DiT-S/2, MoE-DiT-XL/2, ... for --model dit (models/dit.py PRESETS); tiny (default), "
                   "MMDiT-S/2, ... for --model mmdit (models/mmdit.py PRESETS); tiny (default), small, SD-1.5 for --model "
                   "unet (models/unet.py PRESETS); cpu (default) or base for --model tiny_transformer")
    p.add_argument("--steps", type=int, default=steps, help="optimizer steps (default: %(default)s)"
                   if steps else "optimizer steps (default: by TUTORIAL_BUDGET: 20, 1200 or 6000)")
    p.add_argument("--batch-size", type=int, default=128, help="images per step (default: %(default)s)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default: %(default)s)")


# Sampling flags (destinations named as `generate` takes them) that override the pipeline's recorded
# SAMPLING_OPTIONS, and generate's eta; a flag left at None is not passed.
SAMPLING_FLAGS = ("sampler", "eta", "sigma_min", "sigma_max", "rho", "S_churn", "S_tmin", "S_tmax", "S_noise")


def _sampling(a) -> dict:
    """The sampling overrides given on the command line, as keyword arguments of `generate`."""
    return {k: getattr(a, k) for k in SAMPLING_FLAGS if getattr(a, k) is not None}


def _add_sampling(p):
    from .diffusion.samplers import SAMPLERS, SIGMA_SAMPLERS

    p.add_argument("--inference-steps", type=int, default=25, help="sampler steps (default: %(default)s)")
    p.add_argument("--guidance-scale", type=float, default=3.0,
                   help="classifier-free guidance scale; 1: no guidance (default: %(default)s)")
    g = p.add_argument_group("sampler", "overrides of the pipeline's recorded sampling options (default: the "
                             "recorded value); the pipeline refuses a sampler that cannot step its model")
    g.add_argument("--sampler", choices=(*SAMPLERS, *SIGMA_SAMPLERS), help="the sampling method")
    g.add_argument("--eta", type=float, help="DDIM's eta, ddim only (default 0: deterministic; 1: ancestral)")
    g.add_argument("--sigma-min", type=float, help="the Karras grid's lowest sigma (EDM: 0.002)")
    g.add_argument("--sigma-max", type=float, help="the Karras grid's highest sigma (EDM: 80; capped at "
                   "the schedule's sigma(t_max) where the model or the sampler steps in t)")
    g.add_argument("--rho", type=float, help="the Karras grid's spacing (EDM: 7)")
    g.add_argument("--s-churn", dest="S_churn", type=float,
                   help="edm_euler, edm_heun: churn (Karras et al., 2022, Algorithm 2; 0: none)")
    g.add_argument("--s-tmin", dest="S_tmin", type=float, help="churn only where sigma >= S_tmin")
    g.add_argument("--s-tmax", dest="S_tmax", type=float, help="churn only where sigma <= S_tmax (inf: no bound)")
    g.add_argument("--s-noise", dest="S_noise", type=float, help="the churn noise's std (EDM: 1.003 on ImageNet-64)")


def _add_guidance(p):
    g = p.add_argument_group("guidance", "variants of classifier-free guidance (diffusion/guidance.py)")
    g.add_argument("--negative-prompt", metavar="TEXT",
                   help="guide away from this prompt instead of the null one (for every prompt)")
    g.add_argument("--guidance-interval", type=float, nargs=2, metavar=("LO", "HI"),
                   help="guide only at noise levels sigma in (LO, HI], elsewhere sample the conditional prediction "
                   "(Kynkäänniemi et al., 2024), e.g. 0.3 5")
    g.add_argument("--guidance-rescale", type=float, metavar="PHI",
                   help="rescale the guided prediction's std to the conditional one's, blended by PHI in [0, 1] "
                   "(Lin et al., 2024; they use 0.7)")
    g.add_argument("--guide", type=_pipeline_path, metavar="MODEL",
                   help="autoguidance (Karras et al., 2024): guide by this smaller model's prediction of the same "
                   "prompt instead of the null prompt; a saved pipeline folder or a shipped name, e.g. dit_t2i_guide "
                   "for dit_t2i")


def _add_eval(p, per_prompt):
    p.add_argument("--prompts", type=_prompt_sets, default="class,held_out",
                   help="prompt sets, comma-separated: class (one per class), held_out (unseen paraphrases), "
                   "attributes (class + brightness, size, texture), attributes_held_out (combinations held out "
                   "of training)")
    p.add_argument("--per-prompt", type=int, default=per_prompt, help="samples per prompt (default: %(default)s)"
                   if per_prompt else "samples per prompt (default: by TUTORIAL_BUDGET: 10, 50 or 100)")


def shipped_pipelines() -> tuple[str, ...]:
    """The names of the pipelines shipped in tutorial_lib/assets (dit_t2i, attr_t2i, ...): its folders
    with a model_index.json."""
    return tuple(sorted(d.name for d in ASSETS_DIR.iterdir() if (d / "model_index.json").is_file()))


def _pipeline_path(text: str) -> Path:
    """--model: a folder (an existing path wins), or a shipped pipeline's name (`shipped_pipelines()`), for
    argparse. A bare name that is neither is a usage error naming the shipped ones; a path with a
    separator in it ("./dit_t2i", "runs/x") goes on to the loader, which says what is missing there."""
    path = Path(text)
    if path.exists() or "/" in text or os.sep in text:
        return path
    if text in shipped_pipelines():
        return ASSETS_DIR / text
    raise argparse.ArgumentTypeError(f"{text!r} is neither a folder nor a shipped model; give a saved pipeline "
                                     f"folder or one of {', '.join(shipped_pipelines())}.")


def _out_file(out: Path, name: str) -> Path:
    """--out of a command that writes one file: an existing folder gets the file `name` inside it."""
    return out / name if out.is_dir() else out


MODEL_HELP = ("a saved pipeline folder, or a shipped model's name: dit_t2i (default), attr_t2i, edm_t2i, moe_t2i, "
              "tiny_t2i, dit_t2i_guide (tutorial_lib/assets/NAME)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tutorial_lib", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train-classifier", help="train the yardstick classifier")
    p.add_argument("--epochs", type=int, default=20, help="passes over the training set (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=256, help="images per step (default: %(default)s)")
    p.add_argument("--out", type=Path, default=ASSETS_DIR / "classifier.safetensors",
                   help="weights file to write, or a folder to write classifier.safetensors in (default: the shipped "
                   "one, tutorial_lib/assets/classifier.safetensors)")
    _add_common(p)
    p.set_defaults(func=_cmd_train_classifier)

    p = sub.add_parser("train-vae", help="train the KL autoencoder")
    p.add_argument("--steps", type=int, default=6000, help="optimizer steps (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=128, help="images per step (default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (default: %(default)s)")
    p.add_argument("--channels", default="16,32,64", help="width per level, comma-separated; f = 2^(levels-1)")
    p.add_argument("--res-blocks", type=int, default=1,
                   help="residual blocks per encoder level; the decoder has one more (default: %(default)s)")
    p.add_argument("--latent-channels", type=int, default=4, help="channels of the latent (default: %(default)s)")
    p.add_argument("--norm-groups", type=int, default=8,
                   help="GroupNorm groups; must divide every width (default: %(default)s)")
    p.add_argument("--no-mid-attention", action="store_true", help="no self-attention at the lowest resolution")
    p.add_argument("--reconstruction", choices=("l1", "l2"), default="l1",
                   help="reconstruction loss (default: %(default)s)")
    p.add_argument("--kl-weight", type=float, default=1e-3, help="weight of the KL term (default: %(default)s)")
    p.add_argument("--perceptual-weight", type=float, default=0.0,
                   help="weight of the perceptual loss; 0: off (default: %(default)s)")
    p.add_argument("--disc-weight", type=float, default=0.0,
                   help="weight of the adversarial (patch discriminator) loss; 0: off (default: %(default)s)")
    p.add_argument("--disc-start", type=int, default=0,
                   help="step at which the adversarial loss begins (default: %(default)s)")
    p.add_argument("--init", type=Path, help="start from these VAE weights (their config is kept)")
    p.add_argument("--out", type=Path, default=ASSETS_DIR / "vae.safetensors",
                   help="weights file to write, or a folder to write vae.safetensors in (default: the shipped one, "
                   "tutorial_lib/assets/vae.safetensors)")
    _add_common(p)
    p.set_defaults(func=_cmd_train_vae)

    p = sub.add_parser("encode-latents", help="encode Fashion-MNIST (or --data) into latents, once",
                       description="Without --data: build the Fashion-MNIST latent cache for the shipped VAE. "
                       "With --data: encode any image-caption source into latent shards keyed by the VAE, the "
                       "source and the preprocessing (resumable; under torchrun each rank encodes its own "
                       "shards), and with a frozen --text-encoder its captions into an embedding cache.")
    _add_data(p)
    p.add_argument("--text-encoder", help="also cache the captions' embeddings by this frozen encoder "
                   "(minilm, clip)")
    _add_common(p)
    p.set_defaults(func=_cmd_encode_latents)

    p = sub.add_parser("train", help="train a text-to-image model (notebook 03's DiT or notebook 01's transformer)")
    _add_train(p, steps=3000)
    p.add_argument("--model", choices=("dit", "mmdit", "unet", "tiny_transformer"), default="dit",
                   help="the architecture: dit, notebook 03's DiT (--preset tiny, DiT-S/2, ...), mmdit, "
                        "notebook 07's MMDiT/Flux blocks (--preset tiny, MMDiT-S/2, ...), unet, notebook 07's UNet "
                        "(diffusers' UNet2DConditionModel; --preset tiny, small, SD-1.5), or "
                        "tiny_transformer, notebook 01's (--preset cpu|base) (default: %(default)s)")
    p.add_argument("--config", help="a JSON TextToImageConfig (replaces the other training flags, "
                   "--seed included; --device applies when the file sets no device)")
    p.add_argument("--text-encoder", help="one_hot, word, minilm or clip (default: minilm for dit, mmdit and unet, "
                   "word, trained with it, for tiny_transformer)")
    p.add_argument("--prediction", help="x0, eps, v, flow or edm (Karras et al., 2022) (default: v for dit, mmdit "
                   "and unet, x0 for tiny_transformer)")
    p.add_argument("--schedule", default="cosine", help="cosine, linear, scaled_linear or flow")
    p.add_argument("--zero-terminal-snr", action="store_true", help="rescale a beta schedule to SNR(1) = 0")
    p.add_argument("--t-distribution", help="uniform, beta (Beta(1, 2.5)) or logit_normal (default: uniform "
                   "for dit, mmdit and unet, beta for tiny_transformer)")
    p.add_argument("--t-shift", type=float, default=1.0, help="> 1 biases training t towards noise")
    p.add_argument("--min-snr-gamma", type=float, default=None, help="min-SNR-gamma loss weights")
    p.add_argument("--cond-drop", type=float, default=0.1, help="null-caption probability")
    p.add_argument("--offset-noise", type=float, default=0.0, help="offset-noise strength (e.g. 0.1)")
    p.add_argument("--input-perturbation", type=float, default=0.0, help="input-perturbation gamma")
    p.add_argument("--p-mean", type=float, default=-1.2, help="edm: ln sigma ~ N(P_mean, P_std^2)")
    p.add_argument("--p-std", type=float, default=1.2, help="edm: see --p-mean")
    p.add_argument("--sigma-data", type=float, default=None,
                   help="edm: the latents' std (default: measured from the training latents)")
    p.add_argument("--warmup", type=int, default=100, help="learning-rate warm-up steps (default: %(default)s)")
    p.add_argument("--lr-schedule", default="cosine", choices=("cosine", "constant", "inverse_sqrt"),
                   help="after warm-up: cosine decay to 5%%, constant, or EDM2's inverse square root from "
                   "--lr-decay-start (default: %(default)s)")
    p.add_argument("--lr-decay-start", type=int, default=None,
                   help="inverse_sqrt: the step from which lr falls as sqrt(start / step) (EDM2's t_ref)")
    p.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches per step; --batch-size is the whole step's (default: %(default)s)")
    p.add_argument("--ema-decay", type=float, default=0.999,
                   help="decay of the weights' EMA, which the saved pipeline uses (default: %(default)s)")
    p.add_argument("--posthoc-ema", type=_floats, default=None, metavar="S1,S2",
                   help="EDM2 post-hoc EMA, the sigma_rels to track (e.g. 0.05,0.10)")
    p.add_argument("--posthoc-snapshot-every", type=int, default=None,
                   help="steps between post-hoc EMA snapshots (with --posthoc-ema)")
    p.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no",
                   help="autocast dtype; fp16 on a GPU only (default: %(default)s)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--parallelism", choices=("ddp", "fsdp", "hsdp"), default="ddp",
                   help="under torchrun: ddp (every rank holds the model), fsdp (FSDP2: parameters, gradients "
                   "and optimizer state sharded across ranks) or hsdp (sharded across the GPUs of a node, "
                   "replicated across nodes) (default: %(default)s)")
    p.add_argument("--dist-timeout", type=float, default=None, metavar="MINUTES",
                   help="under torchrun: how long a collective waits for the slowest rank, e.g. while rank 0 "
                   "writes a checkpoint (default: $TUTORIAL_LIB_DIST_TIMEOUT_MINUTES, else 30)")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each block's activations in backward: less memory, about a third more compute")
    p.add_argument("--num-workers", type=int, default=None,
                   help="DataLoader worker processes per rank; 0: read in the training process (default: on a GPU, "
                        "up to 4 per rank from the CPUs it may use; 0 on the CPU: TrainerConfig.workers)")
    p.add_argument("--checkpoint-every", type=int, default=500,
                   help="steps between checkpoints in OUT/run (default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/run's latest checkpoint")
    p.add_argument("--posterior", action="store_true",
                   help="with --data: train on samples of the VAE posterior, not its mean")
    p.add_argument("--mask-ratio", type=float, default=0.0,
                   help="dit: drop this fraction of patches after the patch-mixer (e.g. 0.75 with --preset "
                        "tiny-mixer; notebook 06) (default: %(default)s)")
    p.add_argument("--init-from", type=Path,
                   help="start from this pipeline folder's denoiser (same preset), e.g. the unmasked fine-tune "
                        "after a --mask-ratio run")
    p.add_argument("--lora-rank", type=_positive,
                   help="with --init-from: train a LoRA adapter of this rank alone (the denoiser frozen) and save "
                        "the adapter, in peft's format, in --out instead of a pipeline (train/lora.py), e.g. 4")
    p.add_argument("--lora-alpha", type=float, help="the LoRA update is scaled by alpha / rank (default: alpha = rank)")
    p.add_argument("--lora-targets", type=_names, metavar="NAME,NAME",
                   help="the linear layers LoRA adapts, by name or name suffix (default: the architecture's "
                        "attention and MLP linears, train/lora.py TARGETS)")
    p.add_argument("--out", type=Path, default=Path("outputs/model"),
                   help="folder to save the pipeline (with --lora-rank: the adapter) in (default: %(default)s)")
    p.add_argument("--without-vae", action="store_true",
                   help="save the pipeline without a vae/ folder: loading it uses the shipped VAE, which it must "
                        "have been trained on (a small shipped model, e.g. dit_t2i_guide)")
    _add_data(p)
    _add_common(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("sample", help="write a sample grid, one row per prompt (default: the class prompts)",
                       description="Sample --num-images images of each prompt and write them as a grid, one row "
                       "per prompt labelled with it, and one by one as OUT_STEM/prompt-PP_image-II.png next to "
                       "the grid (OUT_STEM/prompts.txt: prompt PP on line PP + 1).")
    p.add_argument("--model", type=_pipeline_path, default=ASSETS_DIR / "dit_t2i", help=MODEL_HELP)
    p.add_argument("--prompt", nargs="+", metavar="PROMPT",
                   help='one or more prompts, e.g. --prompt "a photo of a boot" "a red dress" (default: one per '
                   'class, "a photo of a t-shirt", ...)')
    p.add_argument("--num-images", "--per-class", dest="num_images", type=_positive, default=8,
                   help="images per prompt, one grid row; --per-class is its former name (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("outputs/samples.png"),
                   help="the grid's image file, or a folder to write samples.png in; the single images go in the "
                   "folder of its name without the extension (default: %(default)s, and outputs/samples/)")
    _add_sampling(p)
    _add_guidance(p)
    g = p.add_argument_group("editing", "start from an image instead of noise (image-to-image, inpainting)")
    g.add_argument("--init-image", type=Path, metavar="PATH",
                   help="image-to-image: an image file, resized to the model's resolution (32x32) and encoded by its VAE; "
                   "every image of the grid starts from it")
    g.add_argument("--strength", type=float, metavar="S",
                   help="with --init-image: the fraction of the --inference-steps that run, from the input noised to "
                   "that level; 0 returns the input, 1 starts from noise (default: 1)")
    g.add_argument("--mask", type=Path, metavar="PATH",
                   help="with --init-image: inpainting; an image file, light (>= 128) where to regenerate, dark where to "
                   "keep the input, at the image's resolution (a latent cell is regenerated if any of its pixels is)")
    _add_common(p)
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("evaluate", help="class accuracy and FID of a model's samples")
    p.add_argument("--model", type=_pipeline_path, default=ASSETS_DIR / "dit_t2i", help=MODEL_HELP)
    _add_eval(p, per_prompt=100)
    _add_sampling(p)
    _add_guidance(p)
    _add_common(p)
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("posthoc-ema", help="EDM2 post-hoc EMA: reconstruct, evaluate, save (train --posthoc-ema)",
                       description="Reconstruct the EMAs of --sigma-rels from the post-hoc EMA snapshots of a "
                       "`train --model dit --posthoc-ema ... --posthoc-snapshot-every N` run (EDM2, Karras et al. "
                       "2024); print them (gamma, residual) as JSON, with --evaluate their metrics and the stored "
                       "EMA's on the same noise, and with --out save one as a pipeline.")
    p.add_argument("--model", type=_pipeline_path, required=True,
                   help="a pipeline folder written by train --model dit")
    p.add_argument("--sigma-rels", type=_floats, required=True, metavar="S1,S2",
                   help="the EMA widths to reconstruct, e.g. 0.03,0.05,0.1")
    p.add_argument("--snapshots", type=Path, help="the snapshots folder (default: MODEL/run/posthoc_ema)")
    p.add_argument("--step", type=int, help="reconstruct the EMAs at this step (default: the last snapshot's)")
    p.add_argument("--evaluate", action="store_true",
                   help="measure each reconstruction and the pipeline's stored EMA (as `evaluate`)")
    _add_eval(p, per_prompt=50)
    p.set_defaults(prompts="class")
    _add_sampling(p)
    p.add_argument("--out", type=Path, help="save the pipeline with the reconstructed EMA here: one sigma_rel, "
                   "or with --evaluate the one of lowest class-prompt FID")
    p.add_argument("--json", type=Path, help="also write the JSON record to this file (a folder: "
                   "posthoc_ema.json in it)")
    _add_common(p)
    p.set_defaults(func=_cmd_posthoc_ema)

    p = sub.add_parser("demo", help="train briefly, sample, evaluate (sized by TUTORIAL_BUDGET)")
    _add_train(p, steps=None)
    _add_eval(p, per_prompt=None)
    _add_sampling(p)
    p.add_argument("--out", type=Path, default=Path("outputs/demo"),
                   help="folder for the model, samples.png and metrics.json (default: %(default)s)")
    _add_common(p)
    p.set_defaults(func=_cmd_demo)
    return parser


def user_errors() -> tuple[type[Exception], ...]:
    """What the library raises for a wrong input, each with a message that names it and
    says what to do; anything else (a bug) keeps its traceback. Imported here, not at the top, so that
    `--help` stays fast."""
    from .data.fashion_mnist import DataError
    from .text.cache import UnknownCaption
    from .train.ema import SnapshotError
    from .train.checkpoint import CheckpointError
    from .versions import TorchVersionError
    from .weights import WeightsError

    # ValueError: a bad value (preset, prompt set, sampler for this model, ...); FileNotFoundError: a
    # path that is not there (--config, --init); the others: files that are missing, incomplete or do
    # not fit (weights, data, checkpoints, post-hoc EMA snapshots), a prompt no cached caption matches, a
    # torch older than a feature asked for needs.
    return (ValueError, FileNotFoundError, WeightsError, SnapshotError, CheckpointError, DataError, UnknownCaption,
            TorchVersionError)


def _message(error: Exception) -> str:
    if isinstance(error, FileNotFoundError) and error.filename:
        return f"{error.strerror}: {error.filename}"
    return str(error)


def main(argv=None):
    """Run a command. From the command line (argv None: sys.argv) one of `user_errors()` prints
    "python -m tutorial_lib COMMAND: error: MESSAGE" and exits with status 2, as argparse does for a
    bad flag (TUTORIAL_DEBUG=1: raise it, traceback and all); given argv (a notebook, a test), it raises."""
    import sys

    command_line = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    start = time.perf_counter()
    try:
        args.func(args)
    except Exception as error:
        if not command_line or os.environ.get("TUTORIAL_DEBUG", "") not in ("", "0") \
                or not isinstance(error, user_errors()):
            raise
        parser.exit(2, f"{parser.prog} {args.command}: error: {_message(error)}\n")
    print(f"[{args.command}] done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()

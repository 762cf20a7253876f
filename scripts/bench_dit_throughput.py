"""Training throughput of our DiT against diffusers' PixArtTransformer2DModel of the same shape.

Both models get the same width, depth, heads, patch size, latent size (so the same token count N)
and the same captions (L tokens of width D_text, padded, with a mask). One training step is a
forward (float32, or under bfloat16 autocast with `--precision bf16`), an MSE loss, the backward and
an AdamW step on float32 weights; images/s = batch size x steps / time. `--compile` runs each
model's loss through torch.compile (its compilation happens in the untimed warm-up steps).

    python scripts/bench_dit_throughput.py                    # tiny (notebook 03), MiniLM-wide captions
    python scripts/bench_dit_throughput.py --preset DiT-S/2 --input-size 32
    python scripts/bench_dit_throughput.py --preset DiT-XL/2 --input-size 32 --device cuda --precision bf16
    python scripts/bench_dit_throughput.py --adaln-single     # + a row: our DiT with PixArt's adaLN-single

Each model first runs `--warmup` untimed steps; then `--repeats` timed repeats of `--steps` steps
each, the models interleaved (A B B A A B ...) so that load from elsewhere on the machine hits
them alike. The table gives each model's median images/s and the median over repeats of the ratio
ours / PixArt (measured back to back): above 1, our DiT trains faster at this size. The results go
to `--out` as JSON; nothing is asserted. On the CPU it runs one thread by default: on a small
machine shared with other work, OpenMP threads wait on each other at every op and the timings
scatter by 3x or more (`--threads 0` keeps torch's default).

The two are not the same network, so their parameters and FLOPs differ: our DiT has an adaLN
modulation Linear(D, 6D) in every block and cross-attends to the caption tokens at D_text, while
PixArt has one shared adaLN-single with a learned per-block table and first projects the caption
tokens to width D. `--adaln-single` adds a third model, "DiT + adaLN-single (ours)": our DiT with PixArt's
adaLN-single (`DiTConfig.adaln_single`), so that its ratio to PixArt leaves out the modulation's share of
the difference. The FLOPs column counts each model's matrix multiplies with
`torch.utils.flop_counter.FlopCounterMode` (one image, on the CPU, whose fused attention kernel
it does not count); `dit_cost` is our analytic count, attention included.

MFU (model FLOPs utilisation) = 3 x forward FLOPs per image x images/s / the device's peak dense
bf16 FLOP/s: a training step's backward costs about twice its forward. All FLOPs here are FLOPs,
2 per multiply-add (`dit_cost` counts that way; DiT's paper reports multiply-adds as "Gflops").
Forward FLOPs per image: ours, `dit_cost`; PixArt's, its counted matrix multiplies plus the
attention that the counter misses, which at the same N, L, width and depth is `dit_cost`'s. The
peak comes from `--peak-tflops`, else $TUTORIAL_PEAK_TFLOPS, else `PEAK_BF16_TFLOPS` by the GPU's
name; with none of them (any CPU, an unlisted GPU) MFU is null.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import diffusers
import torch
import torch.nn.functional as F
from diffusers import PixArtTransformer2DModel
from torch.utils.flop_counter import FlopCounterMode

from tutorial_lib.models.dit import DiT, DiTConfig, dit_cost, preset
from tutorial_lib.text import TextEmbedding


# Peak dense bf16 tensor-core TFLOP/s (no 2:4 sparsity) from NVIDIA's data sheets: (words that must
# all be in the GPU's name, TFLOP/s), the first match wins, so the more specific names come first.
PEAK_BF16_TFLOPS = (
    (("H100", "NVL"), 835), (("H200", "NVL"), 835),  # the NVL cards run lower clocks than the SXM
    (("H100", "PCIE"), 756), (("H100",), 989),  # "NVIDIA H100 80GB HBM3" is the SXM card
    (("H200",), 989), (("A100",), 312), (("L4",), 121),
    (("A10G",), 125),  # approximate: AWS's A10G has no public data sheet
    (("T4",), 65),  # fp16: the T4 has no bf16 tensor cores
)
PEAK_ENV = "TUTORIAL_PEAK_TFLOPS"


def peak_tflops(name: str, override: float | None = None) -> tuple[float | None, str | None]:
    """(peak dense bf16 TFLOP/s, where it came from) for a device name: `override`, else
    $TUTORIAL_PEAK_TFLOPS, else the table; (None, None) for a device in none of them."""
    if override is not None:
        return override, "--peak-tflops"
    if os.environ.get(PEAK_ENV):
        return float(os.environ[PEAK_ENV]), f"${PEAK_ENV}"
    words = set(re.split(r"[^A-Z0-9]+", name.upper()))  # "NVIDIA A100-SXM4-80GB" -> {NVIDIA, A100, ...}
    for needed, tflops in PEAK_BF16_TFLOPS:
        if words.issuperset(needed):
            return tflops, f"table: {' '.join(needed)}"
    return None, None


def mfu(forward_flops_per_image: float, images_per_s: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation of training: 3 x forward FLOPs (forward + a backward of twice its
    cost) x images/s over the peak in TFLOP/s; None without a peak."""
    return None if peak is None else 3 * forward_flops_per_image * images_per_s / (peak * 1e12)


def pixart_like(cfg: DiTConfig) -> PixArtTransformer2DModel:
    """PixArt at the DiT config's width, depth, heads, patch and latent size, reading its captions."""
    unmatched = {"num_kv_heads": cfg.num_kv_heads not in (None, cfg.num_heads), "qk_norm": cfg.qk_norm != "none",
                 "pos_embed": cfg.pos_embed != "sincos", "cross_attention": not cfg.cross_attention,
                 "mlp_ratio": cfg.mlp_ratio != 4, "input_size": cfg.input_size[0] != cfg.input_size[1]}
    if any(unmatched.values()):
        raise ValueError(f"PixArt has no counterpart for this DiT's {[k for k, v in unmatched.items() if v]}.")
    return PixArtTransformer2DModel(
        num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim, in_channels=cfg.in_channels,
        out_channels=cfg.in_channels,  # no predicted variance: the same output as the DiT
        num_layers=cfg.depth, cross_attention_dim=cfg.hidden_size, caption_channels=cfg.text_dim,
        sample_size=cfg.input_size[0], patch_size=cfg.patch_size, norm_type="ada_norm_single",
        use_additional_conditions=False)


SINGLE = "DiT + adaLN-single (ours)"


def build_models(cfg: DiTConfig, adaln_single: bool = False) -> dict[str, torch.nn.Module]:
    """Our DiT and PixArt of its shape; with `adaln_single`, also our DiT with adaLN-single (SINGLE)."""
    torch.manual_seed(0)
    models = {"DiT (ours)": DiT(cfg), "PixArt": pixart_like(cfg)}
    if adaln_single:
        models[SINGLE] = DiT(dataclasses.replace(cfg, adaln_single=True))
    return models


def make_batch(cfg: DiTConfig, batch_size: int, text_len: int, device) -> dict[str, torch.Tensor]:
    """Random latents, noise levels, targets and captions of 1..text_len real tokens."""
    g = torch.Generator().manual_seed(0)
    shape = (batch_size, cfg.in_channels, *cfg.input_size)
    lengths = torch.randint(1, text_len + 1, (batch_size,), generator=g)
    batch = {"x": torch.randn(shape, generator=g), "target": torch.randn(shape, generator=g),
             "t": torch.rand(batch_size, generator=g),
             "tokens": torch.randn(batch_size, text_len, cfg.text_dim, generator=g),
             "mask": torch.arange(text_len) < lengths[:, None]}
    return {k: v.to(device) for k, v in batch.items()}


def forward(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    if isinstance(model, DiT):
        return model(batch["x"], batch["t"], TextEmbedding(batch["tokens"], batch["mask"]))
    return model(batch["x"], encoder_hidden_states=batch["tokens"], timestep=1000 * batch["t"],  # t in [0, 1000]
                 encoder_attention_mask=batch["mask"],
                 added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample


def counted_gflops(model: torch.nn.Module, batch: dict) -> float:
    """Matrix-multiply GFLOPs of one image's forward, counted on the CPU."""
    one = {k: v[:1].cpu() for k, v in batch.items()}
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        forward(model, one)
    return counter.get_total_flops() / 1e9


def params_by_part(model: torch.nn.Module) -> dict[str, int]:
    parts: dict[str, int] = {}
    for name, p in model.named_parameters():
        parts[name.split(".")[0]] = parts.get(name.split(".")[0], 0) + p.numel()
    return parts


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def mse(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    return F.mse_loss(forward(model, batch).float(), batch["target"])


def timed_steps(model, loss_fn, optimizer, batch, steps: int, device, precision: str) -> float:
    """Seconds for `steps` training steps (forward, MSE, backward, AdamW)."""
    autocast = torch.autocast(device.type, torch.bfloat16) if precision == "bf16" else nullcontext()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        with autocast:
            loss = loss_fn(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync(device)
    return time.perf_counter() - start


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny", help="a tutorial_lib.models.dit preset")
    parser.add_argument("--input-size", type=int, help="square latent size (default: the preset's)")
    parser.add_argument("--text-dim", type=int, default=384, help="caption token width (MiniLM: 384)")
    parser.add_argument("--text-len", type=int, default=32, help="caption tokens L")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5, help="training steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads (default: 1 for --device cpu, steady on a small shared "
                             "CPU; torch's default otherwise; 0: torch's default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="bf16: forward and backward under bfloat16 autocast, float32 weights")
    parser.add_argument("--compile", action="store_true", help="torch.compile each model's loss")
    parser.add_argument("--adaln-single", action="store_true",
                        help=f"also time our DiT with PixArt's adaLN-single (the row {SINGLE!r})")
    parser.add_argument("--peak-tflops", type=float,
                        help=f"the device's peak dense bf16 TFLOP/s for MFU (default: ${PEAK_ENV}, "
                             "else the table PEAK_BF16_TFLOPS by GPU name)")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_dit_throughput.json"))
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    """Measure as the module docstring says, print the table and return the results (JSON-able)."""
    device = torch.device(args.device)
    threads = args.threads if args.threads is not None else (1 if device.type == "cpu" else 0)
    if threads:
        torch.set_num_threads(threads)
    overrides = {"text_dim": args.text_dim}
    if args.input_size:
        overrides["input_size"] = args.input_size
    cfg = preset(args.preset, **overrides)
    models = build_models(cfg, args.adaln_single)
    batch = make_batch(cfg, args.batch_size, args.text_len, device)
    gflops = {name: counted_gflops(model, batch) for name, model in models.items()}
    params = {name: params_by_part(model) for name, model in models.items()}
    cost = dit_cost(cfg, text_len=args.text_len)
    uncounted = cost.flops_by_part["self_attn_sdpa"] + cost.flops_by_part["cross_attn_sdpa"]
    forward_flops = {name: dit_cost(model.config, text_len=args.text_len).flops
                     for name, model in models.items() if isinstance(model, DiT)}
    forward_flops["PixArt"] = round(gflops["PixArt"] * 1e9) + uncounted
    loss_fn = torch.compile(mse) if args.compile else mse  # one graph per model (guards tell them apart)
    optimizers = {}
    for name, model in models.items():
        model.to(device).train()
        if isinstance(model, DiT):
            model.build_positions()  # before tracing: a compiled forward that fills the cache is traced again
        optimizers[name] = torch.optim.AdamW(model.parameters(), lr=1e-4)
        timed_steps(model, loss_fn, optimizers[name], batch, args.warmup, device, args.precision)

    rates = {name: [] for name in models}
    names = list(models)
    for r in range(args.repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            seconds = timed_steps(models[name], loss_fn, optimizers[name], batch, args.steps, device, args.precision)
            rates[name].append(args.batch_size * args.steps / seconds)
    ratios_by_model = {name: [a / b for a, b in zip(rates[name], rates["PixArt"])]
                       for name in names if name != "PixArt"}
    ratios = ratios_by_model["DiT (ours)"]
    median = {name: statistics.median(r) for name, r in rates.items()}
    name_of_device = device_name(device)
    peak, peak_source = peak_tflops(name_of_device, args.peak_tflops)
    mfus = {name: mfu(forward_flops[name], median[name], peak) for name in names}

    (h, w), p = cfg.input_size, cfg.patch_size
    print(f"{args.preset}: width {cfg.hidden_size}, depth {cfg.depth}, {cfg.num_heads} heads, patch {p}, "
          f"latent {cfg.in_channels}x{h}x{w} = {(h // p) * (w // p)} tokens, captions {args.text_len} x "
          f"{args.text_dim}; batch {args.batch_size}, {args.repeats} x {args.steps} steps, {args.precision}"
          f"{', compiled' if args.compile else ''} on {name_of_device} ({device.type}, threads "
          f"{torch.get_num_threads()})")
    width = max(len(name) for name in names)
    print(f"{'model':<{width}} {'params':>12} {'matmul GFLOP/img':>17} {'images/s':>10} {'min..max':>18} {'MFU':>7}")
    for name in names:
        spread = f"{min(rates[name]):.1f}..{max(rates[name]):.1f}"
        shown = "-" if mfus[name] is None else f"{mfus[name]:.1%}"
        print(f"{name:<{width}} {sum(params[name].values()):>12,} {gflops[name]:>17.4f} {median[name]:>10.1f} "
              f"{spread:>18} {shown:>7}")
    for name, r in ratios_by_model.items():
        print(f"ratio {name}/PixArt (median of {args.repeats} per-repeat ratios): {statistics.median(r):.3f} "
              f"(min {min(r):.3f}, max {max(r):.3f})")
    print(f"dit_cost: {cost.gflops:.4f} GFLOP per image forward (attention included); MFU against "
          f"{'no peak' if peak is None else f'{peak} TFLOP/s ({peak_source})'}")

    return {
        "device": args.device, "device_name": name_of_device, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "dit_config": dataclasses.asdict(cfg), "pixart_config": dict(models["PixArt"].config),
        "params": {name: {"total": sum(parts.values()), **parts} for name, parts in params.items()},
        "matmul_gflops_per_image": gflops, "dit_cost_gflops_per_image": cost.gflops,
        "images_per_s": rates, "median_images_per_s": median,
        "ratio_ours_over_pixart": ratios, "median_ratio_ours_over_pixart": statistics.median(ratios),
        "ratio_over_pixart": ratios_by_model,
        "median_ratio_over_pixart": {name: statistics.median(r) for name, r in ratios_by_model.items()},
        "flops_unit": "FLOPs, 2 per multiply-add",
        "forward_flops_per_image": forward_flops,
        "peak_bf16_tflops": peak, "peak_source": peak_source,
        "mfu_formula": "3 x forward_flops_per_image x median_images_per_s / (peak_bf16_tflops x 1e12)",
        "median_mfu": mfus,
    }


def main(argv=None):
    args = parse_args(argv)
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

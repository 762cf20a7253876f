"""Training throughput of our DiT against diffusers' PixArtTransformer2DModel of the same shape.

Both models get the same width, depth, heads, patch size, latent size (so the same token count N)
and the same captions (L tokens of width D_text, padded, with a mask). One training step is a
float32 forward, an MSE loss, the backward and an AdamW step; images/s = batch size x steps / time.

    python scripts/bench_dit_throughput.py                    # tiny (notebook 03), MiniLM-wide captions
    python scripts/bench_dit_throughput.py --preset DiT-S/2 --input-size 32

Each model first runs `--warmup` untimed steps; then `--repeats` timed repeats of `--steps` steps
each, the two models interleaved (A B B A A B ...) so that load from elsewhere on the machine hits
both alike. The table gives each model's median images/s and the median over repeats of the ratio
ours / PixArt (measured back to back): above 1, our DiT trains faster at this size. The results go
to `--out` as JSON; nothing is asserted. On the CPU it runs one thread by default: on a small
machine shared with other work, OpenMP threads wait on each other at every op and the timings
scatter by 3x or more (`--threads 0` keeps torch's default).

The two are not the same network, so their parameters and FLOPs differ: our DiT has an adaLN
modulation Linear(D, 6D) in every block and cross-attends to the caption tokens at D_text, while
PixArt has one shared adaLN-single with a learned per-block table and first projects the caption
tokens to width D. The FLOPs column counts each model's matrix multiplies with
`torch.utils.flop_counter.FlopCounterMode` (one image, on the CPU, whose fused attention kernel
it does not count); `dit_cost` is our analytic count, attention included.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time
from pathlib import Path

import diffusers
import torch
import torch.nn.functional as F
from diffusers import PixArtTransformer2DModel
from torch.utils.flop_counter import FlopCounterMode

from tutorial_lib.models.dit import DiT, DiTConfig, dit_cost, preset
from tutorial_lib.text import TextEmbedding


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


def build_models(cfg: DiTConfig) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {"DiT (ours)": DiT(cfg), "PixArt": pixart_like(cfg)}


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


def timed_steps(model, optimizer, batch, steps: int, device) -> float:
    """Seconds for `steps` training steps (forward, MSE, backward, AdamW)."""
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        F.mse_loss(forward(model, batch), batch["target"]).backward()
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny", help="a tutorial_lib.models.dit preset")
    parser.add_argument("--input-size", type=int, help="square latent size (default: the preset's)")
    parser.add_argument("--text-dim", type=int, default=384, help="caption token width (MiniLM: 384)")
    parser.add_argument("--text-len", type=int, default=32, help="caption tokens L")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5, help="training steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: steady on a small shared CPU; 0: torch's default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_dit_throughput.json"))
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    overrides = {"text_dim": args.text_dim}
    if args.input_size:
        overrides["input_size"] = args.input_size
    cfg = preset(args.preset, **overrides)
    models = build_models(cfg)
    batch = make_batch(cfg, args.batch_size, args.text_len, device)
    gflops = {name: counted_gflops(model, batch) for name, model in models.items()}
    params = {name: params_by_part(model) for name, model in models.items()}
    optimizers = {}
    for name, model in models.items():
        model.to(device).train()
        optimizers[name] = torch.optim.AdamW(model.parameters(), lr=1e-4)
        timed_steps(model, optimizers[name], batch, args.warmup, device)

    rates = {name: [] for name in models}
    names = list(models)
    for r in range(args.repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            seconds = timed_steps(models[name], optimizers[name], batch, args.steps, device)
            rates[name].append(args.batch_size * args.steps / seconds)
    ours, theirs = names
    ratios = [a / b for a, b in zip(rates[ours], rates[theirs])]
    median = {name: statistics.median(r) for name, r in rates.items()}

    (h, w), p = cfg.input_size, cfg.patch_size
    print(f"{args.preset}: width {cfg.hidden_size}, depth {cfg.depth}, {cfg.num_heads} heads, patch {p}, "
          f"latent {cfg.in_channels}x{h}x{w} = {(h // p) * (w // p)} tokens, captions {args.text_len} x "
          f"{args.text_dim}; batch {args.batch_size}, {args.repeats} x {args.steps} steps on {device_name(device)} "
          f"({device.type}, threads {torch.get_num_threads()})")
    print(f"{'model':<12} {'params':>12} {'matmul GFLOP/img':>17} {'images/s':>10} {'min..max':>18}")
    for name in names:
        spread = f"{min(rates[name]):.1f}..{max(rates[name]):.1f}"
        print(f"{name:<12} {sum(params[name].values()):>12,} {gflops[name]:>17.4f} {median[name]:>10.1f} {spread:>18}")
    cost = dit_cost(cfg, text_len=args.text_len)
    print(f"ratio ours/PixArt (median of {args.repeats} per-repeat ratios): {statistics.median(ratios):.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f})")
    print(f"dit_cost: {cost.gflops:.4f} GFLOP per image forward (attention included)")

    result = {
        "device": args.device, "device_name": device_name(device), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "dit_config": dataclasses.asdict(cfg), "pixart_config": dict(models["PixArt"].config),
        "params": {name: {"total": sum(parts.values()), **parts} for name, parts in params.items()},
        "matmul_gflops_per_image": gflops, "dit_cost_gflops_per_image": cost.gflops,
        "images_per_s": rates, "median_images_per_s": median,
        "ratio_ours_over_pixart": ratios, "median_ratio_ours_over_pixart": statistics.median(ratios),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

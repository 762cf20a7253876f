"""Command line: `python -m tutorial_lib COMMAND --help`.

  train-classifier   train the yardstick classifier          -> tutorial_lib/assets/classifier.safetensors
  train-vae          train the KL autoencoder                -> tutorial_lib/assets/vae.safetensors
  encode-latents     encode Fashion-MNIST once into the latent cache under data/
  train              train the notebook-01 denoiser on cached latents
  sample             write a sample grid (one row per class prompt) from a denoiser
  evaluate           class accuracy and feature-space FID of a denoiser's samples
  demo               train briefly, sample, evaluate: the README's first command
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .paths import ASSETS_DIR


def _cmd_train_classifier(a):
    from .train.classifier import train_classifier
    from .weights import save_weights

    model, acc = train_classifier(epochs=a.epochs, batch_size=a.batch_size, seed=a.seed, device=a.device)
    save_weights(model, a.out, "classifier", {"test_accuracy": acc, "epochs": a.epochs, "seed": a.seed})
    print(json.dumps({"test_accuracy": round(acc, 4), "weights": str(a.out)}))


def _cmd_train_vae(a):
    from .train.vae import train_vae
    from .weights import save_weights

    from .vae.autoencoder import VAEConfig

    config = VAEConfig(channels=tuple(int(c) for c in a.channels.split(",")))
    vae, test_psnr = train_vae(steps=a.steps, batch_size=a.batch_size, kl_weight=a.kl_weight,
                               seed=a.seed, device=a.device, config=config)
    save_weights(vae, a.out, "vae", {"test_psnr": test_psnr, "steps": a.steps, "seed": a.seed})
    print(json.dumps({"test_psnr_db": round(test_psnr, 2), "scaling_factor": vae.config.scaling_factor,
                      "shift_factor": vae.config.shift_factor, "weights": str(a.out)}))


def _add_device(p):
    from .budget import device

    p.add_argument("--device", default=device(), help="cpu or cuda (default: cuda if present)")
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tutorial_lib", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train-classifier", help="train the yardstick classifier")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--out", type=Path, default=ASSETS_DIR / "classifier.safetensors")
    _add_device(p)
    p.set_defaults(func=_cmd_train_classifier)

    p = sub.add_parser("train-vae", help="train the KL autoencoder")
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--kl-weight", type=float, default=1e-3)
    p.add_argument("--channels", default="16,32,64", help="width per level, comma-separated")
    p.add_argument("--out", type=Path, default=ASSETS_DIR / "vae.safetensors")
    _add_device(p)
    p.set_defaults(func=_cmd_train_vae)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    args.func(args)
    print(f"[{args.command}] done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()

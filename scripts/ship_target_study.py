"""Copy notebook 04's trained study models (scripts/train_target_study.sh) into the package.

Each outputs/target_study/NAME/ pipeline becomes tutorial_lib/assets/target_study/NAME/: the EMA
transformer's weights in float16 (half the bytes; loading casts them back to float32), the text
encoder's name, no VAE (the shipped one, which `from_pretrained` then uses), the sampler that
matches the target (flow Euler for flow, DDIM otherwise) and, for eps on a schedule that ends at
SNR 0, the start level t_max < 1. The training record (command, seconds, loss curve's end) is kept.

    python scripts/ship_target_study.py [--source outputs/target_study]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from tutorial_lib.paths import ASSETS_DIR
from tutorial_lib.pipeline import TextToImagePipeline, start_level

DEST = ASSETS_DIR / "target_study"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=Path("outputs/target_study"))
    args = parser.parse_args()
    runs = sorted(p.parent for p in args.source.glob("*/model_index.json"))
    if not runs:
        raise SystemExit(f"No trained pipelines under {args.source}; run scripts/train_target_study.sh first.")
    for run in runs:
        pipe = TextToImagePipeline.from_pretrained(run)
        c = pipe.config
        shipped = TextToImagePipeline(pipe.transformer.half(), pipe.text_encoder, pipe.vae, prediction=c.prediction,
                                      schedule=c.schedule, zero_terminal_snr=c.zero_terminal_snr,
                                      sampler=c.sampler,
                                      t_max=start_level(c.prediction, pipe.noise_schedule))
        info = TextToImagePipeline.training_info(run)
        info.pop("vae_hash")
        dest = DEST / run.name
        shutil.rmtree(dest, ignore_errors=True)
        shipped.save_pretrained(dest, with_vae=False, **info)
        size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
        print(f"{run.name}: {c.prediction} on {c.schedule}, t_max {shipped.config.t_max} -> {dest} "
              f"({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()

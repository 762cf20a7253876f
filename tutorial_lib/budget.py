"""One environment variable, `TUTORIAL_BUDGET`, sizes every notebook and demo run.

  smoke    CI: about 2 minutes a notebook on 2 CPU cores; every cell still runs
  default  a learner's laptop CPU: at most about 10 minutes, real results
  full     a GPU: best results
"""

from __future__ import annotations

import os

BUDGETS = ("smoke", "default", "full")


def current() -> str:
    name = os.environ.get("TUTORIAL_BUDGET", "default").strip().lower()
    if name not in BUDGETS:
        raise ValueError(f"TUTORIAL_BUDGET={name!r} is unknown; choose one of {', '.join(BUDGETS)}.")
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

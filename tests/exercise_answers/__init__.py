"""The three answers CI runs through every exercise's check, one module per notebook.

Each module `nb<NN>.py` (`nb03b.py`, ...) holds `EXERCISES`, in the notebook's order: for each, the
check, the worked solution's name in `notebooks/solutions/<notebook>.py`, the library shortcut (an
answer that just calls the library function being taught: the check must refuse it), and a planted
bug (a plausible mistake: the check must fail it with a hint that contains `hint`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Callable

SOLUTIONS = Path(__file__).resolve().parents[2] / "notebooks" / "solutions"


@dataclasses.dataclass(frozen=True)
class Exercise:
    check: Callable
    solution: str  # the worked solution's name in notebooks/solutions/<notebook>.py
    shortcut: Callable  # the library's own version given as the answer: refused
    bug: Callable  # a planted bug: fails ...
    hint: str  # ... with a message that contains this (case-insensitive), pointing at the bug
    predicts: bool = False  # the learner predicts a number before the check measures it


def solutions(notebook: str):
    """notebooks/solutions/<notebook>.py as a module."""
    spec = importlib.util.spec_from_file_location(notebook, SOLUTIONS / f"{notebook}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

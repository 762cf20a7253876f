"""Every exercise, three answers through its check: the worked solution (notebooks/solutions/) passes,
the library's own function given as the answer is refused, and a planted bug fails with a hint that
points at it. The notebooks end with exactly these exercises, in this order."""

import importlib
import json
import pkgutil
import re
from pathlib import Path

import pytest

from . import exercise_answers
from .exercise_answers import SOLUTIONS, solutions

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
BY_NOTEBOOK = {}  # notebook stem -> its exercises, in the notebook's order
for info in pkgutil.iter_modules(exercise_answers.__path__):
    module = importlib.import_module(f"{exercise_answers.__name__}.{info.name}")
    BY_NOTEBOOK[module.NOTEBOOK] = module.EXERCISES
EXERCISES = [(notebook, e) for notebook, exercises in sorted(BY_NOTEBOOK.items()) for e in exercises]
IDS = [e.solution for _, e in EXERCISES]


@pytest.mark.parametrize("notebook, exercise", EXERCISES, ids=IDS)
def test_the_worked_solution_passes_its_check(notebook, exercise, capsys):
    assert exercise.check(getattr(solutions(notebook), exercise.solution)) is True, capsys.readouterr().out


@pytest.mark.parametrize("notebook, exercise", EXERCISES, ids=IDS)
def test_the_library_shortcut_is_refused(notebook, exercise, capsys):
    assert exercise.check.refuses, "the check names no library function to refuse"
    assert exercise.check(exercise.shortcut) is False
    assert "refused" in capsys.readouterr().out


@pytest.mark.parametrize("notebook, exercise", EXERCISES, ids=IDS)
def test_a_planted_bug_fails_with_a_hint_that_points_at_it(notebook, exercise, capsys):
    assert exercise.check(exercise.bug) is False
    out = capsys.readouterr().out
    assert "not yet" in out and exercise.hint.lower() in out.lower(), out


@pytest.mark.parametrize("notebook, exercise", EXERCISES, ids=IDS)
def test_an_unattempted_answer_is_reported_as_such(notebook, exercise, capsys):
    def stub(*args, **kwargs):
        raise NotImplementedError

    assert exercise.check(stub) is None and "not attempted" in capsys.readouterr().out


@pytest.mark.parametrize("notebook, exercise", EXERCISES, ids=IDS)
def test_the_refused_functions_are_restored_after_the_check(notebook, exercise):
    import inspect

    from tutorial_lib.exercises import _innermost, _refused

    exercise.check(exercise.shortcut)
    for target in exercise.check.refuses:
        if isinstance(target, tuple):
            assert inspect.getattr_static(*target) is not _refused
        else:
            assert _innermost(target).__code__ is not _refused.__code__


def test_every_solutions_file_has_its_exercises_listed():
    for path in SOLUTIONS.glob("*.py"):
        module = solutions(path.stem)
        public = {n for n, v in vars(module).items() if callable(v) and getattr(v, "__module__", None) == path.stem}
        assert public == {e.solution for e in BY_NOTEBOOK.get(path.stem, [])}, path.name


def _cells(notebook):
    cells = json.loads((NOTEBOOKS / f"{notebook}.ipynb").read_text())["cells"]
    return [(c["cell_type"], "".join(c["source"]) if isinstance(c["source"], list) else c["source"]) for c in cells]


def test_every_notebook_has_exercises():
    stems = {p.stem for p in NOTEBOOKS.glob("[0-9][0-9]*_*.ipynb")}
    assert stems == set(BY_NOTEBOOK), stems ^ set(BY_NOTEBOOK)


@pytest.mark.parametrize("notebook", sorted(BY_NOTEBOOK))
def test_a_notebook_ends_with_its_exercises_and_calls_every_check(notebook):
    """2 exercises for the setup notebook, 3 or 4 for the others, each a cell to complete and a check
    cell, after everything else; the checks the notebook calls are exactly those CI runs the three
    answers through; at least one asks for a prediction before the measurement."""
    cells = _cells(notebook)
    start = next(i for i, (_, s) in enumerate(cells) if s.startswith("## Exercises"))
    called = [m for _, s in cells[start:] for m in re.findall(r"^(check_\w+)\(", s, re.M)]
    exercises = BY_NOTEBOOK[notebook]
    assert called == [e.check.__name__ for e in exercises]
    assert len(called) == 2 if notebook.startswith("00") else 3 <= len(called) <= 4
    assert not any(re.search(r"^(check_\w+)\(", s, re.M) for _, s in cells[:start])
    predicted = [e for e in exercises if e.predicts]
    if not notebook.startswith("00"):
        assert predicted, f"{notebook}: no exercise asks for a prediction before a measurement"
    statements = "\n".join(s for kind, s in cells[start:] if kind == "markdown").lower()
    assert not predicted or "predict" in statements


def test_refusing_swaps_code_and_restores_it():
    """The mechanism itself: a function is refused under every name it was imported as, and restored."""
    from tutorial_lib.diffusion.edm import karras_sigmas as imported
    from tutorial_lib.exercises import REFUSED, refusing

    from tutorial_lib.diffusion import edm

    with refusing(edm.karras_sigmas):
        with pytest.raises(RuntimeError, match=REFUSED):
            imported(4, 0.002, 80.0)
    assert imported(4, 0.002, 80.0).shape == (5,)

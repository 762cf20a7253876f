"""Checks for the notebooks' exercises: `check_*(answer)` runs the learner's function on small inputs
and says whether it works.

Each notebook ends with 2 to 4 exercises: a statement, a cell with a function to complete (its body
`raise NotImplementedError` until then), and a check cell that calls the matching check here. A check
returns True (works), False (runs but is wrong: the message says how) or None (not attempted yet).
Worked solutions are in `notebooks/solutions/`, and `tests/test_exercises.py` runs every one of them
through its check, so that no exercise can silently rot.
"""

from __future__ import annotations

import functools


def exercise_check(fn):
    """Wrap a check: a NotImplementedError from the answer means "not attempted"; the verdict is printed."""

    @functools.wraps(fn)
    def check(answer, *args, **kwargs):
        try:
            problem = fn(answer, *args, **kwargs)
        except NotImplementedError:
            print(f"{fn.__name__}: not attempted yet (complete the function above, then run this cell again).")
            return None
        if problem:
            print(f"{fn.__name__}: not yet. {problem}")
            return False
        print(f"{fn.__name__}: correct.")
        return True

    return check

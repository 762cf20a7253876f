"""Checks for the notebooks' exercises: `check_*(answer)` runs the learner's function on small inputs
and says whether it works.

Each notebook ends with its exercises: a statement, a cell with a function to complete (its body
`raise NotImplementedError` until then), and a check cell that calls the matching check here. A check
returns True (works), False (runs but is wrong, or calls the library's own version: the message says
how) or None (not attempted yet).

A check compares the answer with an independent reference written in the check itself (never the
library function the exercise re-derives), on several inputs, with tolerances that accept a correct
float32 answer. While it runs, the library functions the exercise re-derives are switched off
(`refusing`), so an answer that merely calls them is refused with a message that says so.

Worked solutions are in `notebooks/solutions/`, and `tests/test_exercises.py` runs three answers
through every check: the worked solution (passes), the library shortcut (refused) and a planted bug
(fails, with a hint that names the bug).
"""

from __future__ import annotations

import contextlib
import functools
import inspect

REFUSED = "tutorial_lib: this library function is switched off while an exercise check runs"


def _refused(*args, **kwargs):
    raise RuntimeError("tutorial_lib: this library function is switched off while an exercise check runs")


def _innermost(fn):
    while hasattr(fn, "__wrapped__"):
        fn = fn.__wrapped__
    return fn


def _name(target) -> str:
    if isinstance(target, tuple):
        owner, attr = target
        return f"{getattr(owner, '__name__', type(owner).__name__)}.{attr}"
    return getattr(target, "__qualname__", repr(target))


@contextlib.contextmanager
def refusing(*targets):
    """Switch library functions off for the duration: calling one raises RuntimeError(REFUSED).

    A target is a plain function (its code object is swapped, so every name it was imported under is
    covered, `from tutorial_lib... import f` in a notebook included) or an `(owner, "attribute")` pair
    (a class's method, e.g. `(EDMPrecond, "forward")`, replaced on the class for its instances)."""
    undo = []
    try:
        for target in targets:
            if isinstance(target, tuple):
                owner, attr = target
                old = inspect.getattr_static(owner, attr)
                setattr(owner, attr, _refused)
                undo.append(functools.partial(setattr, owner, attr, old))
            else:
                fn = _innermost(target)
                if fn.__closure__:
                    raise TypeError(f"refusing({_name(target)}): a closure; give (owner, 'attribute') instead")
                old_code = fn.__code__
                fn.__code__ = _refused.__code__
                undo.append(functools.partial(setattr, fn, "__code__", old_code))
        yield
    finally:
        for restore in reversed(undo):
            restore()


def exercise_check(*, refuses):
    """Make a check from `fn(answer, ...) -> problem or None`, with the library functions the exercise
    re-derives switched off while it runs (see `refusing`; tests/test_exercises.py requires some).

    NotImplementedError from the answer means "not attempted"; a call to a refused function is refused;
    any other problem string is printed as "not yet" with its hint."""

    def wrap(fn):
        @functools.wraps(fn)
        def check(answer, *args, **kwargs):
            try:
                with refusing(*refuses):
                    problem = fn(answer, *args, **kwargs)
            except NotImplementedError:
                print(f"{fn.__name__}: not attempted yet (complete the function above, then run this cell again).")
                return None
            except RuntimeError as e:
                if str(e) != REFUSED:
                    raise
                names = ", ".join(f"`{_name(t)}`" for t in refuses)
                print(f"{fn.__name__}: refused. Your answer calls {names}, the library's own version of what this "
                      "exercise asks you to write; write it from the operations it is made of instead.")
                return False
            if problem:
                print(f"{fn.__name__}: not yet. {problem}")
                return False
            print(f"{fn.__name__}: correct.")
            return True

        check.refuses = tuple(refuses)
        return check

    return wrap

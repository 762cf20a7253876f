"""Where the course keeps data and caches.

`data_root()` is `$TUTORIAL_DATA` if set, else the repository's `data/` folder when the package runs
from a source checkout (an editable install), else `~/.cache/tutorial_lib` (a `pip install` from git).
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
ASSETS_DIR = PACKAGE_DIR / "assets"


def repo_root() -> Path | None:
    """The source checkout holding this package, or None when installed as a wheel."""
    root = PACKAGE_DIR.parent
    return root if (root / "pyproject.toml").is_file() else None


def data_root() -> Path:
    if os.environ.get("TUTORIAL_DATA"):
        return Path(os.environ["TUTORIAL_DATA"]).expanduser()
    root = repo_root()
    return root / "data" if root is not None else Path.home() / ".cache" / "tutorial_lib"


def shown(path: str | Path) -> str:
    """`path` as a person reads it in a printout that may be shared: relative to the checkout
    ("data/latents/..."), or under "~" for the home folder, else as it is. Notebooks print these, so
    that committed outputs carry no one's machine layout."""
    path = Path(path).expanduser().absolute()
    for base, prefix in ((repo_root(), ""), (Path.home(), "~/")):
        if base is not None and path.is_relative_to(base):
            return prefix + str(path.relative_to(base))
    return str(path)

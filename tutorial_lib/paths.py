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

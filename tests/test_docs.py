"""The measured figures in docs/ are the notebooks' own: every decimal quoted in a section of
docs/measured.md that is drawn from a notebook appears in that notebook's committed outputs, in a row
whose label the same sentence names (the rule of tests/test_notebooks.py). Sections measured by a
command instead name the command."""

from __future__ import annotations

import json
import re

import pytest

from .conftest import REPO_ROOT
from .test_notebooks import _outputs_text, unlabelled_figures

MEASURED = REPO_ROOT / "docs" / "measured.md"
NOTEBOOK_LINK = re.compile(r"\(\.\./notebooks/([0-9][0-9]\w*)\.ipynb\)")


def _sections() -> list[tuple[str, str]]:
    """(heading, body) for each `## ` section of docs/measured.md."""
    parts = re.split(r"^## ", MEASURED.read_text(), flags=re.M)[1:]
    return [(p.split("\n", 1)[0], p.split("\n", 1)[1] if "\n" in p else "") for p in parts]


def _source_notebook(body: str) -> str | None:
    """The notebook a section is drawn from: the link in its first paragraph."""
    first = body.strip().split("\n\n", 1)[0]
    found = NOTEBOOK_LINK.search(first)
    return found.group(1) if found else None


SECTIONS = _sections()


def test_measured_md_has_a_section_per_notebook():
    drawn = {_source_notebook(body) for _, body in SECTIONS}
    notebooks = {p.stem for p in (REPO_ROOT / "notebooks").glob("[0-9][0-9]*_*.ipynb")} - {"00_setup_and_data"}
    assert notebooks <= drawn, f"no section of docs/measured.md is drawn from {sorted(notebooks - drawn)}"


@pytest.mark.parametrize("heading, body", SECTIONS, ids=[h for h, _ in SECTIONS])
def test_each_figure_is_the_notebooks_own_or_its_command_is_named(heading, body):
    notebook = _source_notebook(body)
    if notebook is None:
        assert re.search(r"`(python|make|torchrun|bash|\.ci/run)[^`]*`", body), (
            f"section {heading!r}: neither drawn from a notebook (a ../notebooks/ link in its first "
            "paragraph) nor naming the command that measured it")
        return
    path = REPO_ROOT / "notebooks" / f"{notebook}.ipynb"
    assert path.is_file(), f"section {heading!r} links {path.name}, which does not exist"
    missing = unlabelled_figures([body], _outputs_text(json.loads(path.read_text())))
    assert not missing, f"docs/measured.md, {heading!r}, against {path.name}:\n" + "\n".join(missing)

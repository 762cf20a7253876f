"""Keep every notebook's first two cells (Colab badge, install cell) in sync with pyproject.toml.

The repository URL lives in one place, `[project.urls] Repository` in pyproject.toml; the badge and
the Colab install cell are generated from it. `python scripts/notebook_headers.py` rewrites the
headers, turns every finished tqdm progress bar into its final line of text (a widget's saved
fallback is its first frame, "0%", which GitHub and Colab previews show), and drops the saved widget
state; `--check` only reports notebooks whose headers are missing or stale, or that carry widget
state (exit code 1). Run it right after executing a notebook (`make notebooks` does): the final
frames are read from the widget state that the run saved.
"""

from __future__ import annotations

import html
import json
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
KEY = "tutorial_header"  # cell metadata marking a generated cell


def repo_url() -> str:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return json.loads(json.dumps(tomllib.load(f)))["project"]["urls"]["Repository"].rstrip("/")


def header_cells(notebook: str) -> list[dict]:
    url = repo_url()
    owner_repo = url.removeprefix("https://github.com/")
    colab = f"https://colab.research.google.com/github/{owner_repo}/blob/main/notebooks/{notebook}"
    badge = f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({colab})"
    install = (
        "# On Colab, install tutorial_lib and Fashion-MNIST; a local checkout (README) has both.\n"
        "import sys\n"
        "\n"
        'if "google.colab" in sys.modules:\n'
        f'    %pip install -q "tutorial_lib[hf,minilm,lora] @ git+{url}"\n'
        "    !apt-get -qq update > /dev/null; apt-get -qq install -y dataset-fashion-mnist > /dev/null "
        '|| echo "no apt package: torchvision downloads Fashion-MNIST instead"\n'
        "\n"
        '# The budget sizes every run: "smoke" (seconds), "default" (a laptop CPU) or "full" (a GPU).\n'
        "# Unset, it is full on a GPU and default on a CPU. To choose, uncomment the next line:\n"
        '# from tutorial_lib import budget; budget.use("default")'
    )
    return [
        {"cell_type": "markdown", "id": "colab-badge", "metadata": {KEY: "badge"}, "source": badge},
        {"cell_type": "code", "id": "colab-install", "metadata": {KEY: "install"}, "source": install,
         "execution_count": None, "outputs": []},
    ]


def _split(source) -> str:
    return "".join(source) if isinstance(source, list) else source


def header_is_current(nb: dict, name: str) -> bool:
    want = header_cells(name)
    have = nb["cells"][:2]
    return len(have) == 2 and all(
        h.get("metadata", {}).get(KEY) == w["metadata"][KEY] and h.get("id") == w["id"]
        and _split(h["source"]) == w["source"]
        for h, w in zip(have, want))


def is_current(nb: dict, name: str) -> bool:
    return "widgets" not in nb.get("metadata", {}) and header_is_current(nb, name)


WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"


def progress_text(model_id: str, state: dict) -> str | None:
    """The final line of the tqdm.notebook bar `model_id` (an HBox of description HTML, FloatProgress,
    counts HTML) from the saved widget `state`, as tqdm prints it in a terminal; None if it is not one."""
    box = state.get(model_id, {})
    children = [state.get(c.removeprefix("IPY_MODEL_"), {}) for c in box.get("state", {}).get("children", [])]
    if box.get("model_name") != "HBoxModel" or [c.get("model_name") for c in children] != \
            ["HTMLModel", "FloatProgressModel", "HTMLModel"]:
        return None
    left, bar, right = (c["state"] for c in children)
    text = [html.unescape(v.get("value", "")).replace("\u2007", " ") for v in (left, right)]
    if not bar.get("max"):  # an unknown total: no bar
        return f"{text[0]}{text[1]}".strip()
    filled = round(10 * min(bar.get("value", 0) / bar["max"], 1))
    return f"{text[0]}|{'█' * filled}{' ' * (10 - filled)}|{text[1]}"


def finish_progress_bars(nb: dict) -> int:
    """Replace every progress-bar widget output whose final state the notebook saved with that final
    line, as plain text; returns how many were replaced."""
    state = nb.get("metadata", {}).get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    replaced = 0
    for cell in nb["cells"]:
        for i, out in enumerate(cell.get("outputs", [])):
            view = out.get("data", {}).get(WIDGET_VIEW)
            line = view and progress_text(view.get("model_id", ""), state)
            if line:
                cell["outputs"][i] = {"output_type": "stream", "name": "stdout", "text": [line + "\n"]}
                replaced += 1
    return replaced


def sync(path: Path) -> bool:
    """Rewrite the header of one notebook (keeping it, outputs included, if current) and drop
    saved widget state; True if anything changed."""
    nb = json.loads(path.read_text())
    if is_current(nb, path.name):
        return False
    finish_progress_bars(nb)
    nb.get("metadata", {}).pop("widgets", None)
    if not header_is_current(nb, path.name):
        body = [c for c in nb["cells"] if KEY not in c.get("metadata", {})]
        head = header_cells(path.name)
        for cell in head:
            cell["source"] = cell["source"].splitlines(keepends=True)
        nb["cells"] = head + body
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    return True


def main(argv: list[str]) -> int:
    paths = sorted(NOTEBOOKS.glob("[0-9][0-9]*_*.ipynb"))
    if "--check" in argv:
        stale = [p.name for p in paths if not is_current(json.loads(p.read_text()), p.name)]
        for name in stale:
            print(f"{name}: Colab header missing or stale, or widget state saved; "
                  "run python scripts/notebook_headers.py")
        return 1 if stale else 0
    for p in paths:
        if sync(p):
            print(f"updated {p.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

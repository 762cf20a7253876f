"""A stand-in for Colab: the built wheel, installed away from the checkout, runs notebooks 00 and 03.

Colab has no checkout: it installs the package and opens one notebook. Here the wheel is built from
this checkout, installed into a target directory that shadows the editable install, and notebooks 00
and 03 run in the smoke budget from a temporary directory with their data cache there too. Anything
they read from the checkout (`data/`, a neighbouring notebook, an asset left out of the wheel) fails.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(site directory with the wheel installed, an empty working directory outside the checkout)."""
    tmp = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp / "dist"), str(ROOT)], check=True)
    wheel = next((tmp / "dist").glob("tutorial_lib-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp / "site"),
                    str(wheel)], check=True)
    work = tmp / "work"
    work.mkdir()
    return tmp / "site", work


def _env(site: Path, work: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(site), "TUTORIAL_BUDGET": "smoke", "TUTORIAL_DATA": str(work / "data")}


def test_the_installed_package_is_the_wheel_not_the_checkout(installed):
    site, work = installed
    out = subprocess.run([sys.executable, "-c", "import tutorial_lib, tutorial_lib.paths as p; "
                          "print(tutorial_lib.__file__); print(p.repo_root())"],
                         cwd=work, env=_env(site, work), capture_output=True, text=True, check=True).stdout.split("\n")
    assert Path(out[0]).is_relative_to(site) and out[1] == "None"
    assert (site / "tutorial_lib" / "assets" / "moe_t2i" / "transformer" / "diffusion_pytorch_model.safetensors").is_file()


@pytest.mark.parametrize("name", ["00_setup_and_data.ipynb", "03_dit_classifier_free_guidance.ipynb"])
def test_a_notebook_runs_from_the_wheel_outside_the_checkout(installed, name):
    site, work = installed
    shutil.copy(ROOT / "notebooks" / name, work / name)
    subprocess.run([sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute", "--output",
                    f"ran_{name}", name], cwd=work, env=_env(site, work), check=True, capture_output=True)
    ran = json.loads((work / f"ran_{name}").read_text())
    errors = [o for c in ran["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors

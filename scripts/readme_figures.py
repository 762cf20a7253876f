"""Copy one figure from each notebook's committed outputs into docs/figures/ for the README's front page.

The figures are the notebooks' own (from their committed default-budget runs), so the front page shows
exactly what a learner will see; rerun this after re-executing a notebook:
    python scripts/readme_figures.py
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "figures"
# notebook -> (the id of the cell whose figure is shown, which of its figures, file name)
FIGURES = {
    "00_setup_and_data": ("3b975522", 0, "00_classes.png"),
    "01_fmnist_latents_tiny_transformer": ("33be9ada", 0, "01_denoising.png"),
    "02_the_full_vae": ("df4f281b", 0, "02_reconstructions.png"),
    "03_dit_classifier_free_guidance": ("75ff7135", 0, "03_guidance.png"),
    "03b_flow_and_score_2d": ("c18", 0, "03b_ode_sde.png"),
    "04_targets_schedules_samplers": ("02bc2e77", 0, "04_targets_by_nfe.png"),
    "05_edm": ("nb05-26", 0, "05_samplers.png"),
    "06_moe_at_scale": ("nb06-09", 0, "06_routing.png"),
    "07_architectures": ("nb07-15", 0, "07_zoo.png"),
    "08_controlling_a_trained_model": ("nb08-11", 0, "08_image_to_image.png"),
    "shipped": ("269afc40", 0, "shipped_dit_t2i.png"),  # notebook 03's grid of the shipped DiT
}


def figure(notebook: str, cell_id: str, index: int) -> bytes:
    nb = json.loads((ROOT / "notebooks" / f"{notebook}.ipynb").read_text())
    cell = next(c for c in nb["cells"] if c.get("id") == cell_id)
    images = [o["data"]["image/png"] for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
    return base64.b64decode(images[index])


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    for notebook, (cell_id, index, name) in FIGURES.items():
        source = "03_dit_classifier_free_guidance" if notebook == "shipped" else notebook
        (OUT / name).write_bytes(figure(source, cell_id, index))
        print(f"docs/figures/{name} <- {source} cell {cell_id}")


if __name__ == "__main__":
    main()

"""Every exercise's worked solution (notebooks/solutions/) passes its check; an unattempted answer is
reported as such, and a wrong one fails."""

import importlib.util
from pathlib import Path

import pytest

from tutorial_lib.exercises import data, dit, edm, moe, sampling, targets, vae, zoo

SOLUTIONS = Path(__file__).resolve().parents[1] / "notebooks" / "solutions"


def solutions(name: str):
    spec = importlib.util.spec_from_file_location(name, SOLUTIONS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BY_NOTEBOOK = {  # notebook -> its exercises' (check, solution function), in the notebook's order
    "00_setup_and_data": [(data.check_to_model_images, "to_model_images_from_scratch"),
                          (data.check_class_means, "class_means")],
    "01_fmnist_latents_tiny_transformer": [(sampling.check_ddim_step, "ddim_step_from_scratch"),
                                           (sampling.check_guidance, "guided")],
    "02_the_full_vae": [(vae.check_reparameterize, "reparameterize"), (vae.check_psnr, "psnr_from_scratch")],
    "03_dit_classifier_free_guidance": [(dit.check_patchify, "patchify"),
                                        (dit.check_best_scale_by_fid, "best_scale_by_fid")],
    "04_targets_schedules_samplers": [(targets.check_flow_to_eps, "flow_to_eps"),
                                      (targets.check_min_snr_v, "min_snr_weight_v")],
    "05_edm": [(edm.check_karras_grid, "karras_grid"), (edm.check_heun, "heun_from_euler")],
    "06_moe_at_scale": [(moe.check_switch_routing, "switch_from_scratch"), (moe.check_balancing_loss, "balancing_loss"),
                        (moe.check_moe_flops, "moe_flops")],
    "07_architectures": [(zoo.check_adaln_single_saving, "adaln_single_saving"),
                         (zoo.check_lora_parameters, "lora_parameters")],
}
EXERCISES = [(notebook, check, solution) for notebook, pairs in BY_NOTEBOOK.items() for check, solution in pairs]


@pytest.mark.parametrize("notebook, check, solution", EXERCISES, ids=[s for _, _, s in EXERCISES])
def test_the_worked_solution_passes_its_check(notebook, check, solution):
    assert check(getattr(solutions(notebook), solution)) is True


@pytest.mark.parametrize("notebook, check, solution", EXERCISES, ids=[s for _, _, s in EXERCISES])
def test_an_unattempted_answer_is_not_attempted_and_a_wrong_one_fails(notebook, check, solution, capsys):
    def stub(*args):
        raise NotImplementedError

    assert check(stub) is None and "not attempted" in capsys.readouterr().out
    right = getattr(solutions(notebook), solution)
    assert check(lambda *args: 2 * right(*args)) is False and "not yet" in capsys.readouterr().out


def test_every_solutions_file_has_its_exercises_listed():
    for path in SOLUTIONS.glob("*.py"):
        module = solutions(path.stem)
        public = {n for n, v in vars(module).items() if callable(v) and getattr(v, "__module__", None) == path.stem}
        assert public == {solution for _, solution in BY_NOTEBOOK.get(path.stem, [])}, path.name


@pytest.mark.parametrize("notebook", sorted(BY_NOTEBOOK))
def test_a_notebook_ends_with_its_exercises_and_calls_every_check(notebook):
    """2 to 4 exercises, each a cell to complete and a check cell, after everything else; the checks
    the notebook calls are exactly those CI runs the solutions through."""
    import json
    import re

    cells = json.loads((SOLUTIONS.parent / f"{notebook}.ipynb").read_text())["cells"]
    source = ["".join(c["source"]) if isinstance(c["source"], list) else c["source"] for c in cells]
    start = next(i for i, s in enumerate(source) if s.startswith("## Exercises"))
    called = [m for s in source[start:] for m in re.findall(r"^(check_\w+)\(", s, re.M)]
    assert called == [check.__name__ for check, _ in BY_NOTEBOOK[notebook]] and 2 <= len(called) <= 4
    assert not any(re.search(r"^(check_\w+)\(", s, re.M) for s in source[:start])

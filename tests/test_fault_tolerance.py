"""Training survives crashes and damaged files, on the CPU:

(a) a process SIGKILLed at each stage of a checkpoint write, then resumed, ends bit for bit where an
    uninterrupted run ends (tests/crash_worker.py);
(b) `python -m tutorial_lib train ... --resume`, SIGKILLed at random moments (5 here, 20 in the slow
    test) and restarted each time, ends with the same weights, EMA, optimizer state and loss history
    as a run never interrupted;
(c) a damaged newest checkpoint (a truncated or altered tensor file, broken trainer.json, a `latest`
    naming a missing folder) is reported and skipped for the previous good one; one given by path,
    or none good at all, is a clear error;
(d) files are written readable by others (not mkstemp's 0600) and flushed before each rename;
    the EMA shares the model's buffers instead of copying them; AdamW's step counters stay on
    the CPU after a resume.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.crash_worker import RUN, STAGES, build
from tests.test_trainer import assert_same_state, config, mlp, mse_loss, regression_data
from tutorial_lib.train.ema import EMA
from tutorial_lib.train.checkpoint import TENSOR_FILES, CheckpointError, verify_checkpoint
from tutorial_lib.train.trainer import Trainer

REPO_ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}


def assert_same_checkpoint(a: Path, b: Path):
    """Bit-identical tensors in every tensor file, and the same step, history and data position."""
    for name in TENSOR_FILES:
        assert_same_state(load_file(a / name), load_file(b / name))
    meta_a, meta_b = (json.loads((p / "trainer.json").read_text()) for p in (a, b))
    for key in ("step", "history", "pending", "data_order", "rng"):
        assert meta_a[key] == meta_b[key], key


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The uninterrupted run of tests/crash_worker.py's configuration; its last checkpoint."""
    out = tmp_path_factory.mktemp("straight")
    build(out).fit()
    return out / "checkpoints" / f"step_{RUN['steps']:08d}"


# ----------------------------------------------------------------------------- (a) each write stage
@pytest.mark.parametrize("stage", STAGES)
def test_killed_during_a_checkpoint_write_resumes_exactly(stage, straight, tmp_path):
    crash_step = 5
    proc = subprocess.run([sys.executable, "-m", "tests.crash_worker", str(tmp_path), stage, str(crash_step)],
                          cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    ckpt = tmp_path / "checkpoints"
    newest = "step_00000005" if stage in ("before_latest", "latest_half") else "step_00000004"
    assert (ckpt / "latest").read_text() == ("step_00000004\n")  # the pointer is never torn
    assert max(p.name for p in ckpt.glob("step_*")) == newest

    resumed = build(tmp_path)
    path = resumed.load_checkpoint()
    assert path.name == "step_00000004"  # `latest`'s, even where step 5 was already in place
    resumed.fit()
    assert_same_checkpoint(ckpt / f"step_{RUN['steps']:08d}", straight)
    assert not list(ckpt.glob(".step_*")) and not list(ckpt.glob(".latest.*"))  # torn files cleaned up


# ----------------------------------------------------------------------------- (b) random SIGKILLs
MICRO = {"model": {"hidden_size": 32, "depth": 1, "num_heads": 2, "frequency_embedding_size": 32},
         "text_encoder": "one_hot"}


def cli_config(out: Path, steps: int) -> Path:
    cfg = {**MICRO, "trainer": {"steps": steps, "batch_size": 16, "lr": 1e-3, "warmup_steps": 5,
                                "ema_decay": 0.9, "log_every": 4, "checkpoint_every": 1,
                                "keep_checkpoints": 2, "tensorboard": False, "device": "cpu",
                                "out_dir": str(out / "run")}}
    path = out / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg))
    return path


def train_command(out: Path, resume: bool) -> list[str]:
    return [sys.executable, "-m", "tutorial_lib", "train", "--model", "dit", "--config", str(out / "config.json"),
            "--out", str(out / "model"), *(["--resume"] if resume else [])]


def progress(checkpoints: Path) -> int:
    """The newest step with a checkpoint finished or being written (0: none yet)."""
    steps = [int(m.group(1)) for p in checkpoints.glob("*step_*") if (m := re.search(r"step_(\d{8})", p.name))]
    return max(steps, default=0)


def kill_and_resume(out: Path, steps: int, kills: int, seed: int) -> list[str]:
    """Train with the CLI and SIGKILL it `kills` times, restarting it with --resume each time, then
    let a last --resume finish. Each kill waits until the restarted process has begun writing the
    checkpoint of a random step 1 to 3 steps ahead, then a random fraction of a step's time, so
    that it lands anywhere in a step or a checkpoint write whatever the machine's speed. Returns
    where each kill landed."""
    rng = random.Random(seed)
    checkpoints, landed, step_time = out / "run" / "checkpoints", [], 0.05
    for k in range(kills):
        target = progress(checkpoints) + rng.randint(1, 3)
        proc = subprocess.Popen(train_command(out, resume=k > 0), cwd=REPO_ROOT, env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline, seen, last = time.monotonic() + 120, progress(checkpoints), None
        while proc.poll() is None and seen < target and time.monotonic() < deadline:
            time.sleep(0.002)
            if (now := progress(checkpoints)) > seen:
                if last is not None:  # a step's duration, from two checkpoints of this process
                    step_time = (time.monotonic() - last) / (now - seen)
                seen, last = now, time.monotonic()
        time.sleep(rng.uniform(0, step_time))
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate()
        assert proc.returncode == -signal.SIGKILL, f"the run ended before kill {k + 1}: {err[-2000:]}"
        writing = any(p.is_dir() for p in checkpoints.glob(".step_*"))
        landed.append(f"step {progress(checkpoints)}" + (" (mid-write)" if writing else ""))
    proc = subprocess.run(train_command(out, resume=True), cwd=REPO_ROOT, env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return landed


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """(folder for the uninterrupted CLI run of `steps` steps, the steps); built once per `steps`."""
    from tutorial_lib.data.latents import latent_cache

    latent_cache()  # encoded once here, not inside a process about to be killed
    runs = {}

    def straight_cli(steps: int) -> Path:
        if steps not in runs:
            out = tmp_path_factory.mktemp(f"cli_straight_{steps}")
            cli_config(out, steps)
            proc = subprocess.run(train_command(out, resume=False), cwd=REPO_ROOT, env=ENV,
                                  capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, proc.stderr[-3000:]
            runs[steps] = out
        return runs[steps]

    return straight_cli


def check_kill_and_resume(cli_runs, tmp_path, steps: int, kills: int, seed: int):
    reference = cli_runs(steps)
    cli_config(tmp_path, steps)
    landed = kill_and_resume(tmp_path, steps, kills, seed)
    print(f"{kills} SIGKILLs landed at: {', '.join(landed)}")
    last = f"run/checkpoints/step_{steps:08d}"
    assert_same_checkpoint(tmp_path / last, reference / last)
    assert (tmp_path / "run/history.jsonl").read_text() == (reference / "run/history.jsonl").read_text()
    weights = "model/transformer/diffusion_pytorch_model.safetensors"
    assert (tmp_path / weights).read_bytes() == (reference / weights).read_bytes()  # the shipped EMA weights


def test_cli_killed_at_5_random_points_resumes_bit_exactly(cli_runs, tmp_path):
    check_kill_and_resume(cli_runs, tmp_path, steps=30, kills=5, seed=0)


@pytest.mark.slow
def test_cli_killed_at_20_random_points_resumes_bit_exactly(cli_runs, tmp_path):
    check_kill_and_resume(cli_runs, tmp_path, steps=90, kills=20, seed=1)


def test_resume_without_a_checkpoint_starts_at_step_0(cli_runs, tmp_path):
    """A restart loop can always pass --resume: before the first checkpoint it starts afresh."""
    cli_config(tmp_path, steps=3)
    proc = subprocess.run(train_command(tmp_path, resume=True), cwd=REPO_ROOT, env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "holds no checkpoint yet; starting at step 0" in proc.stdout
    assert (tmp_path / "run/checkpoints/latest").read_text() == "step_00000003\n"


# ----------------------------------------------------------------------------- (c) damaged files
@pytest.fixture
def three_checkpoints(tmp_path) -> Path:
    """Checkpoints of steps 2, 4 and 6 of a small run; returns the checkpoints folder."""
    Trainer(mlp(), mse_loss, regression_data(), config(tmp_path, checkpoint_every=2, keep_checkpoints=None)).fit()
    return tmp_path / "checkpoints"


def truncate(path: Path):
    os.truncate(path, path.stat().st_size // 2)


def flip_a_byte(path: Path):
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # in the last tensor's data, where no parser would notice
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated model": lambda c: truncate(c / "step_00000006" / "model.safetensors"),
    "altered optimizer": lambda c: flip_a_byte(c / "step_00000006" / "optimizer.safetensors"),
    "missing ema": lambda c: (c / "step_00000006" / "ema.safetensors").unlink(),
    "broken trainer.json": lambda c: truncate(c / "step_00000006" / "trainer.json"),
    "latest names a missing folder": lambda c: (c / "latest").write_text("step_00000008\n"),
    "latest is empty": lambda c: (c / "latest").write_text(""),
}
MESSAGES = {
    "truncated model": r"model.safetensors is damaged: its size differs",
    "altered optimizer": r"optimizer.safetensors is damaged: its SHA-256 differs",
    "missing ema": r"not a checkpoint \(missing ema.safetensors\)",
    "broken trainer.json": r"trainer.json is not valid JSON",
    "latest names a missing folder": r"names 'step_00000008', which is not a checkpoint here",
    "latest is empty": r"names '', which is not a checkpoint here",
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_good_one(damage, three_checkpoints, capsys):
    DAMAGE[damage](three_checkpoints)
    trainer = Trainer(mlp(seed=3), mse_loss, regression_data(), config(three_checkpoints.parent, steps=8))
    path = trainer.load_checkpoint()
    err = capsys.readouterr().err
    assert re.search(MESSAGES[damage], err), err
    expected = "step_00000006" if damage.startswith("latest") else "step_00000004"
    assert path.name == expected and trainer.step == int(expected[5:])
    assert_same_state(trainer.model.state_dict(), load_file(three_checkpoints / expected / "model.safetensors"))


def test_a_damaged_checkpoint_given_by_path_is_an_error(three_checkpoints):
    truncate(three_checkpoints / "step_00000004" / "ema.safetensors")
    trainer = Trainer(mlp(), mse_loss, regression_data(), config(three_checkpoints.parent))
    with pytest.raises(CheckpointError, match="ema.safetensors is damaged: its size differs"):
        trainer.load_checkpoint(three_checkpoints / "step_00000004")
    assert trainer.step == 0


def test_no_good_checkpoint_at_all_is_an_error(three_checkpoints):
    for step in (2, 4, 6):
        truncate(three_checkpoints / f"step_{step:08d}" / "model.safetensors")
    trainer = Trainer(mlp(), mse_loss, regression_data(), config(three_checkpoints.parent))
    with pytest.raises(CheckpointError, match=r"No usable checkpoint in .*step_00000006.*step_00000002"):
        trainer.load_checkpoint()
    with pytest.raises(FileExistsError):  # and a fresh run still refuses to write over them
        trainer.fit()


def test_checkpoint_from_another_run_is_refused_not_skipped(three_checkpoints):
    """Another seed or model is the user's mistake, not damage: no silent fallback."""
    with pytest.raises(CheckpointError, match="data order"):
        Trainer(mlp(), mse_loss, regression_data(), config(three_checkpoints.parent, seed=1)).load_checkpoint()
    with pytest.raises(CheckpointError, match="tensors differ"):
        Trainer(mlp(32), mse_loss, regression_data(), config(three_checkpoints.parent)).load_checkpoint()


def test_verify_checkpoint_records_sizes_and_digests(three_checkpoints):
    meta = verify_checkpoint(three_checkpoints / "step_00000006")
    assert meta["format"] == 2 and set(meta["files"]) == set(TENSOR_FILES)
    for name, record in meta["files"].items():
        assert record["bytes"] == (three_checkpoints / "step_00000006" / name).stat().st_size
        assert re.fullmatch(r"[0-9a-f]{64}", record["sha256"])


# ----------------------------------------------------------------------------- (d) files, EMA, optimizer
def test_saved_files_are_readable_by_others_and_flushed(tmp_path, monkeypatch):
    umask = os.umask(0o022)
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    try:
        Trainer(mlp(), mse_loss, regression_data(), config(tmp_path, steps=2, checkpoint_every=2)).fit()
    finally:
        os.umask(umask)
    ckpt = tmp_path / "checkpoints"
    step = ckpt / "step_00000002"
    assert oct(step.stat().st_mode & 0o777) == oct(0o755)
    for path in [*step.iterdir(), ckpt / "latest", tmp_path / "history.jsonl"]:
        assert oct(path.stat().st_mode & 0o777) == oct(0o644), path
    # Every file, the directory before its rename, the parent after it, and `latest`.
    names = {Path(p).name for p in synced}
    assert {"model.safetensors", "ema.safetensors", "optimizer.safetensors", "trainer.json", "checkpoints"} <= names
    assert any(re.fullmatch(r"\.step_00000002\..*", n) for n in names)  # the directory, before renaming
    assert any(n.startswith(".latest.") for n in names)  # `latest`'s temporary file, before renaming


def test_ema_shares_the_models_buffers():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    model.register_buffer("table", torch.randn(1000, 8), persistent=False)
    ema = EMA(model, decay=0.5)
    assert ema.model.table is model.table and ema.model[1].running_mean is model[1].running_mean
    model.train()(torch.randn(4, 2))  # BatchNorm updates its statistics in place
    assert torch.equal(ema.model[1].running_mean, model[1].running_mean)
    model.table = torch.zeros(3)  # a buffer replaced outright is shared again at the next update
    ema.update(model)
    assert ema.model.table is model.table
    assert not any(p.requires_grad for p in ema.model.parameters())


def test_resumed_optimizer_state_matches_and_step_counters_stay_on_the_cpu(tmp_path):
    a = Trainer(mlp(), mse_loss, regression_data(), config(tmp_path, steps=2, checkpoint_every=2))
    a.fit()
    b = Trainer(mlp(), mse_loss, regression_data(), config(tmp_path, steps=4))
    b.load_checkpoint()
    for i, state in a.optimizer.state_dict()["state"].items():
        assert_same_state(state, b.optimizer.state_dict()["state"][i])
        assert b.optimizer.state[b.params[i]]["step"].device.type == "cpu"


@pytest.mark.cuda
def test_resume_on_a_gpu_keeps_step_counters_on_the_cpu(tmp_path):
    Trainer(mlp(), mse_loss, regression_data(), config(tmp_path, steps=2, checkpoint_every=2, device="cuda")).fit()
    trainer = Trainer(mlp(), mse_loss, regression_data(), config(tmp_path, steps=4, device="cuda"))
    trainer.load_checkpoint()
    for p in trainer.params:
        state = trainer.optimizer.state[p]
        assert state["step"].device.type == "cpu"
        assert state["exp_avg"].device == p.device and state["exp_avg_sq"].device == p.device
    trainer.fit()
    assert trainer.step == 4 and all(torch.isfinite(p).all() for p in trainer.params)

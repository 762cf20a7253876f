"""The Trainer under data parallelism: 2 CPU processes on the gloo backend, started as torchrun
would start them (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT in the environment).

(a) Both ranks end with identical weights. (b) Two ranks with micro-batches of 4 take the same
steps as one process on the same global batch of 8: bit for bit when that process accumulates the
same two micro-batches (dividing by 2 is exact, and the sum of two gradients does not depend on
the order), and within 1e-6 when it takes all 8 at once (other float rounding in the reductions).
(c) A DDP run stopped and resumed from its checkpoint ends where the uninterrupted one does.
(d) `main_first`: rank 0 alone encodes the latent cache, the other rank waits and reads the same one.
(e) The process group's timeout comes from the argument (TrainerConfig, the CLI's --dist-timeout), else the
environment, else 30 minutes; the CLI's `train` leaves the group at the end, also when it fails.
"""

from __future__ import annotations

import json
import os
import socket
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from tests.test_trainer import assert_same_state, mlp, mse_loss, regression_data
from tutorial_lib.data import latents as latents_mod
from tutorial_lib.train import distributed
from tutorial_lib.train.trainer import Trainer, TrainerConfig
from tutorial_lib.weights import weights_hash

WORLD = 2
TOLERANCE = 1e-6  # max |difference| of weights after 6 steps, DDP vs one process with one micro-batch


def noisy_loss(model, batch, generator):
    """Inputs jittered from the trainer's generator: each rank draws its own stream."""
    x, y = batch
    return F.mse_loss(model(x + 0.1 * torch.randn(x.shape, generator=generator)), y)


def run_config(out_dir: Path, **overrides) -> TrainerConfig:
    base = dict(steps=6, batch_size=8, lr=1e-2, warmup_steps=2, log_every=2, checkpoint_every=3,
                out_dir=str(out_dir), tensorboard=False)
    return TrainerConfig(**{**base, **overrides})


def _worker(rank: int, port: int, root: str):
    """One rank: a deterministic run to compare with one process, then a stopped and resumed run."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    root = Path(root)
    try:
        trainer = Trainer(mlp(seed=rank), mse_loss, regression_data(), run_config(root / "ddp"))
        assert trainer.dist.world_size == WORLD and trainer.dist.rank == rank
        assert not trainer.net.broadcast_buffers  # constant buffers are not re-sent every step
        history = trainer.fit()  # each rank built other weights: DDP's broadcast makes them rank 0's
        save_file(trainer.model.state_dict(), root / f"ddp_rank{rank}.safetensors")
        (root / f"ddp_rank{rank}.json").write_text(json.dumps(history))

        straight = Trainer(mlp(), noisy_loss, regression_data(), run_config(root / "straight"))
        straight.fit()

        def crash_at_step_5(model, batch, generator):
            if interrupted.step == 4:
                raise KeyboardInterrupt
            return noisy_loss(model, batch, generator)

        interrupted = Trainer(mlp(), crash_at_step_5, regression_data(), run_config(root / "resumed"))
        try:
            interrupted.fit()
        except KeyboardInterrupt:
            pass
        resumed = Trainer(mlp(seed=7), noisy_loss, regression_data(), run_config(root / "resumed"))
        resumed.load_checkpoint()
        assert resumed.fit() == straight.history
        assert_same_state(resumed.model.state_dict(), straight.model.state_dict())
        assert_same_state(resumed.ema_model.state_dict(), straight.ema_model.state_dict())
        (root / f"resumed_rank{rank}.ok").write_text(str(resumed.save_checkpoint()))
    finally:
        distributed.cleanup()


def _latent_cache_worker(rank: int, port: int, root: str, vae, data):
    """One rank: the CLI's way to open the latent cache, counting this rank's encodes."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    encode, encodes = latents_mod._encode, []

    def counted_encode(*args):
        encodes.append(args[-1])
        return encode(*args)

    latents_mod._encode = counted_encode
    latents_mod.load_fashion_mnist = lambda split: data[split]
    root = Path(root)
    try:
        info = distributed.setup()
        cache = distributed.main_first(lambda: latents_mod.latent_cache(vae=vae, root=root / "latents"), info)
        save_file({"latents": cache.tensors("train")[0]}, root / f"latents_rank{rank}.safetensors")
        (root / f"encodes_rank{rank}.json").write_text(json.dumps(encodes))
    finally:
        distributed.cleanup()


def spawn(worker, args, seconds: int = 120):
    """Run `worker(rank, port, *args)` on WORLD processes; fail the test if one fails or hangs."""
    context = mp.spawn(worker, args=(free_port(), *args), nprocs=WORLD, join=False)
    deadline = time.monotonic() + seconds
    while not context.join(timeout=1):  # raises if a worker failed
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"The workers did not finish in {seconds} s.")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    spawn(_worker, (str(root),))
    return root


def test_ranks_hold_identical_weights(ddp_run):
    rank0, rank1 = (load_file(ddp_run / f"ddp_rank{r}.safetensors") for r in range(WORLD))
    assert_same_state(rank0, rank1)
    assert (ddp_run / "ddp_rank0.json").read_text() == (ddp_run / "ddp_rank1.json").read_text()


def test_ddp_matches_one_process_on_the_same_global_batch(ddp_run, tmp_path):
    ddp = load_file(ddp_run / "ddp_rank0.safetensors")
    ddp_history = json.loads((ddp_run / "ddp_rank0.json").read_text())

    same_micro = Trainer(mlp(), mse_loss, regression_data(), run_config(tmp_path / "a", grad_accum_steps=2))
    assert same_micro.fit() == ddp_history
    assert_same_state(same_micro.model.state_dict(), ddp)

    full = Trainer(mlp(), mse_loss, regression_data(), run_config(tmp_path / "b"))
    history = full.fit()
    diff = max((full.model.state_dict()[k] - ddp[k]).abs().max().item() for k in ddp)
    assert 0 < diff < TOLERANCE  # measured: 3.0e-8 after 6 steps
    assert [r["loss"] for r in history] == pytest.approx([r["loss"] for r in ddp_history], rel=1e-6)


def test_only_rank_0_writes_and_resume_is_exact(ddp_run):
    assert (ddp_run / "resumed_rank0.ok").read_text().endswith("step_00000006")
    assert (ddp_run / "resumed_rank1.ok").read_text() == "None"  # save_checkpoint on rank 1 writes nothing
    history = json.loads((ddp_run / "ddp_rank0.json").read_text())
    lines = (ddp_run / "ddp" / "history.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == history  # written once, not once per rank
    meta = json.loads((ddp_run / "resumed" / "checkpoints" / "step_00000006" / "trainer.json").read_text())
    assert meta["world_size"] == WORLD and len(meta["rng"]) == WORLD
    assert meta["rng"][0]["generator"] != meta["rng"][1]["generator"]  # each rank its own stream


def test_one_process_is_a_world_of_one():
    info = distributed.setup()
    assert (info.rank, info.world_size, info.is_main, info.enabled) == (0, 1, True, False)
    t = torch.arange(3.0)
    assert distributed.all_reduce_mean(t, info) is t
    assert torch.equal(distributed.all_gather(t, info)[0], t)
    model = mlp()
    assert distributed.wrap(model, info, torch.device("cpu")) is model
    assert distributed.main_first(lambda: "built", info) == "built"


def test_rank_0_alone_builds_the_latent_cache(tiny_vae, real_test, tmp_path):
    images, labels = real_test
    data = {"train": (images[:16], labels[:16]), "test": (images[16:24], labels[16:24])}
    spawn(_latent_cache_worker, (str(tmp_path), tiny_vae, data))
    encodes = [json.loads((tmp_path / f"encodes_rank{r}.json").read_text()) for r in range(WORLD)]
    assert encodes == [["encoding train", "encoding test"], []]  # rank 1 waited, then found it built
    rank0, rank1 = (load_file(tmp_path / f"latents_rank{r}.safetensors")["latents"] for r in range(WORLD))
    assert rank0.shape == (16, 4, 16, 16) and torch.equal(rank0, rank1)
    assert [p.name for p in (tmp_path / "latents").iterdir()] == [f"vae-{weights_hash(tiny_vae)}"]


# ----------------------------------------------------------------------------- process group: timeout, cleanup
def test_the_process_group_timeout_is_configurable(monkeypatch):
    monkeypatch.delenv(distributed.TIMEOUT_ENV, raising=False)
    assert distributed.timeout() == timedelta(minutes=30)  # outlasts rank 0's checkpoint write (distributed.py)
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "45")
    assert distributed.timeout() == timedelta(minutes=45) and distributed.timeout(5) == timedelta(minutes=5)
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match="TUTORIAL_LIB_DIST_TIMEOUT_MINUTES must be a number of minutes"):
        distributed.timeout()
    with pytest.raises(ValueError, match="dist_timeout_minutes must be > 0 or None"):
        TrainerConfig(dist_timeout_minutes=0)

    joined = {}

    def init_process_group(backend, timeout):  # what torchrun's environment would make setup() join
        joined.update(backend=backend, timeout=timeout)
        raise InterruptedError

    monkeypatch.setattr(distributed.dist, "init_process_group", init_process_group)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(InterruptedError):
        distributed.setup(timeout_minutes=90)
    assert joined == {"backend": "gloo", "timeout": timedelta(minutes=90)}


def test_the_cli_passes_the_distributed_flags_and_leaves_the_group_also_on_error(monkeypatch, tmp_path):
    from tutorial_lib import cli

    args = cli.build_parser().parse_args(["train", "--parallelism", "hsdp", "--dist-timeout", "45", "--out",
                                          str(tmp_path)])
    trainer = cli._train_config(args).trainer
    assert (trainer.parallelism, trainer.dist_timeout_minutes) == ("hsdp", 45.0)

    calls = []
    monkeypatch.setattr(distributed, "setup",
                        lambda minutes: calls.append(("setup", minutes)) or distributed.DistInfo())
    monkeypatch.setattr(distributed, "cleanup", lambda: calls.append("cleanup"))

    def failing_train(a, cfg, info):
        raise RuntimeError("a rank failed")

    monkeypatch.setattr(cli, "_train", failing_train)
    with pytest.raises(RuntimeError, match="a rank failed"):
        cli.main(["train", "--dist-timeout", "45", "--out", str(tmp_path)])
    assert calls == [("setup", 45.0), "cleanup"]

"""The Trainer on tiny problems, one process on the CPU: exact resume, the NaN guard, checkpoints
(atomic, safetensors + JSON, refused for another model), logging with and without TensorBoard,
sample grids, bf16, torch.compile, the DataLoader (workers, datasets of whole batches with captions,
each rank's micro-batches), activation checkpointing and bad configs. The DDP tests are in
test_distributed.py, the FSDP ones in test_fsdp.py."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from tutorial_lib.models.dit import DiT, DiTConfig
from tutorial_lib.text.base import TextEmbedding
from tutorial_lib.train import checkpoint as checkpoint_module
from tutorial_lib.train import trainer as trainer_module
from tutorial_lib.train.checkpoint import CheckpointError
from tutorial_lib.train.loader import MicroBatches, ShuffledBatches
from tutorial_lib.train.trainer import NonFiniteError, Trainer, TrainerConfig

TINY_DIT = DiTConfig(in_channels=2, input_size=(4, 4), patch_size=2, hidden_size=16, depth=1, num_heads=2,
                     text_dim=8, frequency_embedding_size=16)


# ----------------------------------------------------------------------------- tiny problems
def regression_data(n: int = 48):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return x, x @ torch.randn(4, 2, generator=g)


def mlp(width: int = 16, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, width), nn.GELU(), nn.Linear(width, 2))


def mse_loss(model, batch, generator):
    x, y = batch
    return F.mse_loss(model(x), y)


def latent_data(n: int = 24):
    """(latents [n, 2, 4, 4], caption tokens [n, 3, 8], mask [n, 3]) for TINY_DIT."""
    g = torch.Generator().manual_seed(1)
    latents, tokens = torch.randn(n, 2, 4, 4, generator=g), torch.randn(n, 3, 8, generator=g)
    return latents, tokens, torch.ones(n, 3, dtype=torch.bool)


def diffusion_loss(model, batch, generator):
    """x0-prediction on a cosine path; randomness from the trainer's generator (t, noise) and from
    torch's global RNG (dropout on the caption tokens), so resume must restore both."""
    x0, tokens, mask = batch
    t = torch.rand(len(x0), generator=generator)  # [B]
    noise = torch.randn(x0.shape, generator=generator)
    a, s = torch.cos(t * math.pi / 2)[:, None, None, None], torch.sin(t * math.pi / 2)[:, None, None, None]
    text = TextEmbedding(F.dropout(tokens, 0.2), mask)
    return F.mse_loss(model(a * x0 + s * noise, t, text), x0), {"t_mean": t.mean()}


def config(tmp_path, **overrides) -> TrainerConfig:
    base = dict(steps=6, batch_size=8, lr=1e-2, warmup_steps=2, log_every=2, checkpoint_every=None,
                out_dir=str(tmp_path), tensorboard=False)
    return TrainerConfig(**{**base, **overrides})


def assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------- exact resume
# 10 steps of 2 micro-batches, a checkpoint every 4: a run stopped in step 7 resumes from step 4.
RESUME_RUN = dict(steps=10, batch_size=8, grad_accum_steps=2, ema_decay=0.9, log_every=3, checkpoint_every=4)


def interrupt_at_step_7(out_dir, **cfg):
    """The tiny DiT run of `cfg` (RESUME_RUN's steps and micro-batches) stopped as a crash would stop
    it, by a KeyboardInterrupt in the first micro-batch of step 7."""
    calls = 0

    def crashing_loss(model, batch, generator):
        nonlocal calls
        calls += 1
        if calls == 13:  # the first micro-batch of step 7
            raise KeyboardInterrupt
        return diffusion_loss(model, batch, generator)

    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        Trainer(DiT(TINY_DIT), crashing_loss, latent_data(), config(out_dir, **cfg)).fit()


def test_resume_is_bit_exact(tmp_path):
    """Stopped at step 7 (last checkpoint: step 4) and resumed from a freshly built model, a run
    ends with the same model, EMA, optimizer state and loss history as an uninterrupted one."""
    data, cfg = latent_data(), RESUME_RUN
    torch.manual_seed(0)
    straight = Trainer(DiT(TINY_DIT), diffusion_loss, data, config(tmp_path / "a", **cfg))
    history = straight.fit()
    interrupt_at_step_7(tmp_path / "b", **cfg)
    lines = (tmp_path / "b" / "history.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [3, 6]

    torch.manual_seed(1)  # other initial weights and RNG: the checkpoint must restore everything
    resumed = Trainer(DiT(TINY_DIT), diffusion_loss, data, config(tmp_path / "b", **cfg))
    path = resumed.load_checkpoint()
    assert path.name == "step_00000004" and resumed.step == 4
    assert [r["step"] for r in resumed.history] == [3]  # step 4's scalars wait in the pending sums
    assert resumed.fit() == history
    assert [r["step"] for r in history] == [3, 6, 9, 10]
    assert_same_state(resumed.model.state_dict(), straight.model.state_dict())
    assert_same_state(resumed.ema_model.state_dict(), straight.ema_model.state_dict())
    opt_a, opt_b = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    for i in opt_a:
        assert_same_state(opt_a[i], opt_b[i])
    assert (tmp_path / "b" / "history.jsonl").read_text() == (tmp_path / "a" / "history.jsonl").read_text()
    # The EMA really averages (it is not the model), and the loss history is not trivially equal.
    assert not torch.equal(straight.ema_model.x_embedder.weight, straight.model.x_embedder.weight)
    assert len({r["loss"] for r in history}) == len(history)


def test_shuffled_batches_epochs_and_state():
    a = ShuffledBatches(10, 4, seed=3)
    first = [a.next() for _ in range(2)]  # one epoch: 2 batches of 4, 2 examples dropped
    assert len(set(torch.cat(first).tolist())) == 8
    state = a.state_dict()
    rest = [a.next() for _ in range(5)]
    b = ShuffledBatches(10, 4, seed=3)
    b.load_state_dict(state)
    assert all(torch.equal(x, b.next()) for x in rest)
    assert not torch.equal(torch.cat(first), torch.cat(rest[:2]))  # a new order each epoch
    with pytest.raises(ValueError, match="cannot be restored"):
        ShuffledBatches(12, 4, seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="does not fit"):
        ShuffledBatches(3, 4, seed=0)


def test_accumulation_takes_the_full_batch_step(tmp_path):
    """grad_accum_steps=2 over micro-batches of 4 = one batch of 8 (up to float rounding)."""
    data = regression_data()
    one = Trainer(mlp(), mse_loss, data, config(tmp_path / "a"))
    two = Trainer(mlp(), mse_loss, data, config(tmp_path / "b", grad_accum_steps=2))
    h1, h2 = one.fit(), two.fit()
    for a, b in zip(one.model.parameters(), two.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert [r["loss"] for r in h1] == pytest.approx([r["loss"] for r in h2], rel=1e-6)


def test_learning_rate_schedule():
    cos = TrainerConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert [cos.lr_at(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert cos.lr_at(100) == pytest.approx(0.1) and cos.lr_at(55) == pytest.approx(0.55)
    const = TrainerConfig(steps=100, lr=2.0, warmup_steps=4, schedule="constant")
    assert [const.lr_at(s) for s in (0, 3, 50, 99)] == pytest.approx([0.5, 2.0, 2.0, 2.0])
    assert TrainerConfig(lr=2.0, warmup_steps=0, schedule="constant").lr_at(0) == 2.0


def test_edm2_inverse_square_root_schedule():
    """EDM2's Eq. 16: alpha_ref / sqrt(max(t / t_ref, 1)) after the warm-up; step s is the (s + 1)-th update."""
    edm2 = TrainerConfig(steps=10_000, lr=1.0, warmup_steps=10, schedule="inverse_sqrt", lr_decay_start=100)
    assert [edm2.lr_at(s) for s in (0, 9, 50, 99)] == pytest.approx([0.1, 1.0, 1.0, 1.0])
    assert [edm2.lr_at(s) for s in (399, 899, 9999)] == pytest.approx([0.5, 1 / 3, 0.1])
    for bad, message in [(dict(schedule="inverse_sqrt"), "lr_decay_start goes with"),
                         (dict(schedule="cosine", lr_decay_start=100), "lr_decay_start goes with"),
                         (dict(schedule="inverse_sqrt", lr_decay_start=0), "lr_decay_start must be >= 1")]:
        with pytest.raises(ValueError, match=message):
            TrainerConfig(**bad)


# ----------------------------------------------------------------------------- NaN guard
def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    def loss_fn(model, batch, generator):
        loss = mse_loss(model, batch, generator)
        return loss * float("nan") if trainer.step == 4 else loss  # the 5th step

    trainer = Trainer(mlp(), loss_fn, regression_data(), config(tmp_path, checkpoint_every=2))
    with pytest.raises(NonFiniteError, match=r"Step 5: the loss is nan.*step_00000004, is untouched"):
        trainer.fit()
    ckpt = tmp_path / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_00000004"
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step_00000002", "step_00000004"]
    # No update was applied: the model still holds step 4's (finite) weights, as saved.
    saved = load_file(ckpt / "step_00000004" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in saved.values())
    assert_same_state(saved, trainer.model.state_dict())


def test_nonfinite_gradient_norm_stops(tmp_path):
    def loss_fn(model, batch, generator):
        w = model[0].weight
        # 0 * sqrt(0): the loss stays finite, its gradient is 0 * inf = nan.
        return mse_loss(model, batch, generator) + 0 * torch.sqrt(w.sum() - w.sum().detach())

    trainer = Trainer(mlp(), loss_fn, regression_data(), config(tmp_path))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(NonFiniteError, match="Step 1: the gradient norm is nan.*no checkpoint had been"):
        trainer.fit()
    assert_same_state(before, trainer.model.state_dict())


# ----------------------------------------------------------------------------- checkpoints
def test_checkpoint_layout_is_safetensors_and_json(tmp_path):
    cfg = config(tmp_path, checkpoint_every=2, keep_checkpoints=2)
    trainer = Trainer(mlp(), mse_loss, regression_data(), cfg)
    trainer.fit()
    ckpt = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step_00000004", "step_00000006"]
    assert (ckpt / "latest").read_text() == "step_00000006\n"
    files = sorted(p.name for p in (ckpt / "step_00000006").iterdir())
    assert files == ["ema.safetensors", "model.safetensors", "optimizer.safetensors", "trainer.json"]
    meta = json.loads((ckpt / "step_00000006" / "trainer.json").read_text())
    assert meta["step"] == 6 and meta["world_size"] == 1 and TrainerConfig(**meta["config"]) == cfg
    assert set(meta["rng"][0]) == {"torch", "generator"}
    optimizer = load_file(ckpt / "step_00000006" / "optimizer.safetensors")
    assert set(optimizer) == {f"{i}.{name}" for i in range(4) for name in ("step", "exp_avg", "exp_avg_sq")}
    # Never pickle: the trainer and its checkpoints call no torch.save / torch.load and import no pickle.
    for module in (trainer_module, checkpoint_module):
        source = Path(module.__file__).read_text()
        assert not any(word in source for word in ("torch.save(", "torch.load(", "import pickle")), module


def test_a_failed_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    trainer = Trainer(mlp(), mse_loss, regression_data(), config(tmp_path, checkpoint_every=2))
    real_save = checkpoint_module.save_file

    def failing_save(tensors, filename, *args, **kwargs):
        if trainer.step == 4 and Path(filename).name == "ema.safetensors":
            raise OSError("disk full")
        return real_save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        trainer.fit()
    ckpt = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step_00000002"]  # no half-written step 4
    assert (ckpt / "latest").read_text().strip() == "step_00000002"


def test_checkpoint_for_another_model_is_refused(tmp_path):
    data = latent_data()
    Trainer(DiT(TINY_DIT), diffusion_loss, data, config(tmp_path, steps=2, checkpoint_every=2)).fit()
    deeper = Trainer(DiT(dataclasses.replace(TINY_DIT, depth=2)), diffusion_loss, data, config(tmp_path))
    with pytest.raises(CheckpointError, match=r"configs differ.*'depth': \(1, 2\)"):
        deeper.load_checkpoint()
    assert deeper.step == 0

    Trainer(mlp(16), mse_loss, regression_data(), config(tmp_path / "m", steps=2, checkpoint_every=2)).fit()
    wider = Trainer(mlp(32), mse_loss, regression_data(), config(tmp_path / "m"))
    with pytest.raises(CheckpointError, match=r"tensors differ.*'0.weight': \(\[16, 4\], \[32, 4\]\)"):
        wider.load_checkpoint()


def test_resume_needs_the_same_batch_size_and_data(tmp_path):
    Trainer(mlp(), mse_loss, regression_data(), config(tmp_path, steps=2, checkpoint_every=2)).fit()
    with pytest.raises(CheckpointError, match="data order"):
        Trainer(mlp(), mse_loss, regression_data(), config(tmp_path, batch_size=16)).load_checkpoint()
    with pytest.raises(CheckpointError, match="data order"):
        Trainer(mlp(), mse_loss, regression_data(40), config(tmp_path)).load_checkpoint()
    with pytest.raises(CheckpointError, match="No checkpoint to resume"):
        Trainer(mlp(), mse_loss, regression_data(), config(tmp_path / "empty")).load_checkpoint()
    with pytest.raises(CheckpointError, match=r"is not a checkpoint \(missing model.safetensors"):
        Trainer(mlp(), mse_loss, regression_data(), config(tmp_path)).load_checkpoint(tmp_path)


def test_resume_needs_a_generator_of_the_same_device_type(tmp_path):
    """loss_fn's generator lives on the training device: a checkpoint holding a generator state of another
    device type (a CUDA generator's 16 bytes here; a CPU generator's 5,056) is refused, not half-restored."""
    Trainer(mlp(), mse_loss, regression_data(), config(tmp_path, steps=2, checkpoint_every=2)).fit()
    meta_path = tmp_path / "checkpoints" / "step_00000002" / "trainer.json"
    meta = json.loads(meta_path.read_text())
    meta["rng"][0]["generator"] = checkpoint_module._b64(torch.zeros(16, dtype=torch.uint8))
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="another device type.*resume on the kind of device"):
        Trainer(mlp(), mse_loss, regression_data(), config(tmp_path)).load_checkpoint()


def test_a_fresh_run_does_not_overwrite_checkpoints(tmp_path):
    Trainer(mlp(), mse_loss, regression_data(), config(tmp_path, steps=2, checkpoint_every=2)).fit()
    with pytest.raises(FileExistsError, match="load_checkpoint"):
        Trainer(mlp(), mse_loss, regression_data(), config(tmp_path, steps=2, checkpoint_every=2)).fit()


# ----------------------------------------------------------------------------- logging, samples
def test_without_tensorboard_logging_is_skipped_with_one_message(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    trainer = Trainer(mlp(), mse_loss, regression_data(), config(tmp_path, tensorboard=True))
    history = trainer.fit()
    out = capsys.readouterr().out
    assert out.count("TensorBoard logging skipped") == 1
    assert not (tmp_path / "tensorboard").exists()
    assert [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()] == history
    assert [r["step"] for r in history] == [2, 4, 6]
    assert set(history[0]) == {"step", "loss", "grad_norm", "lr"}


def test_tensorboard_scalars_and_sample_grids(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    calls = []

    def sample_fn(ema_model, step):
        calls.append((step, ema_model.training))
        return torch.rand(4, 1, 8, 8) * 2 - 1 + 0 * torch.randn(())  # draws from the global RNG

    data = regression_data()
    plain = Trainer(mlp(), mse_loss, data, config(tmp_path / "plain"))
    plain.fit()
    trainer = Trainer(mlp(), mse_loss, data, config(tmp_path / "tb", tensorboard=True, sample_every=3),
                      sample_fn=sample_fn)
    trainer.fit()
    assert calls == [(3, False), (6, False)]
    assert sorted(p.name for p in (tmp_path / "tb" / "samples").iterdir()) == ["step_00000003.png",
                                                                              "step_00000006.png"]
    events = EventAccumulator(str(tmp_path / "tb" / "tensorboard")).Reload()
    assert {"train/loss", "train/lr", "train/grad_norm"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6]
    assert events.Tags()["images"] == ["samples"]
    # Sampling forks the RNG: it changes nothing in training.
    assert_same_state(plain.model.state_dict(), trainer.model.state_dict())


def test_metrics_are_averaged_into_the_history(tmp_path):
    def loss_fn(model, batch, generator):
        return mse_loss(model, batch, generator), {"const": 3.0, "x_mean": batch[0].mean()}

    history = Trainer(mlp(), loss_fn, regression_data(), config(tmp_path, grad_accum_steps=2)).fit()
    assert all(r["const"] == 3.0 for r in history)
    assert all(math.isfinite(r["x_mean"]) for r in history)


# ----------------------------------------------------------------------------- precision, compile
def test_bf16_autocast_on_cpu_stays_finite(tmp_path):
    trainer = Trainer(DiT(TINY_DIT), diffusion_loss, latent_data(),
                      config(tmp_path, mixed_precision="bf16", steps=4, grad_accum_steps=2))
    history = trainer.fit()
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in history)
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # autocast, not bf16 weights
    assert all(torch.isfinite(p).all() for p in trainer.ema_model.parameters())


def test_fp16_needs_a_gpu(tmp_path):
    with pytest.raises(ValueError, match="fp16.*CUDA GPU.*bf16"):
        Trainer(mlp(), mse_loss, regression_data(), config(tmp_path, mixed_precision="fp16", device="cpu"))


def test_torch_compile_is_accepted(tmp_path):
    """aot_eager: Dynamo traces the model (the part that can fail), without inductor's C++ build."""
    trainer = Trainer(mlp(), mse_loss, regression_data(),
                      config(tmp_path, compile=True, compile_backend="aot_eager", steps=2,
                             checkpoint_every=2))
    eager = Trainer(mlp(), mse_loss, regression_data(), config(tmp_path / "eager", steps=2))
    assert type(trainer.net).__name__ == "OptimizedModule"
    trainer.fit(), eager.fit()
    for a, b in zip(trainer.model.parameters(), eager.model.parameters()):
        torch.testing.assert_close(a, b)
    saved = load_file(tmp_path / "checkpoints" / "step_00000002" / "model.safetensors")
    assert set(saved) == set(eager.model.state_dict())  # no "_orig_mod." prefixes


def test_torch_compile_finds_the_dit_positions_built(tmp_path):
    """With compile=True the DiT's position tables are built before tracing (DiT.build_positions): a
    compiled forward that fills the cache itself is traced a second time at its next call."""
    eager = Trainer(DiT(TINY_DIT), mse_loss, regression_data(), config(tmp_path / "eager", steps=2))
    compiled = Trainer(DiT(TINY_DIT), mse_loss, regression_data(),
                       config(tmp_path, compile=True, compile_backend="eager", steps=2))
    assert not eager.model._positions
    assert list(compiled.model._positions) == [(2, 2, "cpu")]


@pytest.mark.skipif(not os.environ.get("TUTORIAL_SLOW_TESTS"),
                    reason="inductor's first compile takes about 20 s on a 2-core CPU; "
                           "set TUTORIAL_SLOW_TESTS=1")
def test_torch_compile_inductor(tmp_path):
    history = Trainer(mlp(), mse_loss, regression_data(), config(tmp_path, compile=True, steps=2)).fit()
    assert math.isfinite(history[-1]["loss"])


# ----------------------------------------------------------------------------- the DataLoader
def test_workers_give_the_same_weights(tmp_path):
    """Worker processes only gather the batches the trainer's data order names: the same run, bit for bit."""
    runs = [Trainer(mlp(), mse_loss, regression_data(), config(tmp_path / str(workers), num_workers=workers,
                                                               prefetch_factor=prefetch))
            for workers, prefetch in ((0, None), (2, None), (2, 1))]
    histories = [trainer.fit() for trainer in runs]
    assert histories[1] == histories[0] and histories[2] == histories[0]
    for trainer in runs[1:]:
        assert_same_state(trainer.model.state_dict(), runs[0].model.state_dict())


class CaptionedVectors:
    """A map-style dataset whose __getitems__ returns one whole batch: {"x", "caption" (strings), "label"}."""

    def __init__(self, n: int = 16):
        self.x, self.y = regression_data(n)
        self.captions = [f"vector number {i}" for i in range(n)]

    def __len__(self) -> int:
        return len(self.x)

    def __getitems__(self, indices: list[int]) -> dict:
        return {"x": self.x[indices], "y": self.y[indices], "caption": [self.captions[i] for i in indices],
                "label": torch.tensor(indices)}


@pytest.mark.parametrize("workers", [0, 2])
def test_a_dataset_of_whole_batches_passes_strings_to_the_loss(workers, tmp_path):
    seen = []

    def loss_fn(model, batch, generator):
        assert batch["caption"] == [f"vector number {i}" for i in batch["label"].tolist()]
        seen.extend(batch["caption"])
        return F.mse_loss(model(batch["x"]), batch["y"])

    Trainer(mlp(), loss_fn, CaptionedVectors(), config(tmp_path, steps=2, num_workers=workers)).fit()
    assert sorted(seen) == sorted(CaptionedVectors().captions)  # two steps of 8: one epoch of 16


def test_workers_and_a_mid_epoch_resume_are_bit_exact(tmp_path):
    """Workers read ahead of the step, but the checkpoint records the trainer's own data order: a run
    with 2 workers stopped at step 7 and resumed from step 4, in the middle of an epoch (3 steps per
    epoch), ends bit for bit where an uninterrupted run without workers ends."""
    data, cfg = latent_data(), {**RESUME_RUN, "num_workers": 2}
    torch.manual_seed(0)
    straight = Trainer(DiT(TINY_DIT), diffusion_loss, data, config(tmp_path / "a", **RESUME_RUN))
    history = straight.fit()
    interrupt_at_step_7(tmp_path / "b", **cfg)
    torch.manual_seed(1)
    resumed = Trainer(DiT(TINY_DIT), diffusion_loss, data, config(tmp_path / "b", **cfg))
    assert resumed.load_checkpoint().name == "step_00000004"
    assert (resumed.batches.epoch, resumed.batches.position) == (1, 8)  # 4 steps of 8 in epochs of 24
    assert resumed.fit() == history
    assert_same_state(resumed.model.state_dict(), straight.model.state_dict())
    assert_same_state(resumed.ema_model.state_dict(), straight.ema_model.state_dict())


def test_micro_batches_of_the_ranks_partition_each_global_batch():
    """From a mid-epoch state, across an epoch boundary: at each step, rank r's grad_accum_steps
    micro-batches are column r of the global batch viewed as [accum, ranks, micro-batch]."""
    order = ShuffledBatches(20, 8, seed=3)  # 2 batches per epoch, 4 examples dropped
    order.next()
    accum, world = 2, 2
    ranks = [iter(MicroBatches(order.state_dict(), accum, rank, world)) for rank in range(world)]
    for _ in range(4):
        batch = order.next()
        micro = [[next(r) for _ in range(accum)] for r in ranks]  # [rank][accum] lists of 2 indices
        assert sorted(i for rank in micro for m in rank for i in m) == sorted(batch.tolist())
        assert [[micro[r][a] for r in range(world)] for a in range(accum)] == batch.view(accum, world, -1).tolist()


# ----------------------------------------------------------------------------- activation checkpointing
def test_activation_checkpointing_recomputes_blocks_with_the_same_loss_and_gradients():
    torch.manual_seed(0)
    model = DiT(dataclasses.replace(TINY_DIT, depth=2))
    with torch.no_grad():  # off adaLN-Zero's start, so that every block shapes the output
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x0, tokens, mask = latent_data(8)
    t = torch.rand(8)
    calls = []
    model.blocks[0].attn.register_forward_pre_hook(lambda *args: calls.append(1))  # recomputed inside the block

    def loss_and_gradients(checkpointing: bool):
        model.gradient_checkpointing = checkpointing
        model.zero_grad()
        calls.clear()
        loss = F.mse_loss(model(x0, t, TextEmbedding(tokens, mask)), x0)
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}, len(calls)

    (loss, grads, calls_plain), (loss_ac, grads_ac, calls_ac) = loss_and_gradients(False), loss_and_gradients(True)
    assert (calls_plain, calls_ac) == (1, 2)  # the block ran again in backward
    assert torch.equal(loss, loss_ac)
    for name in grads:  # measured: equal, bit for bit, on the CPU
        torch.testing.assert_close(grads_ac[name], grads[name], rtol=0, atol=1e-7)


def test_the_trainer_switches_activation_checkpointing_on(tmp_path):
    trainer = Trainer(DiT(TINY_DIT), diffusion_loss, latent_data(), config(tmp_path, activation_checkpointing=True))
    assert trainer.model.gradient_checkpointing and not trainer.ema_model.gradient_checkpointing
    with pytest.raises(ValueError, match="activation_checkpointing=True needs a model with a `gradient_check"):
        Trainer(mlp(), mse_loss, regression_data(), config(tmp_path, activation_checkpointing=True))


# ----------------------------------------------------------------------------- bad input
def test_bad_configs_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="steps must be >= 1.*schedule must be one of"):
        TrainerConfig(steps=0, schedule="linear")
    with pytest.raises(ValueError, match="not divisible by grad_accum_steps 3"):
        TrainerConfig(batch_size=8, grad_accum_steps=3)
    with pytest.raises(ValueError, match="mixed_precision must be one of"):
        TrainerConfig(mixed_precision="fp8")
    with pytest.raises(ValueError, match="checkpoint_every must be >= 1 or None"):
        TrainerConfig(checkpoint_every=0)
    with pytest.raises(ValueError, match="betas"):
        TrainerConfig(betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="num_workers must be >= 0"):
        TrainerConfig(num_workers=-1)
    with pytest.raises(ValueError, match="prefetch_factor.*needs num_workers >= 1"):
        TrainerConfig(prefetch_factor=4, num_workers=0)
    with pytest.raises(ValueError, match="pin_memory=True speeds up copies to a CUDA GPU"):
        Trainer(mlp(), mse_loss, regression_data(), config(tmp_path, pin_memory=True, device="cpu"))
    on_a_device = tuple(t.to("meta") for t in regression_data())  # as data moved to the GPU beforehand
    with pytest.raises(ValueError, match="on a GPU already.*use num_workers=0"):
        Trainer(mlp(), mse_loss, on_a_device, config(tmp_path, num_workers=2))
    with pytest.raises(ValueError, match="share their first dimension"):
        Trainer(mlp(), mse_loss, (torch.zeros(8, 4), torch.zeros(7, 2)), config(tmp_path))
    with pytest.raises(ValueError, match="does not fit"):
        Trainer(mlp(), mse_loss, regression_data(4), config(tmp_path))
    bad = Trainer(mlp(), lambda model, batch, gen: model(batch[0]), regression_data(), config(tmp_path))
    with pytest.raises(ValueError, match=r"scalar tensor.*\(8, 2\)"):
        bad.fit()

"""The Trainer under FSDP2 (parallelism="fsdp"): 2 CPU processes on the gloo backend, started as
torchrun would start them, training a tiny DiT (two blocks, so two FSDP units and the root).

(a) Two ranks with micro-batches of 4 take the same steps as one process accumulating the same two
    micro-batches of the global batch of 8 (the loss's noise and t are part of the data, so both see
    the same numbers), bit for bit in float32 as under DDP: FSDP's reduce-scatter computes
    (g0 + g1) / 2, the one process g0 / 2 + g1 / 2, and both are exact roundings of the same sum
    (the gradient norm, summed from the shards, differs in the last bits).
    With bf16 (the blocks' parameters gathered in bfloat16) the losses stay within BF16_LOSS of the
    float32 run's.
(b) Activation checkpointing gives the same losses, bit for bit (under DDP too).
(c) A run stopped at step 5 and resumed from its step-3 checkpoint, with fresh weights and RNGs,
    ends bit for bit where the uninterrupted run ends (loss history, every rank's shards of the
    weights, the EMA and the optimizer moments). Rank 1 does all of it seeing every folder of the
    run's checkpoints listed as empty, as a node whose listings lag the shared file system: shard
    files are named, never listed, and rank 0 says which checkpoints there are.
(d) The checkpoint folder holds trainer.json and one safetensors shard file per rank, each with
    half of every tensor: no full-model file, no pickle; their names are distributed.shard_file's.
    Rank 1 hashes the second shard file when loading; when it is damaged, both ranks skip that
    checkpoint for the previous one. A missing shard file is named.
(e) export_ema() on rank 0 is a plain CPU model equal to a one-process run's EMA, bit for bit;
    None on rank 1. sample_fn gets such a plain model on rank 0.
(f) A batch that the ranks do not divide is a clear error, under DDP and FSDP.
(g) Notebook 07's DiT options (adaLN-single, whose shared t_block is in the root shard; Integrator Neurons,
    inside the blocks) with activation checkpointing take the one-process steps too, bit for bit.
(h) Every architecture (DiT, MMDiT, UNet, tiny transformer) x {ddp, fsdp} x {fp32, bf16} x {activation
    checkpointing off, on}, 2 steps in one spawn of 2 ranks, against one process (TOLERANCES, measured);
    each architecture's FSDP units; under FSDP bf16, every checkpointed block recomputes from bfloat16
    inputs (the checkpoint sits inside the unit).
(i) Under gradient accumulation FSDP reduces once per step, with the same result as reducing each micro-batch.
(j) MoE experts (E = 1 on 2 ranks) are sharded on a dimension the ranks divide, and train as one process does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from tests.test_distributed import WORLD, spawn
from tests.test_trainer import assert_same_state
from tutorial_lib.models import dit as dit_module
from tutorial_lib.models.dit import DiT, DiTConfig
from tutorial_lib.models.mmdit import MMDiT, MMDiTConfig
from tutorial_lib.models.tiny_transformer import TinyTransformer, TinyTransformerConfig
from tutorial_lib.models.unet import UNet, UNetConfig
from tutorial_lib.text.base import TextEmbedding
from tutorial_lib.train import distributed
from tutorial_lib.train.checkpoint import CheckpointError, verify_checkpoint
from tutorial_lib.train.trainer import Trainer, TrainerConfig

TINY = DiTConfig(in_channels=2, input_size=(4, 4), patch_size=2, hidden_size=16, depth=2, num_heads=2,
                 text_dim=8, frequency_embedding_size=16)
TINY_OPTIONS = dataclasses.replace(TINY, adaln_single=True, integrator=True)  # (g)
# Measured over 6 steps: at most 4.8e-5 (only the blocks run in bfloat16, and their adaLN-Zero gates start at 0).
BF16_LOSS = 1e-3  # relative to the float32 run's losses


def data(n: int = 32):
    """(latents [n, 2, 4, 4], caption tokens [n, 3, 8], mask [n, 3], t [n], noise [n, 2, 4, 4])."""
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(n, 3, generator=g) < 0.7
    mask[:, 0] = True  # every caption has a token
    return (torch.randn(n, 2, 4, 4, generator=g), torch.randn(n, 3, 8, generator=g), mask,
            torch.rand(n, generator=g), torch.randn(n, 2, 4, 4, generator=g))


def tiny_dit(seed: int = 0) -> DiT:
    torch.manual_seed(seed)
    return DiT(TINY)


def x0_loss(model, x0, tokens, mask, t, noise):
    a, s = torch.cos(t * math.pi / 2)[:, None, None, None], torch.sin(t * math.pi / 2)[:, None, None, None]
    return F.mse_loss(model(a * x0 + s * noise, t, TextEmbedding(tokens, mask)).float(), x0)


def fixed_noise_loss(model, batch, generator):
    """t and the noise come with each example: any split of a batch over ranks sees the same numbers."""
    return x0_loss(model, *batch)


def drawn_noise_loss(model, batch, generator):
    """t and the noise drawn from each rank's generator: resume must restore every rank's stream."""
    x0, tokens, mask, _, _ = batch
    return x0_loss(model, x0, tokens, mask, torch.rand(len(x0), generator=generator),
                   torch.randn(x0.shape, generator=generator))


def run_config(out_dir: Path, **overrides) -> TrainerConfig:
    base = dict(steps=6, batch_size=8, lr=1e-2, warmup_steps=2, ema_decay=0.9, log_every=1, checkpoint_every=None,
                out_dir=str(out_dir), tensorboard=False, parallelism="fsdp")
    return TrainerConfig(**{**base, **overrides})


def local_shards(module) -> dict[str, torch.Tensor]:
    return {k: v.to_local() if isinstance(v, DTensor) else v for k, v in module.state_dict().items()}


@contextlib.contextmanager
def stale_listings(folder: Path):
    """In this process, list `folder` and every folder under it as empty (os.listdir and os.scandir, which
    pathlib's iterdir and glob and DCP's reader call), as on a node whose cached directory listings lag
    what other nodes wrote; a file looked up by its name is still found."""
    listdir, scandir, empty = os.listdir, os.scandir, folder.parent / "empty"
    empty.mkdir(exist_ok=True)

    def hidden(path) -> bool:
        return isinstance(path, (str, bytes, os.PathLike)) and Path(os.fsdecode(path)).absolute().is_relative_to(folder)

    os.listdir = lambda path=".": [] if hidden(path) else listdir(path)
    os.scandir = lambda path=".": scandir(empty if hidden(path) else path)
    try:
        yield
    finally:
        os.listdir, os.scandir = listdir, scandir


def _worker(rank: int, port: int, root: str):
    """One rank of every FSDP run; results to root/rank{rank}.json, whole tensors (rank 0) to safetensors."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    root, out = Path(root), {}
    try:
        samples = []

        def sample_fn(ema_model, step):
            samples.append([step, type(ema_model).__name__, ema_model.training,
                            any(isinstance(p, DTensor) for p in ema_model.parameters())])
            return torch.zeros(1, 1, 4, 4)

        # (a), (d), (e): float32, a checkpoint and a sample grid after step 6; each rank built other weights.
        fp32 = Trainer(tiny_dit(seed=rank), fixed_noise_loss, data(), run_config(root / "fp32", checkpoint_every=6,
                                                                                sample_every=6), sample_fn)
        out["fp32"] = fp32.fit()
        out["samples"] = samples
        out["units"] = [type(m).__name__ for m in distributed.fsdp_units(fp32.model)]
        out["sharded"] = all(isinstance(p, DTensor) for m in (fp32.model, fp32.ema.model) for p in m.parameters())
        weights = distributed.full_state_dict(fp32.model)  # a collective
        ema = fp32.export_ema()  # a collective
        out["export"] = None if ema is None else [type(ema).__name__, ema.training,
                                                  str(next(ema.parameters()).device)]
        if rank == 0:
            save_file(weights, root / "fp32_weights.safetensors")
            save_file(ema.state_dict(), root / "fp32_ema.safetensors")

        # (a) bf16, (b) activation checkpointing under FSDP and DDP.
        out["bf16"] = Trainer(tiny_dit(), fixed_noise_loss, data(),
                              run_config(root / "bf16", mixed_precision="bf16")).fit()
        out["ac_fsdp"] = Trainer(tiny_dit(), fixed_noise_loss, data(),
                                 run_config(root / "ac_fsdp", activation_checkpointing=True)).fit()
        out["ac_ddp"] = Trainer(tiny_dit(), fixed_noise_loss, data(),
                                run_config(root / "ac_ddp", activation_checkpointing=True, parallelism="ddp")).fit()
        torch.manual_seed(0)  # (g)
        options = Trainer(DiT(TINY_OPTIONS), fixed_noise_loss, data(),
                          run_config(root / "options", activation_checkpointing=True))
        out["options"] = options.fit()
        out["options_units"] = [type(m).__name__ for m in distributed.fsdp_units(options.model)]

        # (c) stopped in step 5, resumed from step 3's checkpoint; (c) and (d) with rank 1's listings stale.
        straight = Trainer(tiny_dit(), drawn_noise_loss, data(), run_config(root / "straight"))
        straight.fit()
        with stale_listings(root / "resumed") if rank == 1 else contextlib.nullcontext():

            def crash_in_step_5(model, batch, generator):
                if interrupted.step == 4:
                    raise KeyboardInterrupt
                return drawn_noise_loss(model, batch, generator)

            interrupted = Trainer(tiny_dit(), crash_in_step_5, data(), run_config(root / "resumed", checkpoint_every=3))
            try:
                interrupted.fit()
            except KeyboardInterrupt:
                pass
            resumed = Trainer(tiny_dit(seed=7), drawn_noise_loss, data(),
                              run_config(root / "resumed", checkpoint_every=3))
            out["resumed_from"] = resumed.load_checkpoint().name
            out["resume_same_history"] = resumed.fit() == straight.history
            assert_same_state(local_shards(resumed.model), local_shards(straight.model))
            assert_same_state(local_shards(resumed.ema.model), local_shards(straight.ema.model))
            moments = [(resumed.optimizer.state[a], straight.optimizer.state[b])
                       for a, b in zip(resumed.params, straight.params)]
            for a, b in moments:
                assert_same_state({k: v.to_local() if isinstance(v, DTensor) else v for k, v in a.items()},
                                  {k: v.to_local() if isinstance(v, DTensor) else v for k, v in b.items()})
            out["resume_same_state"] = True

            # (d) A damaged shard file: the rank that hashes it finds it, and every rank falls back.
            newest = root / "resumed" / "checkpoints" / "step_00000006" / "shard-00002-model-00001-of-00001.safetensors"
            if rank == 0:
                damaged = bytearray(newest.read_bytes())
                damaged[-3] ^= 0xFF
                newest.write_bytes(bytes(damaged))
            distributed.barrier(resumed.dist)
            fallback = Trainer(tiny_dit(), drawn_noise_loss, data(), run_config(root / "resumed", checkpoint_every=3))
            with contextlib.redirect_stderr(io.StringIO()) as messages:
                out["fallback"] = fallback.load_checkpoint().name
            out["fallback_message"] = messages.getvalue()
            out["stale_listing"] = sorted(os.listdir(root / "resumed" / "checkpoints"))

        # (f) 6 examples do not split into 2 micro-batches on each of 2 ranks.
        out["errors"] = {}
        for parallelism in ("ddp", "fsdp"):
            try:
                Trainer(tiny_dit(), fixed_noise_loss, data(),
                        run_config(root / "bad", batch_size=6, grad_accum_steps=2, parallelism=parallelism))
            except ValueError as err:
                out["errors"][parallelism] = str(err)
        (root / f"rank{rank}.json").write_text(json.dumps(out))
    finally:
        distributed.cleanup()


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("fsdp")
    spawn(_worker, (str(root),), seconds=240)
    return root, [json.loads((root / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Trainer:
    """The float32 run in one process ("fsdp" there is plain training), accumulating the same micro-batches."""
    trainer = Trainer(tiny_dit(), fixed_noise_loss, data(),
                      run_config(tmp_path_factory.mktemp("one"), grad_accum_steps=2))
    trainer.fit()
    return trainer


def losses(history: list[dict]) -> list[float]:
    return [r["loss"] for r in history]


def test_fsdp_units_are_the_blocks_wherever_the_model_holds_them():
    class Wrapper(nn.Module):  # as CaptionConditionedDiT holds its DiT
        def __init__(self):
            super().__init__()
            self.transformer = DiT(dataclasses.replace(TINY, mixer_depth=1))

    wrapper = Wrapper()
    dit = wrapper.transformer
    assert distributed.fsdp_units(wrapper) == [*dit.mixer, *dit.blocks]  # in the order they run
    assert distributed.fsdp_units(nn.Linear(2, 2)) == []


def test_fsdp_matches_one_process_on_the_same_global_batch(fsdp_run, one_process):
    root, (rank0, rank1) = fsdp_run
    assert not one_process.sharded and type(one_process.model) is DiT  # one process: plain training
    assert rank0["units"] == ["FSDPDiTBlock", "FSDPDiTBlock"] and rank0["sharded"]  # fully_shard renames classes
    assert rank0["fp32"] == rank1["fp32"]  # the scalars are averaged over ranks
    assert losses(rank0["fp32"]) == losses(one_process.history)
    # The norm of the sharded gradient sums the shards' squared norms: another order of float additions.
    norms = [[r["grad_norm"] for r in h] for h in (rank0["fp32"], one_process.history)]
    assert norms[0] == pytest.approx(norms[1], rel=1e-6)  # measured: 8.5e-8 (no clipping: all below 1)
    assert_same_state(load_file(root / "fp32_weights.safetensors"), one_process.model.state_dict())
    assert len(set(losses(rank0["fp32"]))) == 6  # it trains: no two steps alike


def test_bf16_stays_near_float32(fsdp_run):
    _, (rank0, _) = fsdp_run
    assert all(math.isfinite(x) for x in losses(rank0["bf16"]))
    assert losses(rank0["bf16"]) != losses(rank0["fp32"])  # bfloat16 did run
    assert losses(rank0["bf16"]) == pytest.approx(losses(rank0["fp32"]), rel=BF16_LOSS)


def test_activation_checkpointing_gives_the_same_losses(fsdp_run):
    _, (rank0, _) = fsdp_run
    assert losses(rank0["ac_fsdp"]) == losses(rank0["fp32"])
    assert losses(rank0["ac_ddp"]) == losses(rank0["fp32"])


def test_stopped_and_resumed_fsdp_run_ends_bit_for_bit_alike(fsdp_run):
    _, ranks = fsdp_run
    for out in ranks:
        assert out["resumed_from"] == "step_00000003"
        assert out["resume_same_history"] and out["resume_same_state"]


def test_checkpoint_is_one_shard_file_per_rank(fsdp_run):
    root, _ = fsdp_run
    step = root / "fp32" / "checkpoints" / "step_00000006"
    names = sorted(p.name for p in step.iterdir())
    shards = [f"shard-0000{r + 1}-model-00001-of-00001.safetensors" for r in range(WORLD)]
    assert names == [*shards, "trainer.json"]  # no model.safetensors, no pickled .metadata
    assert [distributed.shard_file(r) for r in range(WORLD)] == shards  # the names DCP writes, built
    meta = json.loads((step / "trainer.json").read_text())
    assert meta["kind"] == "sharded" and sorted(meta["files"]) == shards and len(meta["rng"]) == WORLD
    full = meta["shapes"]["blocks.0.mlp.0.weight"]  # [64, 16]
    for name in shards:
        with safe_open(str(step / name), framework="pt") as f:
            shape = f.get_slice("model.blocks.0.mlp.0.weight").get_shape()
            assert shape == [full[0] // WORLD, full[1]]
            assert {k.split(".")[0] for k in f.keys()} >= {"model", "ema"}
    assert (root / "fp32" / "checkpoints" / "latest").read_text() == "step_00000006\n"


def test_a_damaged_shard_file_is_skipped_by_every_rank(fsdp_run):
    _, (rank0, rank1) = fsdp_run
    assert rank0["fallback"] == rank1["fallback"] == "step_00000003"
    assert "step_00000006: another rank found it damaged" in rank0["fallback_message"]
    assert "00002-model-00001-of-00001.safetensors is damaged: its SHA-256 differs" in rank1["fallback_message"]


def test_rank_1_resumed_and_checkpointed_without_listing_a_folder(fsdp_run):
    _, (rank0, rank1) = fsdp_run
    assert rank1["stale_listing"] == [] and rank0["stale_listing"] == ["latest", "step_00000003", "step_00000006"]
    assert rank1["resumed_from"] == "step_00000003" and rank1["resume_same_state"]  # as test_stopped_and_resumed


def test_a_missing_shard_file_is_named(fsdp_run, tmp_path):
    root, _ = fsdp_run
    step = tmp_path / "step_00000006"
    shutil.copytree(root / "fp32" / "checkpoints" / step.name, step)
    assert verify_checkpoint(step)["kind"] == "sharded"
    (step / distributed.shard_file(1)).unlink()
    with pytest.raises(CheckpointError, match=r"not a checkpoint \(missing shard-00002-model-00001-of-00001"):
        verify_checkpoint(step)


def test_export_ema_is_a_plain_model_on_rank_0(fsdp_run, one_process):
    root, (rank0, rank1) = fsdp_run
    assert rank0["export"] == ["DiT", False, "cpu"] and rank1["export"] is None
    ema = load_file(root / "fp32_ema.safetensors")
    assert_same_state(ema, one_process.ema_model.state_dict())
    assert not torch.equal(ema["final_layer.linear.weight"], load_file(root / "fp32_weights.safetensors")[
        "final_layer.linear.weight"])  # an average, not the weights
    assert rank0["samples"] == [[6, "DiT", False, False]] and rank1["samples"] == []


def test_a_batch_the_ranks_do_not_divide_is_an_error(fsdp_run):
    _, (rank0, _) = fsdp_run
    for parallelism in ("ddp", "fsdp"):
        assert rank0["errors"][parallelism] == ("batch_size 6 is not divisible by grad_accum_steps x ranks = 2 x 2.")


def test_fsdp_configs_that_cannot_work_are_clear_errors():
    with pytest.raises(ValueError, match="parallelism must be one of"):
        TrainerConfig(parallelism="zero3")
    with pytest.raises(ValueError, match="'fsdp' takes mixed_precision 'bf16' or 'no', not 'fp16'"):
        TrainerConfig(parallelism="fsdp", mixed_precision="fp16")
    with pytest.raises(ValueError, match="posthoc_ema_sigma_rels is not supported with parallelism='fsdp'"):
        TrainerConfig(parallelism="fsdp", posthoc_ema_sigma_rels=(0.05,), posthoc_snapshot_every=2)


def test_notebook_07_options_take_the_one_process_steps(fsdp_run, tmp_path):
    _, (rank0, rank1) = fsdp_run
    torch.manual_seed(0)
    one = Trainer(DiT(TINY_OPTIONS), fixed_noise_loss, data(), run_config(tmp_path, grad_accum_steps=2))
    assert losses(rank0["options"]) == losses(one.fit()) and rank0["options"] == rank1["options"]
    assert rank0["options_units"] == ["FSDPDiTBlock", "FSDPDiTBlock"] and len(set(losses(rank0["options"]))) == 6


# ------------------------------------------------------------------------ every architecture x mode
# Each denoiser x {ddp, fsdp} x {fp32, bf16} x {activation checkpointing off, on}: 2 steps on 2 ranks (one
# spawn for all), against one process accumulating the same two micro-batches in the same precision
# (autocast bf16 there: FSDP's bf16 casts the weights of its units instead, so only a tolerance holds).
ARCHITECTURES = {
    "dit": lambda: DiT(TINY),
    "mmdit": lambda: MMDiT(MMDiTConfig(in_channels=2, input_size=(4, 4), hidden_size=16, depth=1,
                                       depth_single_blocks=1, num_heads=2, text_dim=8, frequency_embedding_size=16)),
    "unet": lambda: UNet(UNetConfig(in_channels=2, input_size=(4, 4), block_out_channels=(16, 32),
                                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=8,
                                    norm_num_groups=8, text_dim=8)),
    "tiny_transformer": lambda: TinyTransformer(TinyTransformerConfig(latent_channels=2, latent_size=4, dim=16,
                                                                      depth=2, heads=2, text_dim=8)),
}
MODES = [(parallelism, precision, ac) for parallelism in ("ddp", "fsdp") for precision in ("no", "bf16")
         for ac in (False, True)]
UNITS = {"dit": ["FSDPDiTBlock"] * 2, "mmdit": ["FSDPDoubleStreamBlock", "FSDPSingleStreamBlock"],
         "unet": ["FSDPDownBlock2D", "FSDPCrossAttnDownBlock2D", "FSDPUNetMidBlock2DCrossAttn",
                  "FSDPCrossAttnUpBlock2D", "FSDPUpBlock2D"],
         "tiny_transformer": ["FSDPBlock"] * 2}
# Measured (2 steps at lr 1e-2, rank 0 against one process; `python -m pytest tests/test_fsdp.py -s -k every`
# prints the table): DDP (float32, and bf16 under autocast on both sides) and float32 FSDP take the same losses,
# bit for bit; their weights are equal too but for float32 FSDP's, whose reduce-scatter adds the gradients in
# another order, by up to 5.6e-6 (the UNet's; AdamW divides tiny gradients by their own size). FSDP bf16 (the
# units' weights cast to bfloat16) against autocast bf16 (each op's inputs cast): losses within 6.3e-3 of each
# other (relative), the two steps' weight updates within 16% (|dw - dw_ref| / |dw_ref|, AdamW again: a
# gradient near 0 whose sign bfloat16 flips moves its weight by lr the other way).
TOLERANCES = {"no": (0.0, 1e-5, 1e-5), "bf16": (1e-2, None, 0.25)}  # (relative loss, weights, relative update)


def architecture(name: str) -> nn.Module:
    """A tiny `name` denoiser, seeded, its weights moved off their zero initialisation (adaLN-Zero, zeroed
    output layers) so that every block shapes the output and gets a gradient from the first step."""
    torch.manual_seed(0)
    model = ARCHITECTURES[name]()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def matrix_config(out_dir: Path, **overrides) -> TrainerConfig:
    return run_config(out_dir, **{"steps": 2, "warmup_steps": 0, **overrides})


def whole_weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    """The trained weights on rank 0's CPU ({} on rank 1 under FSDP): a collective under FSDP."""
    if trainer.sharded:
        return distributed.full_state_dict(trainer.model)
    return {k: v.detach().cpu().clone() for k, v in trainer.model.state_dict().items()}


def _matrix_worker(rank: int, port: int, root: str):
    """One rank of every (architecture, mode); results to root/matrix_rank{rank}.json, whole weights (rank 0) to
    root/KEY.safetensors."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    root, out = Path(root), {"losses": {}, "units": {}, "checkpoint_inputs": {}}
    recorded = []  # the dtypes of the tensors each checkpointed function received
    dit_module.checkpoint = recording(dit_module.checkpoint, recorded)
    try:
        for name in ARCHITECTURES:
            for parallelism, precision, ac in MODES:
                key = f"{name}-{parallelism}-{precision}-{'ac' if ac else 'plain'}"
                trainer = Trainer(architecture(name), fixed_noise_loss, data(),
                                  matrix_config(root / key, parallelism=parallelism, mixed_precision=precision,
                                                activation_checkpointing=ac))
                for m in trainer.model.modules():  # diffusers' blocks hold their checkpoint function
                    if getattr(m, "gradient_checkpointing", False) and hasattr(m, "_gradient_checkpointing_func"):
                        m._gradient_checkpointing_func = recording(m._gradient_checkpointing_func, recorded)
                recorded.clear()
                out["losses"][key] = losses(trainer.fit())
                out["checkpoint_inputs"][key] = sorted(set(recorded))
                if parallelism == "fsdp" and precision == "no" and not ac:
                    out["units"][name] = [type(m).__name__ for m in distributed.fsdp_units(trainer.model)]
                weights = whole_weights(trainer)
                if rank == 0:
                    save_file(weights, root / f"{key}.safetensors")

        # Gradient accumulation under FSDP: no gradient reaches the shards before the last micro-batch.
        seen = []

        def watching_loss(model, batch, generator):
            seen.append(any(p.grad is not None for p in model.parameters()))
            return fixed_noise_loss(model, batch, generator)

        trainer = Trainer(architecture("dit"), watching_loss, data(), matrix_config(root / "accum", grad_accum_steps=2))
        out["accum"], out["accum_grads_seen"] = losses(trainer.fit()), seen
        weights = whole_weights(trainer)
        if rank == 0:
            save_file(weights, root / "accum.safetensors")

        # Experts (E = 1) on 2 ranks: sharded on a dimension the ranks divide, no padding.
        trainer = Trainer(moe_dit(), fixed_noise_loss, data(), matrix_config(root / "moe"))
        experts = trainer.model.blocks[1].mlp.experts
        out["expert_placements"] = {k: [str(p) for p in v.placements] for k, v in experts.state_dict().items()}
        out["expert_local_shapes"] = {k: list(v.to_local().shape) for k, v in experts.state_dict().items()}
        out["moe"] = losses(trainer.fit())
        weights = whole_weights(trainer)
        if rank == 0:
            save_file(weights, root / "moe.safetensors")
        (root / f"matrix_rank{rank}.json").write_text(json.dumps(out))
    finally:
        distributed.cleanup()


def recording(checkpoint_fn, dtypes: list):
    """`checkpoint_fn`, noting the dtype of every floating-point tensor it is given (the block's inputs)."""
    def run(fn, *args, **kwargs):
        tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if torch.is_tensor(t)]
        dtypes.extend(str(t.dtype) for t in tensors if t.is_floating_point())
        return checkpoint_fn(fn, *args, **kwargs)
    return run


def moe_dit() -> DiT:
    torch.manual_seed(0)
    return DiT(dataclasses.replace(TINY, num_experts=1, capacity_factor=1.0))


@pytest.fixture(scope="module")
def matrix_run(tmp_path_factory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("matrix")
    spawn(_matrix_worker, (str(root),), seconds=300)
    return root, [json.loads((root / f"matrix_rank{r}.json").read_text()) for r in range(WORLD)]


def one_process_run(model: nn.Module, out_dir: Path, **overrides) -> tuple[list[float], dict]:
    trainer = Trainer(model, fixed_noise_loss, data(), matrix_config(out_dir, grad_accum_steps=2, **overrides))
    return losses(trainer.fit()), trainer.model.state_dict()


def update_difference(weights: dict, ref: dict, start: dict) -> float:
    """|dw - dw_ref| / |dw_ref| over all tensors: how far two runs' updates from the same `start` differ."""
    diff = sum((weights[k] - ref[k]).double().square().sum() for k in start)
    return (diff / sum((ref[k] - start[k]).double().square().sum() for k in start)).sqrt().item()


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_every_architecture_and_mode_matches_one_process(matrix_run, tmp_path):
    root, (rank0, rank1) = matrix_run
    assert rank0["losses"] == rank1["losses"]  # the scalars are averaged over ranks
    measured = {}
    for name in ARCHITECTURES:
        start = architecture(name).state_dict()
        one = {precision: one_process_run(architecture(name), tmp_path / f"{name}-{precision}",
                                          mixed_precision=precision) for precision in ("no", "bf16")}
        for parallelism, precision, ac in MODES:
            key = f"{name}-{parallelism}-{precision}-{'ac' if ac else 'plain'}"
            ref_losses, ref_weights = one[precision]
            got, weights = rank0["losses"][key], load_file(root / f"{key}.safetensors")
            loss_diff = max(abs(a - b) / abs(b) for a, b in zip(got, ref_losses))
            measured[key] = (loss_diff, max_difference(weights, ref_weights),
                             update_difference(weights, ref_weights, start))
    print("\n".join(f"{k}: loss {a:.2e} weights {b:.2e} update {c:.2e}" for k, (a, b, c) in measured.items()))
    for key, (loss_diff, weight_diff, update_diff) in measured.items():
        name, parallelism, precision, ac = key.split("-")
        if parallelism == "ddp" or precision == "no":  # the same losses, bit for bit
            assert loss_diff == 0, key
        if parallelism == "ddp":  # and the same weights
            assert weight_diff == 0, key
        loss_tol, weight_tol, update_tol = TOLERANCES[precision]
        assert loss_diff <= loss_tol and update_diff <= update_tol, (key, loss_diff, update_diff)
        assert weight_tol is None or weight_diff <= weight_tol, (key, weight_diff)
        if ac == "ac":  # recomputing changes nothing, bit for bit
            plain = key.replace("-ac", "-plain")
            assert rank0["losses"][key] == rank0["losses"][plain], key
            assert_same_state(load_file(root / f"{key}.safetensors"), load_file(root / f"{plain}.safetensors"))
    assert measured["unet-fsdp-bf16-plain"][0] > 0  # bfloat16 did run


def test_every_architecture_has_its_fsdp_units(matrix_run):
    _, (rank0, _) = matrix_run
    assert rank0["units"] == UNITS  # fully_shard renames classes; the UNet's down, mid and up blocks


def test_checkpointed_blocks_recompute_from_the_inputs_fsdp_cast(matrix_run):
    """The checkpoint sits inside each FSDP unit: under bf16 every block input it saves (and recomputes
    from) is bfloat16, on any torch version; a checkpoint around the unit would save float32 ones."""
    _, (rank0, _) = matrix_run
    inputs = rank0["checkpoint_inputs"]
    for name in ARCHITECTURES:
        assert inputs[f"{name}-fsdp-bf16-ac"] == ["torch.bfloat16"], name
        assert inputs[f"{name}-fsdp-no-ac"] == inputs[f"{name}-ddp-no-ac"] == ["torch.float32"], name
        assert inputs[f"{name}-fsdp-bf16-plain"] == [], name  # checkpointing off: no recompute


def test_fsdp_reduces_gradients_once_per_step_under_accumulation(matrix_run, tmp_path):
    root, (rank0, _) = matrix_run
    assert rank0["accum_grads_seen"] == [False, False] * 2  # no gradient on the shards before the last micro-batch
    one = Trainer(architecture("dit"), fixed_noise_loss, data(), matrix_config(tmp_path, grad_accum_steps=4))
    assert rank0["accum"] == losses(one.fit())
    # The same losses, bit for bit. The weights: each rank sums its 2 micro-batches' gradients and they are reduced
    # once, another order of float additions than one process's 4 micro-batches. Measured, |dw - dw_ref| / |dw_ref|:
    # 4.3e-4 (max |difference| 2.2e-4, where AdamW scales up a gradient near 0); reduced after each micro-batch
    # as before, 3.8e-4 (2.3e-4): the same result.
    weights = load_file(root / "accum.safetensors")
    assert update_difference(weights, one.model.state_dict(), architecture("dit").state_dict()) < 1e-3


def test_experts_are_sharded_on_a_dimension_the_ranks_divide(matrix_run, tmp_path):
    root, (rank0, _) = matrix_run
    # E = 1 expert on 2 ranks: w1 [1, 16, 64], b1 [1, 1, 64], w2 [1, 64, 16], b2 [1, 1, 16]
    assert rank0["expert_placements"] == {"w1": ["S(2)"], "b1": ["S(2)"], "w2": ["S(1)"], "b2": ["S(2)"]}  # Shard(d)
    assert rank0["expert_local_shapes"] == {"w1": [1, 16, 32], "b1": [1, 1, 32], "w2": [1, 32, 16], "b2": [1, 1, 8]}
    one = Trainer(moe_dit(), fixed_noise_loss, data(), matrix_config(tmp_path, grad_accum_steps=2))
    assert rank0["moe"] == losses(one.fit())
    weights = load_file(root / "moe.safetensors")
    assert update_difference(weights, one.model.state_dict(), moe_dit().state_dict()) < TOLERANCES["no"][2]


def test_expert_placement_avoids_padding_or_refuses():
    placement = distributed.expert_placement
    assert placement(nn.Parameter(torch.empty(8, 1152, 4608)), 8) is None  # dim 0, FSDP's default
    assert placement(nn.Parameter(torch.empty(8, 1152, 4608)), 16) == Shard(2)  # 8 experts, 16 ranks
    assert placement(nn.Parameter(torch.empty(8, 4608, 1152)), 16) == Shard(1)
    with pytest.raises(ValueError, match=r"shape \(1, 3, 5\) over 2 ranks without padding"):
        placement(nn.Parameter(torch.empty(1, 3, 5)), 2)

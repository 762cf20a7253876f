"""GPU efficiency, checked by structure on the CPU: no all-True attention mask reaches SDPA, the EMA is
one _foreach update over the trainable parameters, a training step never syncs with the host between
logging steps, every random draw of the loss is on the generator's (the trainer's) device, and
DataLoader workers are on by default on a GPU."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from tests.test_trainer import assert_same_state, config, mlp, mse_loss, regression_data
from tutorial_lib.cli import build_parser
from tutorial_lib.diffusion import losses, schedules
from tutorial_lib.models import masking
from tutorial_lib.models.dit import DiT, preset
from tutorial_lib.models.mmdit import MMDiT, MMDiTConfig
from tutorial_lib.text import clear_memory_cache
from tutorial_lib.text.base import TextEmbedding, padding_mask
from tutorial_lib.train import trainer as trainer_module
from tutorial_lib.train.ema import EMA
from tutorial_lib.train.records import record_loss_fn
from tutorial_lib.train.text_to_image import (Objective, TextToImageConfig, build, class_caption_rows,
                                              make_loss_fn)
from tutorial_lib.train.trainer import NonFiniteError, Trainer, TrainerConfig

TEXT_DIM = 16


# ----------------------------------------------------------------------------- attention masks
@pytest.fixture
def sdpa_masks(monkeypatch):
    """Every attn_mask that reaches F.scaled_dot_product_attention, in call order."""
    seen, sdpa = [], F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        seen.append(attn_mask)
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return seen


def denoisers():
    torch.manual_seed(0)
    return {"dit": DiT(preset("tiny", hidden_size=32, depth=2, num_heads=2, text_dim=TEXT_DIM)),
            "mmdit": MMDiT(MMDiTConfig(hidden_size=32, depth=1, depth_single_blocks=1, num_heads=2,
                                       text_dim=TEXT_DIM))}


@pytest.mark.parametrize("name", ["dit", "mmdit"])
def test_sdpa_gets_no_mask_without_padding_and_a_text_mask_with_it(name, sdpa_masks):
    model = denoisers()[name]
    for p in model.parameters():  # adaLN-Zero starts every block as the identity: make them compute
        nn.init.normal_(p, std=0.05)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, generator=g)
    tokens, full = torch.randn(2, 5, TEXT_DIM, generator=g), torch.ones(2, 5, dtype=torch.bool)
    with torch.no_grad():
        unmasked = model(x, t, TextEmbedding(tokens, None))
        assert len(sdpa_masks) > 0 and all(m is None for m in sdpa_masks)
        sdpa_masks.clear()
        masked = model(x, t, TextEmbedding(tokens, full))  # the old path: an all-True mask
        torch.testing.assert_close(unmasked, masked, rtol=1e-5, atol=1e-6)
        assert unmasked.abs().max() > 1e-2  # the blocks did compute something

        sdpa_masks.clear()
        padded = full.clone()
        padded[1, 3:] = False  # the second caption has 3 real tokens
        model(x, t, TextEmbedding(tokens, padded))
    masks = [m for m in sdpa_masks if m is not None]
    if name == "dit":  # self-attention unmasked; the cross-attention over the 5 caption keys masked
        assert len(masks) == len(sdpa_masks) // 2 and all(m.shape == (2, 1, 1, 5) for m in masks)
    else:  # joint attention: the caption's mask, then the 16 image keys, never masked
        assert len(masks) == len(sdpa_masks) == 2
        for m in masks:
            assert m.shape == (2, 1, 1, 5 + 16) and m[..., 5:].all()
            assert torch.equal(m[:, 0, 0, :5], padded)


def test_the_unet_gets_no_mask_without_padding(sdpa_masks):
    """diffusers' attention, through the same SDPA: encoder_attention_mask None stays None."""
    from tests.test_unet import inputs, randomize, text, tiny
    from tutorial_lib.models.unet import UNet

    model, (x, t), emb = randomize(UNet(tiny())), inputs(), text()
    with torch.no_grad():
        unmasked = model(x, t, TextEmbedding(emb.tokens, None))
        assert len(sdpa_masks) > 0 and all(m is None for m in sdpa_masks)
        torch.testing.assert_close(unmasked, model(x, t, TextEmbedding(emb.tokens, torch.ones_like(emb.mask))))


def test_padding_mask_is_decided_on_the_host():
    full = torch.ones(3, 4, dtype=torch.bool)
    assert padding_mask(full) is None
    padded = full.clone()
    padded[0, -1] = False
    assert padding_mask(padded) is padded
    on_a_device = full.to("meta")  # as a mask on a GPU: returned, not read (reading it would sync)
    assert padding_mask(on_a_device) is on_a_device


# ----------------------------------------------------------------------------- EMA
def test_ema_is_one_foreach_lerp_over_the_trainable_parameters(monkeypatch):
    model = mlp()
    model[0].requires_grad_(False)  # frozen, as the base weights under LoRA
    ema = EMA(model, decay=0.9)
    assert ema.model[0].weight is model[0].weight  # frozen: shared, not copied
    reference = [p.detach().clone() for p in ema.model.parameters()]
    with torch.no_grad():
        for p in model[2].parameters():
            p.add_(1.0)
    calls, lerp = [], torch._foreach_lerp_
    monkeypatch.setattr(torch, "_foreach_lerp_", lambda *a: calls.append(len(a[0])) or lerp(*a))
    frozen_before = [p.clone() for p in model[0].parameters()]
    ema.update(model)
    assert calls == [2]  # one call, over model[2]'s weight and bias
    for r, p, trained in zip(reference, model.parameters(), [False, False, True, True]):
        if trained:
            r.lerp_(p.detach(), 1 - 0.9)  # the old per-parameter update
    for r, e in zip(reference, ema.model.parameters()):
        assert torch.equal(r, e)
    assert all(torch.equal(a, b) for a, b in zip(frozen_before, ema.model[0].parameters()))


# ----------------------------------------------------------------------------- host syncs
SYNCS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


@pytest.fixture
def host_reads(monkeypatch):
    """Counts the Tensor methods that read a value on the host (each a sync with a GPU), once enabled."""
    count = {"on": False, "n": 0}
    for name in SYNCS:
        method = getattr(torch.Tensor, name)

        def counted(self, *args, _method=method, **kwargs):
            count["n"] += count["on"]
            return _method(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return count


@pytest.fixture
def fused_on_cpu(monkeypatch):
    """The CUDA path: the fused AdamW, which skips a non-finite step on the device."""
    monkeypatch.setattr(trainer_module, "FUSED_ADAMW", ("cuda", "cpu"))


@pytest.fixture
def frozen_encoder(tiny_text_encoder, tmp_path, monkeypatch):
    monkeypatch.setenv("TUTORIAL_DATA", str(tmp_path / "data"))  # the caption table's cache
    clear_memory_cache()
    yield tiny_text_encoder.freeze()
    clear_memory_cache()


@pytest.mark.parametrize("prediction, schedule, dit", [
    ("v", "cosine", "tiny-mixer"), ("eps", "scaled_linear", "tiny-mixer"), ("edm", "cosine", "tiny-mixer"),
    ("v", "cosine", "tiny-moe-mixer")])
def test_training_steps_do_not_sync_with_the_host(prediction, schedule, dit, tmp_path, frozen_encoder, fused_on_cpu,
                                                  host_reads):
    edm = dict(sigma_data=0.5) if prediction == "edm" else dict(t_distribution="logit_normal", schedule=schedule)
    objective = Objective(prediction=prediction, mask_ratio=0.5, offset_noise=0.1, input_perturbation=0.1, **edm)
    cfg = TextToImageConfig(model=preset(dit, hidden_size=32, depth=2, num_heads=2), objective=objective,
                            trainer=TrainerConfig(steps=4, batch_size=4, log_every=4, checkpoint_every=None,
                                                  out_dir=str(tmp_path / "run"), tensorboard=False, device="cpu"))
    model = build(cfg, frozen_encoder)
    assert model.padded  # the caption table has padding: the masked path runs
    data = torch.randn(16, 4, 8, 8), torch.arange(16) % 10
    trainer = Trainer(model, make_loss_fn(class_caption_rows(model), model.null_row, objective), data, cfg.trainer)
    assert trainer.fused and trainer.generator.device == trainer.device
    loader = iter(trainer._loader())
    batches = [next(loader) for _ in range(3)]  # the data order reads its indices on the host: not a step's
    host_reads["on"] = True
    for batch in batches:
        trainer._train_step(iter([batch]))
    assert host_reads["n"] == 0
    trainer._read_scalars()  # what a logging (or checkpoint) step does: one read of all three steps
    assert host_reads["n"] == 1
    assert trainer._pending["counts"]["loss"] == 3 and trainer._unread == []


@pytest.mark.parametrize("fused", [False, True])
def test_a_nonfinite_step_is_skipped_and_reported_at_the_next_read(fused, tmp_path, monkeypatch):
    if fused:
        monkeypatch.setattr(trainer_module, "FUSED_ADAMW", ("cuda", "cpu"))

    def loss_fn(model, batch, generator):
        loss = mse_loss(model, batch, generator)
        return loss * float("nan") if trainer.step == 2 else loss  # the 3rd step

    trainer = Trainer(mlp(), loss_fn, regression_data(), config(tmp_path, steps=8, log_every=4, checkpoint_every=2))
    assert trainer.fused == fused
    with pytest.raises(NonFiniteError, match=r"Step 3: the loss is nan.*seen at step 4.*step_00000002, is untouched"):
        trainer.fit()
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_00000002"]
    # Steps 3 and 4 were skipped: the weights are step 2's, as saved, all finite.
    saved = load_file(tmp_path / "checkpoints" / "step_00000002" / "model.safetensors")
    assert_same_state(saved, trainer.model.state_dict())
    assert all(torch.isfinite(p).all() for p in trainer.ema.model.parameters())
    # Caught, resumed and continued (past the bad step, which draws again): the updates run again.
    trainer.load_checkpoint()
    trainer.loss_fn = mse_loss
    trainer.fit()
    assert trainer.step == 8 and not torch.equal(saved["0.weight"], trainer.model.state_dict()["0.weight"])


# ----------------------------------------------------------------------------- draws on the device
@pytest.fixture
def draws(monkeypatch):
    """For every draw from a generator (torch.rand, randn, randint): whether it named the generator's device."""
    seen = []
    for name in ("rand", "randn", "randint"):
        draw = getattr(torch, name)

        def spy(*args, _draw=draw, **kwargs):
            if kwargs.get("generator") is not None:
                device = kwargs.get("device")
                seen.append(device is not None and torch.device(device) == kwargs["generator"].device)
            return _draw(*args, **kwargs)

        monkeypatch.setattr(torch, name, spy)
    return seen


@pytest.mark.parametrize("objective", [Objective(mask_ratio=0.5, offset_noise=0.1, input_perturbation=0.1),
                                       Objective(t_distribution="logit_normal", t_shift=2.0),
                                       Objective(t_distribution="beta"),
                                       Objective(prediction="edm", sigma_data=0.5, offset_noise=0.1)])
def test_the_loss_draws_noise_t_and_masks_on_the_generators_device(objective, draws, frozen_encoder):
    cfg = TextToImageConfig(model=preset("tiny-mixer", hidden_size=32, depth=1, num_heads=2), objective=objective)
    model = build(cfg, frozen_encoder)
    x0, y, g = torch.randn(4, 4, 8, 8), torch.arange(4), torch.Generator("cpu").manual_seed(0)
    make_loss_fn(class_caption_rows(model), model.null_row, objective)(model, (x0, y), g)
    table = model.text(torch.arange(4))
    batch = {"mean": x0, "std": torch.ones_like(x0), "tokens": table.tokens, "mask": table.mask}
    record_loss_fn(objective, model.null_text(1), posterior=True)(model, batch, g)
    assert len(draws) >= 4 and all(draws)


def test_a_seed_draws_what_it_drew_before_on_the_cpu():
    """Naming the device changes nothing on the CPU: the draws of the functions above, as torch's own."""
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert torch.equal(losses.sample_timesteps(5, "logit_normal", g()), torch.sigmoid(torch.randn(5, generator=g())))
    assert torch.equal(masking.random_keep(2, 8, 0.5, g()),
                       torch.rand(2, 8, generator=g()).argsort(dim=1)[:, :4].sort(dim=1).values)
    seed = int(torch.randint(0, 2**62, (1,), generator=g()))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        beta = torch.distributions.Beta(1.0, 2.5).sample((4,))
    assert torch.equal(schedules.sample_beta(4, 1.0, 2.5, g()), beta)


# ----------------------------------------------------------------------------- workers
def test_workers_are_on_by_default_on_a_gpu(monkeypatch, tmp_path):
    auto = TrainerConfig()
    assert auto.num_workers is None and build_parser().parse_args(["train"]).num_workers is None
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    cuda = torch.device("cuda", 0)
    for ranks, workers in ((None, 4), ("1", 4), ("8", 1), ("16", 0)):
        if ranks is None:
            monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        else:
            monkeypatch.setenv("LOCAL_WORLD_SIZE", ranks)
        assert auto.workers(cuda) == workers
    assert auto.workers(cuda, data_on_cpu=False) == 0  # data already on the GPU: indexed in place
    assert auto.workers(torch.device("cpu")) == 0 and TrainerConfig(num_workers=3).workers(torch.device("cpu")) == 3
    assert Trainer(mlp(), mse_loss, regression_data(), config(tmp_path)).num_workers == 0  # on the CPU

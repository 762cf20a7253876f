"""Post-hoc EMA (EDM2, Karras et al. 2024, arXiv 2312.02696, section 3 and appendix C) on tiny models,
on the CPU: the gamma <-> sigma_rel relation against the profile itself, tracked power-function EMAs
against a from-scratch loop, reconstruction from snapshots against EMAs tracked alongside, clear
errors for what the snapshots cannot give, and the Trainer: off by default, snapshots at the right
steps, bit-exact resume."""

from __future__ import annotations

import json
import math
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from tests.test_trainer import (RESUME_RUN, TINY_DIT, assert_same_state, config, diffusion_loss,
                                interrupt_at_step_7, latent_data, mlp, mse_loss, regression_data)
from tutorial_lib.models.dit import DiT
from tutorial_lib.train.ema import (GOLDEN, MAX_SIGMA_REL, PowerEMA, SnapshotError, fit_power_profiles,
                                    gamma_to_sigma_rel, load_snapshots, power_beta, power_profile,
                                    reconstruct_ema, reconstruct_emas, sigma_rel_to_gamma)
from tutorial_lib.train.checkpoint import POSTHOC_FILE, CheckpointError, verify_checkpoint
from tutorial_lib.train.trainer import Trainer, TrainerConfig


def bn_mlp(seed: int = 0) -> nn.Module:
    """A tiny MLP with BatchNorm, so that the averaged copies have buffers to share and to copy."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.GELU(), nn.Linear(16, 2))


def max_diff(a: dict, b: dict) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


# ----------------------------------------------------------------------------- gamma <-> sigma_rel
def test_gamma_and_sigma_rel_round_trip():
    for sigma_rel in (0.001, 0.01, 0.05, 0.1, 0.2, 0.28868, 0.3):
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(sigma_rel)) == pytest.approx(sigma_rel, rel=1e-12)
    for gamma in (-0.3, 0.0, 1.0, 6.94, 16.97, 1000.0):
        assert sigma_rel_to_gamma(gamma_to_sigma_rel(gamma)) == pytest.approx(gamma, rel=1e-9, abs=1e-9)
    # The paper's pair: sigma_rel 0.05 and 0.10 are gamma 16.97 and 6.94; gamma 0 is the plain average.
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.005)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.005)
    assert gamma_to_sigma_rel(0.0) == pytest.approx(1 / math.sqrt(12))  # uniform on [0, 1]
    # The widest profile, at gamma = GOLDEN - 2: both neighbours are narrower.
    assert gamma_to_sigma_rel(GOLDEN - 2) == pytest.approx(MAX_SIGMA_REL, rel=1e-12)
    assert max(gamma_to_sigma_rel(GOLDEN - 2 + d) for d in (-1e-3, 1e-3)) < MAX_SIGMA_REL
    for bad in (0.0, -0.1, MAX_SIGMA_REL, 0.35):
        with pytest.raises(ValueError, match="sigma_rel must be in"):
            sigma_rel_to_gamma(bad)
    with pytest.raises(ValueError, match="gamma > -1"):
        gamma_to_sigma_rel(-1.0)


def test_sigma_rel_is_the_width_of_the_averaging_profile():
    """Run the recursion theta_hat <- beta(t) theta_hat + (1 - beta(t)) theta(t) on theta(t) = t / T and
    (t / T)^2: the averages are the profile's first two moments of tau / T, so its relative standard
    deviation comes out of the EMA itself, with no formula for the profile."""
    steps = 20_000
    for gamma in (-0.3, 0.0, 2.0, 6.94, 16.97):
        mean = second = 0.0
        for t in range(1, steps + 1):
            beta = (1 - 1 / t) ** (gamma + 1)
            mean, second = beta * mean + (1 - beta) * t / steps, beta * second + (1 - beta) * (t / steps) ** 2
        assert math.sqrt(second - mean**2) == pytest.approx(gamma_to_sigma_rel(gamma), rel=1e-6)
    # The unrolled weights, p_t(tau), sum to 1 and start with beta(1) = 0 (the average starts at theta(1)).
    assert power_beta(1, 6.94) == 0.0
    assert power_profile(50, 6.94, np.arange(1, 60)).sum() == pytest.approx(1.0, abs=1e-12)
    assert power_profile(50, 6.94, np.arange(51, 60)).sum() == 0.0


# ----------------------------------------------------------------------------- tracking
def test_tracked_emas_equal_a_from_scratch_loop():
    model = bn_mlp()
    tracked = PowerEMA(model, (0.05, 0.10))
    # theta_hat(t) = beta(t) theta_hat(t-1) + (1 - beta(t)) theta(t), in float64, from the paper's formula.
    gammas = [sigma_rel_to_gamma(s) for s in (0.05, 0.10)]
    reference = [{n: p.detach().double().clone() for n, p in model.named_parameters()} for _ in gammas]
    thetas = []  # theta(t) for t = 1..T
    g = torch.Generator().manual_seed(0)
    for step in range(30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g))
        model(torch.randn(8, 4, generator=g))  # BatchNorm updates its running statistics
        tracked.update(model, step)
        thetas.append({n: p.detach().double().clone() for n, p in model.named_parameters()})
        for ref, gamma in zip(reference, gammas):
            beta = (1 - 1 / (step + 1)) ** (gamma + 1)
            for n, p in model.named_parameters():
                ref[n] = beta * ref[n] + (1 - beta) * p.detach().double()
    for average, ref, gamma in zip(tracked.models, reference, gammas):
        params = dict(average.named_parameters())
        assert max_diff(params, ref) < 1e-5  # float32 lerp vs float64
        # ... and equal sum_tau p_T(tau) theta(tau), the profile that reconstruction fits.
        weights = power_profile(30, gamma, np.arange(1, 31))
        unrolled = {n: sum(w * theta[n] for w, theta in zip(weights, thetas)) for n in ref}
        assert max_diff(params, unrolled) < 1e-5
        # Buffers are the live model's own tensors, not copies.
        assert average[1].running_mean is model[1].running_mean
        assert not any(p.requires_grad for p in average.parameters()) and not average.training
    assert max_diff(dict(tracked.models[0].named_parameters()), dict(tracked.models[1].named_parameters())) > 0.1

    state = tracked.state_dict()
    assert set(state) == {f"{i}.{n}" for i in (0, 1) for n, _ in model.named_parameters()}
    fresh = PowerEMA(bn_mlp(seed=1), (0.05, 0.10))
    fresh.load_state_dict({k: v.clone() for k, v in state.items()})
    assert_same_state(fresh.state_dict(), state)
    with pytest.raises(ValueError, match="distinct"):
        PowerEMA(model, (0.1, 0.1))


# ----------------------------------------------------------------------------- reconstruction
STEPS, EVERY = 60, 5
TRUTH = (0.075, 0.15)  # tracked alongside, never saved: what reconstruction must find


@pytest.fixture(scope="module")
def snapshot_run(tmp_path_factory):
    """A tiny model trained 60 steps with snapshots of sigma_rel 0.05 and 0.10 every 5 steps (24 files),
    and power-function EMAs of TRUTH tracked alongside: (folder, live model, tracked, truth)."""
    folder = tmp_path_factory.mktemp("snapshots")
    model = bn_mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tracked, truth = PowerEMA(model, (0.05, 0.10)), PowerEMA(model, TRUTH)
    x, y = regression_data(64)
    g = torch.Generator().manual_seed(0)
    for step in range(STEPS):
        i = torch.randint(len(x), (8,), generator=g)
        loss = F.mse_loss(model(x[i]), y[i])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        tracked.update(model, step)
        truth.update(model, step)
        if (step + 1) % EVERY == 0:
            tracked.save_snapshots(folder, step + 1, EVERY)
    return folder, model, tracked, truth


def test_reconstruction_matches_tracked_emas(snapshot_run):
    folder, model, tracked, truth = snapshot_run
    snapshots = load_snapshots(folder)
    assert [(s.step, s.sigma_rel) for s in snapshots[:3]] == [(5, 0.05), (5, 0.1), (10, 0.05)]
    results = reconstruct_emas(snapshots, (0.05, 0.10, *TRUTH))

    # A tracked sigma_rel is its own last snapshot: coefficient 1 there, 0 elsewhere, the same weights.
    for r, average in zip(results[:2], tracked.models):
        assert r.residual < 1e-6 and r.step == STEPS
        one_hot = [float(s.step == STEPS and s.sigma_rel == r.sigma_rel) for s in r.snapshots]
        np.testing.assert_allclose(r.coefficients, one_hot, atol=1e-9)
        assert max_diff(r.state_dict, average.state_dict()) < 1e-6

    # Between and beyond the tracked ones. Measured (seeds 0-5 of this setup): profile residuals 0.0054
    # and 0.014; the weights off by at most 2.7e-4 and 1.34e-3, which is 2.5-3.5% and 5-8% of the
    # distance from the true EMA to the nearest tracked one. Tolerances: about twice the error, and
    # 10 times nearer than any tracked EMA.
    for r, average, residual, tolerance in zip(results[2:], truth.models, (0.0054, 0.014), (5e-4, 2.5e-3)):
        assert r.residual == pytest.approx(residual, abs=5e-4)
        params = dict(average.named_parameters())
        error = max_diff({n: r.state_dict[n] for n in params}, params)
        nearest = min(max_diff(dict(t.named_parameters()), params) for t in tracked.models)
        assert error < tolerance and error < 0.1 * nearest, (r.sigma_rel, error, nearest)
        assert r.coefficients.sum() == pytest.approx(1.0, abs=0.01)

    # Buffers come from the last snapshot (the live model's), and the result loads into the model.
    final = results[2].state_dict
    assert torch.equal(final["1.running_mean"], model[1].running_mean)
    assert final["1.num_batches_tracked"].dtype == torch.int64
    bn_mlp(seed=2).load_state_dict(final)
    # One target alone, from the folder, gives the same as in the sweep.
    alone = reconstruct_ema(folder, TRUTH[0])
    assert_same_state(alone.state_dict, results[2].state_dict)


def test_fit_recovers_a_profile_it_contains():
    """Targets that are snapshots fit exactly; a profile the snapshots lack leaves a residual."""
    x, residuals = fit_power_profiles([10, 20, 20], [6.94, 6.94, 16.97], 20, [16.97, 6.94, 1.0])
    np.testing.assert_allclose(x[:2], [[0, 0, 1], [0, 1, 0]], atol=1e-9)
    assert residuals[0] < 1e-6 and residuals[1] < 1e-6 and residuals[2] > 0.1
    with pytest.raises(ValueError, match="steps <= the target"):
        fit_power_profiles([10, 30], [6.94, 6.94], 20, [6.94])


def test_what_the_snapshots_cannot_give_is_a_clear_error(snapshot_run):
    folder = snapshot_run[0]
    # Narrower than anything tracked: its profile lies within the last few steps, between snapshots.
    with pytest.raises(ValueError, match=r"Cannot reconstruct sigma_rel 0.02 \(residual 0.1.*max_residual = 0.05"):
        reconstruct_ema(folder, 0.02)
    with pytest.raises(ValueError, match="sigma_rel must be in"):
        reconstruct_ema(folder, 0.35)
    with pytest.raises(ValueError, match="Cannot reconstruct sigma_rel 0.075 .* at step 33"):
        reconstruct_ema(folder, 0.075, step=33)  # snapshots at 30 and 35: the steps 31..33 are unknown
    with pytest.raises(ValueError, match=r"step 61 is outside the snapshots' steps 5..60"):
        reconstruct_ema(folder, 0.075, step=61)
    assert reconstruct_ema(folder, 0.02, max_residual=0.2).residual > 0.05  # on request, the best it can


def test_missing_and_damaged_snapshots_are_named(snapshot_run, tmp_path):
    for f in snapshot_run[0].iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    gone = tmp_path / "step_00000030_sigma_rel_0.1.safetensors"
    gone.unlink()
    with pytest.raises(SnapshotError, match="lacks step_00000030_sigma_rel_0.1.safetensors .*allow_gaps=True"):
        reconstruct_ema(tmp_path, 0.075)
    assert len(load_snapshots(tmp_path, allow_gaps=True)) == 23
    damaged = tmp_path / "step_00000060_sigma_rel_0.05.safetensors"
    os.truncate(damaged, damaged.stat().st_size - 8)
    with pytest.raises(SnapshotError, match=f"{re.escape(str(damaged))} is not a readable post-hoc EMA snapshot"):
        load_snapshots(tmp_path, allow_gaps=True)
    other = PowerEMA(nn.Linear(4, 2), (0.05, 0.10))
    other.save_snapshots(tmp_path / "mixed", 5, 5)
    bn = PowerEMA(bn_mlp(), (0.05, 0.10))
    bn.save_snapshots(tmp_path / "mixed", 10, 5)
    with pytest.raises(SnapshotError, match="differs from .* in shapes: snapshots of different runs"):
        load_snapshots(tmp_path / "mixed")
    with pytest.raises(SnapshotError, match="No post-hoc EMA snapshots in"):
        load_snapshots(tmp_path / "empty")


# ----------------------------------------------------------------------------- the Trainer
def test_trainer_posthoc_ema_is_off_by_default(tmp_path):
    trainer = Trainer(mlp(), mse_loss, regression_data(), config(tmp_path, steps=2, checkpoint_every=2))
    trainer.fit()
    assert trainer.posthoc_ema is None and not (tmp_path / "posthoc_ema").exists()
    step = tmp_path / "checkpoints" / "step_00000002"
    assert sorted(p.name for p in step.iterdir()) == ["ema.safetensors", "model.safetensors",
                                                      "optimizer.safetensors", "trainer.json"]
    with pytest.raises(ValueError, match="posthoc_ema_sigma_rels and posthoc_snapshot_every go together"):
        TrainerConfig(posthoc_ema_sigma_rels=(0.05, 0.1))
    with pytest.raises(ValueError, match="posthoc_ema_sigma_rels must be distinct numbers in"):
        TrainerConfig(posthoc_ema_sigma_rels=(0.05, 0.4), posthoc_snapshot_every=10)
    with pytest.raises(ValueError, match="posthoc_snapshot_every must be >= 1"):
        TrainerConfig(posthoc_ema_sigma_rels=[0.05], posthoc_snapshot_every=0)


def test_trainer_writes_snapshots_at_the_right_steps(tmp_path):
    cfg = config(tmp_path, steps=7, checkpoint_every=4, posthoc_ema_sigma_rels=[0.05, 0.1], posthoc_snapshot_every=3)
    assert cfg.posthoc_ema_sigma_rels == (0.05, 0.1)
    trainer = Trainer(mlp(), mse_loss, regression_data(), cfg)
    trainer.fit()
    names = sorted(p.name for p in (tmp_path / "posthoc_ema").iterdir())
    assert names == [f"step_{s:08d}_sigma_rel_{r}.safetensors" for s in (3, 6, 7) for r in (0.05, 0.1)]
    for sigma_rel, gamma, model in zip((0.05, 0.1), trainer.posthoc_ema.gammas, trainer.posthoc_ema.models):
        path = tmp_path / "posthoc_ema" / f"step_00000007_sigma_rel_{sigma_rel}.safetensors"
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["posthoc_ema"])
        assert (meta["step"], meta["sigma_rel"], meta["gamma"], meta["snapshot_every"]) == (7, sigma_rel, gamma, 3)
        assert_same_state(load_file(path), model.state_dict())
    # The checkpoint holds the tracked EMAs, recorded (size, SHA-256) with the other tensor files.
    step = tmp_path / "checkpoints" / "step_00000007"
    assert POSTHOC_FILE in verify_checkpoint(step)["files"]
    assert_same_state(load_file(step / POSTHOC_FILE), trainer.posthoc_ema.state_dict())
    assert [s.step for s in load_snapshots(tmp_path / "posthoc_ema")] == [3, 3, 6, 6, 7, 7]

    # A lost posthoc_ema.safetensors makes its checkpoint damaged: resume falls back to the previous one.
    (step / POSTHOC_FILE).unlink()
    with pytest.raises(CheckpointError, match=r"not a checkpoint \(missing posthoc_ema.safetensors\)"):
        verify_checkpoint(step)
    assert Trainer(mlp(seed=3), mse_loss, regression_data(), cfg).load_checkpoint().name == "step_00000004"


def test_trainer_resume_is_bit_exact_with_posthoc_ema(tmp_path):
    """As test_trainer.py's test_resume_is_bit_exact, tracking sigma_rel 0.05 and 0.10 with snapshots every
    3 steps: stopped at step 7 (last checkpoint: step 4, snapshots of steps 3 and 6 written) and resumed,
    the run ends with the same tracked EMAs, and the same snapshot files, none missing or doubled."""
    data = latent_data()
    cfg = dict(RESUME_RUN, posthoc_ema_sigma_rels=(0.05, 0.1), posthoc_snapshot_every=3)
    torch.manual_seed(0)
    straight = Trainer(DiT(TINY_DIT), diffusion_loss, data, config(tmp_path / "a", **cfg))
    straight.fit()
    interrupt_at_step_7(tmp_path / "b", **cfg)
    snapshots = tmp_path / "b" / "posthoc_ema"
    assert sorted(p.name[:13] for p in snapshots.iterdir()) == ["step_00000003"] * 2 + ["step_00000006"] * 2
    (snapshots / ".step_00000007_sigma_rel_0.1.safetensors.x1y2.tmp").write_bytes(b"torn")  # a killed write

    torch.manual_seed(1)  # other initial weights and RNG: the checkpoint must restore everything
    resumed = Trainer(DiT(TINY_DIT), diffusion_loss, data, config(tmp_path / "b", **cfg))
    assert resumed.load_checkpoint().name == "step_00000004"
    resumed.fit()
    assert_same_state(resumed.posthoc_ema.state_dict(), straight.posthoc_ema.state_dict())
    assert_same_state(resumed.ema_model.state_dict(), straight.ema_model.state_dict())
    assert_same_state(resumed.model.state_dict(), straight.model.state_dict())
    files = {p.name: p.read_bytes() for p in (tmp_path / "a" / "posthoc_ema").iterdir()}
    assert {p.name: p.read_bytes() for p in snapshots.iterdir()} == files  # the torn file is gone too
    assert sorted({name[:13] for name in files}) == [f"step_{s:08d}" for s in (3, 6, 9, 10)]
    last = "checkpoints/step_00000010/" + POSTHOC_FILE
    assert (tmp_path / "b" / last).read_bytes() == (tmp_path / "a" / last).read_bytes()
    # The tracked EMAs really differ from each other and from the classic EMA.
    a, b = (dict(m.named_parameters()) for m in straight.posthoc_ema.models)
    assert not torch.equal(a["x_embedder.weight"], b["x_embedder.weight"])


def test_resume_refuses_another_posthoc_setting(tmp_path):
    on = dict(posthoc_ema_sigma_rels=(0.05, 0.1), posthoc_snapshot_every=2)
    Trainer(mlp(), mse_loss, regression_data(), config(tmp_path / "off", steps=2, checkpoint_every=2)).fit()
    with pytest.raises(CheckpointError, match=r"written with .* = \(None, None\).*cannot start or change mid-run"):
        Trainer(mlp(), mse_loss, regression_data(), config(tmp_path / "off", **on)).load_checkpoint()
    Trainer(mlp(), mse_loss, regression_data(), config(tmp_path / "on", steps=2, checkpoint_every=2, **on)).fit()
    other = {**on, "posthoc_ema_sigma_rels": (0.05, 0.2)}
    with pytest.raises(CheckpointError, match=r"\(\(0.05, 0.1\), 2\) and this run has \(\(0.05, 0.2\), 2\)"):
        Trainer(mlp(), mse_loss, regression_data(), config(tmp_path / "on", **other)).load_checkpoint()
    # Turning it off is allowed: the tracked EMAs are then left in the checkpoint.
    plain = Trainer(mlp(), mse_loss, regression_data(), config(tmp_path / "on", steps=4))
    assert plain.load_checkpoint().name == "step_00000002"


# ----------------------------------------------------------------------------- the posthoc-ema command
@pytest.fixture(scope="module")
def dit_run(tmp_path_factory):
    """`train --model dit` on the CLI: a tiny DiT with a learned word encoder, 8 steps on random latents,
    tracking sigma_rel 0.05 and 0.10 with snapshots at steps 4 and 8, which give sigma_rel 0.075 (residual 0.02)
    but not 0.28 (0.55). The pipeline folder (snapshots in run/posthoc_ema)."""
    import tutorial_lib.data.latents
    from tests.test_text_to_image import config
    from tutorial_lib.cli import main

    tmp = tmp_path_factory.mktemp("dit_run")
    out = tmp / "pipe"
    data = torch.randn(32, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(32) % 10

    class FakeCache:
        def tensors(self, split="train"):
            return data

    cfg = config(out, "run", steps=8, lr=0.1, warmup_steps=1, posthoc_ema_sigma_rels=(0.05, 0.1),
                 posthoc_snapshot_every=4)
    (tmp / "config.json").write_text(json.dumps(cfg.to_dict()))
    with pytest.MonkeyPatch.context() as m:
        m.setattr(tutorial_lib.data.latents, "latent_cache", lambda: FakeCache())
        main(["train", "--model", "dit", "--config", str(tmp / "config.json"), "--out", str(out), "--device", "cpu"])
    return out


def pipeline_state(pipe) -> dict:
    """The pipeline's averaged weights keyed as the trained model's (and the snapshots')."""
    return {**{f"transformer.{k}": v for k, v in pipe.transformer.state_dict().items()},
            **{f"text_encoder.{k}": v for k, v in pipe.text_encoder.state_dict().items()}}


def test_cli_saves_a_reconstructed_ema_as_a_pipeline(dit_run, tmp_path, capsys):
    """posthoc-ema --out: the saved pipeline holds the reconstruction (transformer and learned text encoder),
    not the stored fixed EMA, and its record keeps the training command beside this one."""
    from tutorial_lib.cli import main
    from tutorial_lib.pipeline import TextToImagePipeline

    out = tmp_path / "posthoc"
    main(["posthoc-ema", "--model", str(dit_run), "--sigma-rels", "0.1", "--out", str(out), "--device", "cpu"])
    record = json.loads(capsys.readouterr().out.split("\n[posthoc-ema]")[0])
    folder = dit_run / "run" / "posthoc_ema"
    expected = reconstruct_ema(folder, 0.1)
    assert (record["step"], record["tracked_sigma_rels"], record["snapshots"]) == (8, [0.05, 0.1], str(folder))
    assert record["sigma_rels"]["0.1"] == {"gamma": expected.gamma, "residual": expected.residual}
    assert "stored" not in record and record["saved"]["out"] == str(out)

    saved, stored = TextToImagePipeline.from_pretrained(out), TextToImagePipeline.from_pretrained(dit_run)
    assert_same_state(pipeline_state(saved), expected.state_dict)
    assert not torch.equal(saved.transformer.x_embedder.weight, stored.transformer.x_embedder.weight)
    assert {k: saved.config[k] for k in ("prediction", "schedule", "sampler")} == \
        {k: stored.config[k] for k in ("prediction", "schedule", "sampler")}
    info, source = TextToImagePipeline.training_info(out), TextToImagePipeline.training_info(dit_run)
    assert {k: v for k, v in info.items() if k != "posthoc_ema"} == source  # the train command and config kept
    assert info["posthoc_ema"] == {"sigma_rel": 0.1, "step": 8, "snapshots": str(folder),
                                   "command": "python -m tutorial_lib posthoc-ema --model " + str(dit_run)
                                   + f" --sigma-rels 0.1 --out {out} --device cpu"}


def test_cli_evaluates_a_sweep_beside_the_stored_ema_and_saves_the_best(dit_run, tmp_path, capsys):
    """--evaluate: metrics of the stored EMA and of each reconstruction, on the noise `evaluate` draws; with
    --out, the pipeline of the lowest class-prompt FID, recorded as chosen by the sweep."""
    from tutorial_lib.cli import main
    from tutorial_lib.pipeline import TextToImagePipeline

    few = ["--prompts", "class", "--per-prompt", "1", "--inference-steps", "2", "--device", "cpu"]
    out, path = tmp_path / "best", tmp_path / "sweep.json"
    main(["posthoc-ema", "--model", str(dit_run), "--sigma-rels", "0.05,0.075,0.1", "--evaluate", *few,
          "--out", str(out), "--json", str(path)])
    record = json.loads(path.read_text())
    assert record == json.loads(capsys.readouterr().out.split("\n[posthoc-ema]")[0])
    assert list(record["sigma_rels"]) == ["0.05", "0.075", "0.1"]
    assert record["sampling"] == {"prompts": "class", "per_prompt": 1, "inference_steps": 2, "guidance_scale": 3.0,
                                  "seed": 0}
    metrics = {s: r["metrics"]["class"] for s, r in record["sigma_rels"].items()}
    for m in (record["stored"]["class"], *metrics.values()):
        assert m["n"] == 10 and {"class_accuracy", "fid", "fid_reals_baseline"} <= m.keys()
    assert len({m["fid"] for m in (record["stored"]["class"], *metrics.values())}) == 4  # the choice means something
    best = min(metrics, key=lambda s: metrics[s]["fid"])
    assert record["saved"]["sigma_rel"] == float(best) and "lowest class-prompt FID" in record["saved"]["chosen_by"]
    assert TextToImagePipeline.training_info(out)["posthoc_ema"] == {k: v for k, v in record["saved"].items()
                                                                       if k != "out"}
    assert_same_state(pipeline_state(TextToImagePipeline.from_pretrained(out)),
                      reconstruct_ema(dit_run / "run" / "posthoc_ema", float(best)).state_dict)

    # "stored" is the source pipeline as `evaluate` measures it, and the saved one measures as its sweep entry.
    for model, expected in ((dit_run, record["stored"]), (out, {"class": metrics[best]})):
        main(["evaluate", "--model", str(model), *few])
        assert json.loads(capsys.readouterr().out.split("\n[evaluate]")[0]) == expected


def test_cli_posthoc_ema_errors(dit_run, snapshot_run, tmp_path):
    from tutorial_lib.cli import main
    from tutorial_lib.weights import WeightsError

    model, out = ["--model", str(dit_run), "--device", "cpu"], tmp_path / "out"
    with pytest.raises(SnapshotError, match="No post-hoc EMA snapshots folder .*nowhere: train with "
                       "`train --model dit --posthoc-ema 0.05,0.10 --posthoc-snapshot-every N`"):
        main(["posthoc-ema", *model, "--sigma-rels", "0.1", "--snapshots", str(tmp_path / "nowhere")])
    with pytest.raises(ValueError, match=r"--out saves one pipeline: give one --sigma-rels, or add --evaluate"):
        main(["posthoc-ema", *model, "--sigma-rels", "0.05,0.1", "--out", str(out)])
    with pytest.raises(ValueError, match=r"Cannot reconstruct sigma_rel 0.28 \(residual"):
        main(["posthoc-ema", *model, "--sigma-rels", "0.1,0.28"])
    with pytest.raises(ValueError, match="sigma_rel must be in"):
        main(["posthoc-ema", *model, "--sigma-rels", "0.5"])
    with pytest.raises(ValueError, match="is the source pipeline"):
        main(["posthoc-ema", *model, "--sigma-rels", "0.1", "--out", str(dit_run)])
    # Snapshots of another model (the MLP's) are refused by name, never loaded.
    with pytest.raises(WeightsError, match=rf"The snapshots in {snapshot_run[0]} do not fit the pipeline in "
                       rf"{dit_run} .*missing \['text_encoder\..*unexpected \['0\.bias'"):
        main(["posthoc-ema", *model, "--sigma-rels", "0.1", "--snapshots", str(snapshot_run[0]), "--out", str(out)])
    assert not out.exists()

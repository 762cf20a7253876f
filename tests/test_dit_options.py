"""Notebook 07's DiT options: adaLN-single (PixArt-alpha) and Integrator Neurons. Initialisation, bit
identity with the options off, a numerical cross-check of adaLN-single against adaLN-Zero, parameters and
FLOPs against the model and FlopCounterMode, the gates, save/load (weights, both pipeline loaders, the CLI)
and bad input (FSDP: tests/test_fsdp.py). Tiny widths, CPU."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from tests.denoisers import fit_losses, inputs, randomize
from tests.test_dit import half_precision_gap, text, tiny
from tutorial_lib.models.dit import PRESETS, DiT, DiTConfig, dit_cost
from tutorial_lib.models.integrator import IntegratorNeurons, compute_fractions
from tutorial_lib.weights import load_model, save_weights

OPTIONS = {
    "single": dict(adaln_single=True),
    "integrator": dict(integrator=True),
    "both": dict(adaln_single=True, integrator=True, integrator_iterations=3, mixer_depth=1),
}


def test_presets_are_tiny_with_one_option():
    tiny_fields = dataclasses.asdict(PRESETS["tiny"])
    assert dataclasses.asdict(PRESETS["tiny-single"]) == {**tiny_fields, "adaln_single": True}
    assert dataclasses.asdict(PRESETS["tiny-integrator"]) == {**tiny_fields, "integrator": True}
    assert PRESETS["tiny"].integrator_iterations == 2  # T, used once integrator=True


# ----------------------------------------------------------------------------- options off, and at init
def test_options_off_build_the_same_model():
    """With the options off, their other fields change nothing (the same parameters from the same random
    draws), and the parameters are those of the shipped weights, saved before the options existed."""
    from safetensors import safe_open

    from tutorial_lib.weights import COMPONENT_WEIGHTS, asset

    torch.manual_seed(0)
    plain = DiT(tiny())
    after_plain = torch.get_rng_state()
    torch.manual_seed(0)
    off = DiT(tiny(integrator_iterations=5, integrator_mlp_ratio=3.0))
    assert torch.equal(torch.get_rng_state(), after_plain)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), off.state_dict().values()))
    with safe_open(asset("dit_t2i") / "transformer" / COMPONENT_WEIGHTS, "pt") as shipped:
        assert set(shipped.keys()) == set(DiT(DiTConfig(text_dim=384)).state_dict())


@pytest.mark.parametrize("option", list(OPTIONS))
def test_fresh_model_outputs_zeros_and_learns(option):
    """The final linear map is zeroed, so F = 0: the parametrization's identity. Gradients still reach the
    tables and the Integrators, and a few Adam steps fit a batch."""
    torch.manual_seed(0)
    model = DiT(tiny(**OPTIONS[option]))
    x, t = inputs()
    with torch.no_grad():
        assert torch.equal(model(x, t, text()), torch.zeros_like(x))
    losses = fit_losses(model, text(), 25, 3e-3)
    assert losses[-1] < 0.6 * losses[0]
    trained = [p for name, p in model.named_parameters() if "scale_shift_table" in name or "integrator" in name]
    assert trained and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)


def test_fresh_integrator_is_the_identity():
    """Its refinement's output layer is zeroed: an integrator DiT carrying a plain DiT's (trained) weights
    computes the plain DiT's output bit for bit (h + g * 0 = h), until the Integrators are trained."""
    torch.manual_seed(0)
    plain = randomize(DiT(tiny()))
    with_integrator = DiT(tiny(integrator=True)).eval()
    missing, unexpected = with_integrator.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(".integrator." in k for k in missing)
    x, t = inputs()
    with torch.no_grad():
        assert torch.equal(with_integrator(x, t, text()), plain(x, t, text()))
        randomize(with_integrator, seed=1)
        assert not torch.allclose(with_integrator(x, t, text()), plain(x, t, text()))


def test_adaln_single_is_adaln_zero_with_one_shared_mlp():
    """Numerical cross-check: a block's modulation t_block(c) + table equals adaLN-Zero's Linear(SiLU(c))
    with t_block's weight and t_block's bias + the flattened table, so the two blocks compute the same."""
    torch.manual_seed(0)
    single = randomize(DiT(tiny(adaln_single=True)))
    zero = DiT(tiny()).eval()
    block, reference = single.blocks[0], zero.blocks[0]
    state = {k: v for k, v in block.state_dict().items() if k != "scale_shift_table"}
    linear = single.t_block[1]
    state["adaLN_modulation.1.weight"] = linear.weight
    state["adaLN_modulation.1.bias"] = linear.bias + block.scale_shift_table.flatten()
    reference.load_state_dict(state)
    tokens, c = torch.randn(2, 16, 32), torch.randn(2, 32)
    with torch.no_grad():
        torch.testing.assert_close(block(tokens, single.t_block(c), text()), reference(tokens, c, text()))
    assert block.adaLN_modulation is None and block.scale_shift_table.shape == (6, 32)
    assert single.final_layer.scale_shift_table.shape == (2, 32)


def test_adaln_single_tables_start_as_pixart():
    """N(0, 1/D) tables, t_block N(0, 0.02) with zero bias (PixArt-alpha's initialisation)."""
    torch.manual_seed(0)
    model = DiT(tiny("DiT-S/2", adaln_single=True, hidden_size=256, num_heads=4))
    tables = torch.cat([b.scale_shift_table.flatten() for b in model.blocks])
    assert tables.std().item() == pytest.approx(256 ** -0.5, rel=0.05)
    assert model.t_block[1].weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.equal(model.t_block[1].bias, torch.zeros(6 * 256))


# ----------------------------------------------------------------------------- cost
@pytest.mark.parametrize("overrides, size, text_len", [
    (dict(adaln_single=True), (8, 8), 5),
    (dict(integrator=True), (8, 12), 7),
    (dict(integrator=True, integrator_iterations=3, integrator_mlp_ratio=2.5, mixer_depth=1), (8, 8), 3),
    (dict(adaln_single=True, integrator=True, num_heads=4, num_kv_heads=2, pos_embed="rope",
          cross_attention=False), (8, 8), 5),
])
def test_dit_cost_matches_flop_counter_and_the_model(overrides, size, text_len):
    """Exact agreement, as for the plain DiT (test_dit): the Integrators are counted at all T steps,
    which the forward always runs."""
    cfg = tiny(**overrides)
    model = DiT(cfg).eval()
    x, t = inputs(b=2, h=size[0], w=size[1])
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, t, text(length=text_len, real=(text_len, 1)))
    cost = dit_cost(cfg, input_size=size, text_len=text_len)
    assert counter.get_total_flops() == 2 * cost.flops
    assert cost.params == sum(p.numel() for p in model.parameters())


def test_adaln_single_saves_the_blocks_modulation_mlps():
    d, depth = 1152, 28
    plain, single = (dit_cost(dataclasses.replace(PRESETS["DiT-XL/2"], adaln_single=on)) for on in (False, True))
    # Each block: an MLP of 6D^2 + 6D becomes a 6D table; the final layer's 2D^2 + 2D a 2D table; + t_block.
    saved = depth * (6 * d * d + 6 * d - 6 * d) + (2 * d * d + 2 * d - 2 * d) - (6 * d * d + 6 * d)
    assert plain.params - single.params == saved
    assert 0.28 < saved / plain.params < 0.30
    assert single.flops_by_part["adaLN"] == 2 * d * 6 * d == plain.flops_by_part["adaLN"] / depth


# ----------------------------------------------------------------------------- gates
def test_gates_and_compute_fractions():
    """return_gates gives the same output and the gates [B, blocks (mixer first), T, N], each in [0, 1];
    compute_fractions averages them per token, or counts the share above a threshold."""
    torch.manual_seed(0)
    cfg = tiny(**OPTIONS["both"])  # a mixer block and 2 blocks, T = 3
    model = randomize(DiT(cfg))
    x, t = inputs(h=8, w=12)
    with torch.no_grad():
        out, gates = model(x, t, text(), return_gates=True)
        assert torch.equal(out, model(x, t, text()))
    assert gates.shape == (2, 3, 3, 4 * 6)
    assert ((gates >= 0) & (gates <= 1)).all() and gates.std() > 0
    fractions = compute_fractions(model, x, t, text())
    assert fractions.shape == (2, 24) and torch.equal(fractions, gates.mean(dim=(1, 2)))
    hard = compute_fractions(model, x, t, text(), threshold=0.5)
    assert torch.equal(hard, (gates > 0.5).float().mean(dim=(1, 2)))
    torch.testing.assert_close(hard * 9, (hard * 9).round())  # a share of the 3 x 3 (block, step) pairs
    # The gates see the noise level through the MLP's modulation.
    assert not torch.allclose(compute_fractions(model, x, t.flip(0), text()), fractions)


def test_gates_under_activation_checkpointing():
    torch.manual_seed(0)
    model = randomize(DiT(tiny(integrator=True))).train()
    x, t = inputs()
    out, gates = model(x, t, text(), return_gates=True)
    model.gradient_checkpointing = True
    out_ac, gates_ac = model(x, t, text(), return_gates=True)
    assert torch.equal(out_ac, out) and torch.equal(gates_ac, gates)
    (out_ac.square().mean() + gates_ac.mean()).backward()
    assert model.blocks[0].integrator.gate[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("option", list(OPTIONS))
def test_half_precision_and_one_graph(option):
    """bf16 and fp16 stay close to float32 (test_dit's bounds), and torch.compile sees one graph."""
    model = randomize(DiT(tiny(**OPTIONS[option])))
    x, t = inputs()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t, text()), model(x, t, text()))
    assert half_precision_gap(model, x, t, text(), torch.bfloat16) < 0.06


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs", [dict(integrator=True, integrator_iterations=0),
                                    dict(integrator_iterations=-1), dict(integrator=True, integrator_mlp_ratio=0)])
def test_an_integrator_needs_one_iteration_and_a_width(kwargs):
    with pytest.raises(ValueError, match="integrator_iterations >= 1 and integrator_mlp_ratio > 0.*integrator=False"):
        DiTConfig(**kwargs)


def test_bad_integrator_module_and_gate_requests():
    with pytest.raises(ValueError, match="iterations >= 1.*got iterations 0"):
        IntegratorNeurons(16, 0)
    with pytest.raises(ValueError, match="hidden width of at least 1"):
        IntegratorNeurons(2, 1)  # a gate of int(2 / 4) = 0 units
    x, t = inputs()
    with pytest.raises(ValueError, match="return_gates needs a DiT built with integrator=True.*integrator=False"):
        DiT(tiny())(x, t, text(), return_gates=True)
    with pytest.raises(ValueError, match="run on all tokens.*keep given"):
        DiT(tiny(integrator=True))(x, t, text(), keep=torch.zeros(2, 4, dtype=torch.long), return_gates=True)


@pytest.mark.parametrize("saved, ours, match", [
    (dict(adaln_single=True), {}, "a DiT with adaLN-single, and this one is without.*adaln_single"),
    ({}, dict(adaln_single=True), "a DiT without adaLN-single, and this one is with.*adaln_single"),
    (dict(integrator=True), {}, "a DiT with Integrator Neurons, and this one is without.*integrator"),
    ({}, dict(integrator=True), "a DiT without Integrator Neurons, and this one is with.*integrator"),
])
def test_weights_of_another_option_are_refused_clearly(saved, ours, match):
    state = DiT(tiny(**saved)).state_dict()
    with pytest.raises(ValueError, match=match):
        DiT(tiny(**ours)).load_state_dict(state)


# ----------------------------------------------------------------------------- save / load
def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    cfg = tiny(**OPTIONS["both"])
    model = randomize(DiT(cfg))
    loaded, _ = load_model(DiT, DiTConfig, save_weights(model, tmp_path / "dit.safetensors", kind="dit"), kind="dit")
    assert loaded.config == cfg
    x, t = inputs()
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x, t, text()), model(x, t, text()))


@pytest.mark.parametrize("preset_name", ["tiny-single", "tiny-integrator"])
def test_cli_trains_the_preset_and_both_loaders_sample_it(preset_name, tmp_path, monkeypatch):
    """`train --model dit --preset tiny-single|tiny-integrator --steps 3`: our loader and diffusers' load
    the pipeline it writes, with the option on, and draw the same images."""
    import diffusers

    import tutorial_lib.data.latents
    from tutorial_lib.cli import main
    from tutorial_lib.pipeline import TextToImagePipeline

    class FakeCache:
        def tensors(self, split="train"):
            return torch.randn(16, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(16) % 10

    monkeypatch.setattr(tutorial_lib.data.latents, "latent_cache", lambda: FakeCache())
    monkeypatch.setenv("TUTORIAL_DATA", str(tmp_path / "data"))
    out = tmp_path / "pipe"
    main(["train", "--model", "dit", "--preset", preset_name, "--text-encoder", "word", "--steps", "3",
          "--batch-size", "8", "--warmup", "1", "--out", str(out), "--device", "cpu"])
    config = json.loads((out / "transformer" / "config.json").read_text())
    assert (config["adaln_single"], config["integrator"]) == (preset_name == "tiny-single",
                                                              preset_name == "tiny-integrator")
    ours = TextToImagePipeline.from_pretrained(out)
    images = ours.generate(["a bag", "a coat"], num_inference_steps=2, seed=1)
    assert torch.isfinite(images).all()
    theirs = diffusers.DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    assert theirs.transformer.config == ours.transformer.config
    assert torch.equal(theirs.generate(["a bag", "a coat"], num_inference_steps=2, seed=1), images)


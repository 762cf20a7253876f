"""LoRA fine-tuning with peft (train/lora.py): a fresh adapter changes nothing, training changes only the
adapter (the base and its EMA stay bit for bit), resume, peft's format both ways, merging, clear errors
for adapters that do not fit, the trainable share on the shipped DiT, and the CLI. Tiny widths, CPU."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from tutorial_lib.models import dit, mmdit, tiny_transformer, unet
from tutorial_lib.pipeline import TextToImagePipeline, load_component
from tutorial_lib.text import text_encoder
from tutorial_lib.text.base import TextEmbedding
from tutorial_lib.train.lora import (TARGETS, LoRAConfig, add_lora, load_lora, save_lora, targeted,
                                     trainable_share)
from tutorial_lib.train.text_to_image import Objective, TextToImageConfig, build, train_text_to_image
from tutorial_lib.train.trainer import TrainerConfig
from tutorial_lib.weights import WeightsError, asset

peft = pytest.importorskip("peft", reason='LoRA needs peft: pip install "tutorial_lib[lora]"')

TEXT_DIM = 16
DENOISERS = {  # tiny widths of each registered architecture
    "dit": lambda: dit.DiT(dit.preset("tiny", hidden_size=32, depth=1, num_heads=2, text_dim=TEXT_DIM)),
    "tiny_transformer": lambda: tiny_transformer.TinyTransformer(
        tiny_transformer.TinyTransformerConfig(dim=32, depth=1, heads=2, text_dim=TEXT_DIM)),
    "mmdit": lambda: mmdit.MMDiT(mmdit.preset("tiny", hidden_size=32, depth=1, num_heads=2, text_dim=TEXT_DIM)),
    "unet": lambda: unet.UNet(unet.preset("tiny", block_out_channels=(16, 32), attention_head_dim=8,
                                          norm_num_groups=8, text_dim=TEXT_DIM,
                                          down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                          up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))),
}


def randomize(model: torch.nn.Module, seed: int = 0, only: str = "") -> torch.nn.Module:
    """Perturb every parameter (whose name contains `only`), so no zero-initialised layer hides anything."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if only in name:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def inputs(b: int = 2):
    gen = torch.Generator().manual_seed(2)
    mask = torch.arange(5)[None] < torch.tensor([3, 1])[:, None]
    text = TextEmbedding(torch.randn(b, 5, TEXT_DIM, generator=gen), mask)
    return torch.randn(b, 4, 8, 8, generator=gen), torch.rand(b, generator=gen), text


def base_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights LoRA does not own, by their names before injection."""
    return {k.replace(".base_layer", ""): v.clone() for k, v in module.state_dict().items() if "lora_" not in k}


# ----------------------------------------------------------------------------- the adapter
@pytest.mark.parametrize("name", list(DENOISERS))
def test_a_fresh_adapter_changes_nothing_and_trains_alone(name):
    """B = 0: the same outputs, bit for bit; only the adapter's A and B require gradients, and the
    default targets of every registered architecture adapt its attention and MLP linears."""
    torch.manual_seed(0)
    model = randomize(DENOISERS[name]())
    x, t, text = inputs()
    with torch.no_grad():
        before = model(x, t, text)
    layers = targeted(model, TARGETS[type(model).__name__])
    add_lora(model, LoRAConfig(rank=2))
    with torch.no_grad():
        assert torch.equal(model(x, t, text), before)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(layers) >= 4 and len(trainable) == 2 * len(layers)
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)


def test_the_trainable_share_on_the_shipped_dit():
    """Rank 4 on dit_t2i (1,867,152 weights): r (in + out) per adapted layer. The attention and MLP
    linears train 2.85%; the self-attention alone 0.77% (< 1%)."""
    model = load_component(asset("dit_t2i") / "transformer")
    base = sum(p.numel() for p in model.parameters())
    layers = set(targeted(model, TARGETS["DiT"]))
    expected = sum(4 * (m.in_features + m.out_features) for n, m in model.named_modules() if n in layers)
    add_lora(model, LoRAConfig(rank=4))
    assert trainable_share(model) == (expected, base) == (53_248, 1_867_152)
    self_attention = add_lora(load_component(asset("dit_t2i") / "transformer"),
                              LoRAConfig(rank=4, target_modules=("attn.q", "attn.kv", "attn.out")))
    adapter, base = trainable_share(self_attention)
    assert adapter == 14_336 and adapter / base < 0.01


def test_bad_lora_configs_and_targets():
    with pytest.raises(ValueError, match="rank >= 1"):
        LoRAConfig(rank=0)
    with pytest.raises(ValueError, match="alpha > 0"):
        LoRAConfig(alpha=0)
    with pytest.raises(ValueError, match="target_modules is empty"):
        LoRAConfig(target_modules=[])
    model = DENOISERS["dit"]()
    with pytest.raises(ValueError, match=r"match no linear layer of this DiT; its linear layers end in .*'attn.q'"):
        add_lora(model, LoRAConfig(target_modules=("to_q",)))
    add_lora(model, LoRAConfig())
    with pytest.raises(ValueError, match="already holds a LoRA adapter"):
        add_lora(model, LoRAConfig())
    with pytest.raises(ValueError, match="holds no LoRA adapter"):
        save_lora(DENOISERS["dit"](), "unused")


def test_without_peft_lora_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # as if not installed: `import peft` raises ImportError
    with pytest.raises(ImportError, match=r'pip install "tutorial_lib\[lora\]"'):
        add_lora(DENOISERS["dit"](), LoRAConfig())


# ----------------------------------------------------------------------------- save / load
def test_the_saved_adapter_round_trips_and_peft_reads_it(tmp_path):
    torch.manual_seed(0)
    model = randomize(DENOISERS["dit"]())
    fresh = base_weights(model)
    add_lora(model, LoRAConfig(rank=2, alpha=4.0), base="some/pipeline")
    randomize(model, seed=1, only="lora_B")  # a trained adapter
    x, t, text = inputs()
    with torch.no_grad():
        adapted = model(x, t, text)
    save_lora(model, tmp_path / "adapter")
    assert {p.name for p in (tmp_path / "adapter").iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (2, 4.0, "some/pipeline")

    def base():
        model = DENOISERS["dit"]()
        model.load_state_dict(fresh)
        return model.eval()

    ours = load_lora(base(), tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(base(), str(tmp_path / "adapter"))  # peft's own loader
    merged = load_lora(base(), tmp_path / "adapter", merge=True)
    with torch.no_grad():
        assert torch.equal(ours(x, t, text), adapted)
        assert torch.equal(theirs(x, t, text), adapted)
        torch.testing.assert_close(merged(x, t, text), adapted)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    assert merged.state_dict().keys() == fresh.keys()


def test_an_adapter_that_does_not_fit_is_a_clear_error(tmp_path):
    model = add_lora(DENOISERS["dit"](), LoRAConfig(rank=2))
    save_lora(model, tmp_path / "adapter")
    wider = dit.DiT(dit.preset("tiny", hidden_size=64, depth=1, num_heads=2, text_dim=TEXT_DIM))
    with pytest.raises(ValueError, match=r"does not fit this DiT: blocks.0.attn.kv: adapter for in_features 32, "
                                         r"layer has 64; .* and \d+ more. Load it onto the model it was trained on"):
        load_lora(wider, tmp_path / "adapter")
    with pytest.raises(ValueError, match="does not fit this UNet: blocks.0.attn.kv: no such layer"):
        load_lora(DENOISERS["unet"](), tmp_path / "adapter")
    with pytest.raises(WeightsError, match="not a LoRA adapter folder"):
        load_lora(DENOISERS["dit"](), tmp_path)
    loaded = load_lora(DENOISERS["dit"](), tmp_path / "adapter")
    with pytest.raises(ValueError, match="already holds a LoRA adapter"):
        load_lora(loaded, tmp_path / "adapter")


# ----------------------------------------------------------------------------- training
@pytest.fixture
def base_pipeline(tmp_path, shipped_vae):
    """A tiny trained-looking DiT pipeline (random weights, a word encoder) to fine-tune."""
    torch.manual_seed(0)
    model = randomize(dit.DiT(dit.preset("tiny", hidden_size=32, depth=1, num_heads=2, text_dim=TEXT_DIM)))
    encoder = text_encoder("word", dim=TEXT_DIM, depth=1, heads=2)
    TextToImagePipeline(model, encoder, shipped_vae, prediction="v").save_pretrained(tmp_path / "base", with_vae=False)
    return tmp_path / "base"


def lora_run(tmp_path, base, name="run", steps=3, **trainer) -> TextToImageConfig:
    return TextToImageConfig(
        model=dit.preset("tiny", hidden_size=32, depth=1, num_heads=2), text_encoder="word",
        text_encoder_kwargs=dict(dim=TEXT_DIM, depth=1, heads=2), objective=Objective(), init_from=str(base),
        lora=LoRAConfig(rank=2), trainer=TrainerConfig(steps=steps, batch_size=8, warmup_steps=1, log_every=1,
                                                       out_dir=str(tmp_path / name), tensorboard=False,
                                                       device="cpu", **trainer))


def data():
    return torch.randn(16, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(16) % 10


def test_a_lora_fine_tune_changes_only_the_adapter(tmp_path, base_pipeline):
    """Through the Trainer: the optimizer holds the adapter alone; after a few steps the denoiser's own
    weights, the (learned) text encoder's and their EMA are bit for bit the base pipeline's."""
    base = TextToImagePipeline.from_pretrained(base_pipeline)
    trainer = train_text_to_image(lora_run(tmp_path, base_pipeline), *data())
    model, ema = trainer.model, trainer.ema.model
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for n, p in model.named_parameters() if "lora_" in n}
    denoiser, encoder = base.transformer.state_dict(), base.text_encoder.state_dict()
    for trained in (model, ema):
        assert all(torch.equal(v, denoiser[k]) for k, v in base_weights(trained.transformer).items())
        assert all(torch.equal(v, encoder[k]) for k, v in trained.text_encoder.state_dict().items())
        assert all(p.abs().max() > 0 for n, p in trained.named_parameters() if "lora_B" in n)  # B moved off 0


def test_a_lora_run_resumes_exactly(tmp_path, base_pipeline):
    """Checkpoints hold base and adapter: a run that lost its last checkpoint, resumed from step 2, writes
    step 3 again bit for bit."""
    import shutil

    from safetensors.torch import load_file

    train_text_to_image(lora_run(tmp_path, base_pipeline, checkpoint_every=1), *data())
    last = tmp_path / "run" / "checkpoints" / "step_00000003"
    files = ("model.safetensors", "ema.safetensors", "optimizer.safetensors")
    straight = {name: load_file(last / name) for name in files}
    assert any(".lora_B." in k for k in straight["model.safetensors"])
    shutil.rmtree(last)
    train_text_to_image(lora_run(tmp_path, base_pipeline, checkpoint_every=1), *data(), resume=True)
    for name in files:
        again = load_file(last / name)
        assert again.keys() == straight[name].keys()
        assert all(torch.equal(again[k], straight[name][k]) for k in again), name


def test_lora_needs_a_model_to_adapt(tmp_path, base_pipeline):
    cfg = lora_run(tmp_path, base_pipeline)
    assert TextToImageConfig.from_dict(cfg.to_dict()).lora == LoRAConfig(rank=2)  # a JSON config file
    with pytest.raises(ValueError, match="set init_from"):
        TextToImageConfig(lora=LoRAConfig())


def test_init_from_a_pipeline_saved_before_later_config_fields(tmp_path, base_pipeline):
    """A folder saved before a DiTConfig field existed (the shipped dit_t2i) takes its default."""
    path = base_pipeline / "transformer" / "config.json"
    config = json.loads(path.read_text())
    del config["pos_interpolation"]
    path.write_text(json.dumps(config))
    build(lora_run(tmp_path, base_pipeline))


def test_cli_trains_and_saves_an_adapter(tmp_path, monkeypatch, shipped_vae):
    """`train --init-from PIPELINE --lora-rank 2` writes the adapter alone, which load_lora puts on that
    pipeline; the recorded command reproduces the run."""
    import tutorial_lib.data.latents
    from tutorial_lib.cli import main

    class FakeCache:
        def tensors(self, split="train"):
            return data()

    monkeypatch.setattr(tutorial_lib.data.latents, "latent_cache", lambda: FakeCache())
    torch.manual_seed(0)
    model = randomize(dit.DiT(dit.preset("tiny", text_dim=128)))
    TextToImagePipeline(model, text_encoder("word", dim=128), shipped_vae).save_pretrained(tmp_path / "base",
                                                                                         with_vae=False)
    flags = ["train", "--model", "dit", "--preset", "tiny", "--text-encoder", "word", "--steps", "2",
             "--batch-size", "8", "--warmup", "1", "--device", "cpu", "--init-from", str(tmp_path / "base")]
    main([*flags, "--lora-rank", "2", "--out", str(tmp_path / "lora")])
    assert {p.name for p in (tmp_path / "lora").iterdir()} == {"adapter_config.json", "adapter_model.safetensors",
                                                              "training.json", "run"}
    info = json.loads((tmp_path / "lora" / "training.json").read_text())
    assert "--lora-rank 2" in info["command"] and info["train_config"]["lora"]["rank"] == 2
    layers = set(targeted(model, TARGETS["DiT"]))
    assert info["adapter_parameters"] == 2 * sum(m.in_features + m.out_features for n, m in model.named_modules()
                                                 if n in layers)
    pipe = load_lora(TextToImagePipeline.from_pretrained(tmp_path / "base"), tmp_path / "lora")
    assert torch.isfinite(pipe.generate("a bag", num_inference_steps=2)).all()
    with pytest.raises(ValueError, match="set init_from"):
        main([*flags[:-2], "--lora-rank", "2", "--out", str(tmp_path / "x")])
    with pytest.raises(ValueError, match="give its --lora-rank"):
        main([*flags, "--lora-alpha", "2", "--out", str(tmp_path / "x")])

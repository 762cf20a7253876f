"""LoRA: fine-tune a trained denoiser through a low-rank adapter, with peft (Hu et al., 2021, "LoRA:
Low-Rank Adaptation of Large Language Models").

Each targeted linear layer keeps its trained weight W [out, in] frozen and learns a low-rank update:

    h = W x + (alpha / r) B A x,     A [r, in] random (Kaiming-uniform),  B [out, r] = 0 at the start,

so the adapted model starts as exactly the trained one (B = 0), and a layer trains r (in + out) numbers
instead of in x out. peft's LoRA layers compute this; this module chooses the layers for the course's
denoisers, trains through the usual `Trainer`, and saves and loads the adapter alone.

Targets (peft adapts a module whose name is one of these or ends in "." + one of them), by denoiser:
the attention projections (self and cross: q, kv, out) and the MLP's two linears of the DiT and the
tiny transformer; the MMDiT's qkv, proj, MLP and fused single-stream linears; diffusers' attention
(to_q, to_k, to_v, to_out.0) and feed-forward linears in the UNet. On the shipped dit_t2i (1,867,152
parameters), rank 4 on these trains 53,248 (2.85%); on the self-attention alone ("attn.q", "attn.kv",
"attn.out") 14,336 (0.77%).

Training (`TextToImageConfig.lora`, CLI `train --init-from PIPELINE --lora-rank 4`): `build` loads
init_from's denoiser, then `add_lora` injects the adapter and freezes every other weight (a learned text
encoder too). The Trainer's optimizer takes only parameters that require a gradient, so it holds the
adapter alone; the EMA averages each frozen weight with itself, which leaves it bit for bit unchanged;
checkpoints hold base and adapter, so a resumed run is exact. The result saved is the EMA's adapter.

Format: peft's own, as `PeftModel.save_pretrained` writes it:

    adapter_config.json          peft's LoraConfig: r, lora_alpha, target_modules, base_model_name_or_path
    adapter_model.safetensors    each layer's A and B, keyed "base_model.model.<layer>.lora_A.weight"

so `peft.PeftModel.from_pretrained(denoiser, folder)` reads it as `load_lora` does (which uses it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..weights import WeightsError, atomic_write

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"  # peft's names
PREFIX = "base_model.model."  # where PeftModel keeps the denoiser: its saved keys start so
INFO_FILE = "training.json"  # the command and figures of the run that trained an adapter (`save_lora`)
_TRANSFORMER = ("q", "kv", "out", "mlp.0", "mlp.2")  # models/layers.py's Attention and MLP
TARGETS = {  # denoiser class -> the linear layers LoRA adapts by default
    "DiT": _TRANSFORMER,
    "TinyTransformer": _TRANSFORMER,
    "MMDiT": ("qkv", "proj", "mlp.0", "mlp.2", "linear1", "linear2"),
    "UNet": ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"),
}


def _peft():
    """peft (the `lora` extra), imported where it is used: the rest of training does not need it."""
    try:
        import peft
    except ImportError as err:
        raise ImportError('LoRA needs peft: pip install "tutorial_lib[lora]" (or pip install peft).') from err
    return peft


@dataclass
class LoRAConfig:
    """An adapter's shape: its rank r, its scale alpha / r, and the layers it adapts."""

    rank: int = 4  # r
    alpha: float | None = None  # peft's lora_alpha; the update is scaled by alpha / r. None: alpha = r (scale 1)
    target_modules: tuple[str, ...] | None = None  # None: TARGETS of the denoiser's class
    dropout: float = 0.0  # on the adapter's input

    def __post_init__(self):
        if self.target_modules is not None:
            self.target_modules = tuple(self.target_modules)  # JSON gives a list
        if self.rank < 1 or (self.alpha is not None and not self.alpha > 0) or not 0 <= self.dropout < 1:
            raise ValueError(f"A LoRA adapter needs rank >= 1, alpha > 0 (or None: alpha = rank) and dropout in "
                             f"[0, 1), got rank={self.rank}, alpha={self.alpha}, dropout={self.dropout}.")
        if self.target_modules == ():
            raise ValueError("target_modules is empty: name the layers to adapt, or None for the denoiser's "
                             "defaults (lora.TARGETS).")


def targeted(denoiser: nn.Module, targets: tuple[str, ...]) -> list[str]:
    """The names of `denoiser`'s linear layers that `targets` select, as peft matches them."""
    return [name for name, m in denoiser.named_modules() if isinstance(m, nn.Linear)
            and any(name == t or name.endswith("." + t) for t in targets)]


def add_lora(denoiser: nn.Module, cfg: LoRAConfig, base: str | None = None) -> nn.Module:
    """Inject a fresh LoRA adapter (B = 0: the same function) into `denoiser` in place and freeze every
    other weight; `base` (the trained model's folder) is recorded in its config. Returns `denoiser`."""
    name = type(denoiser).__name__
    targets = cfg.target_modules or TARGETS.get(name)
    if targets is None:
        raise ValueError(f"No default LoRA targets for a {name}; give target_modules (names of its linear "
                         f"layers, e.g. {_linear_names(denoiser)}).")
    if getattr(denoiser, "peft_config", None):
        raise ValueError(f"This {name} already holds a LoRA adapter; add one to a model without.")
    if not targeted(denoiser, targets):
        raise ValueError(f"LoRA targets {list(targets)} match no linear layer of this {name}; its linear layers "
                         f"end in {_linear_names(denoiser)}.")
    peft = _peft()
    config = peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha or cfg.rank, lora_dropout=cfg.dropout,
                        target_modules=list(targets), base_model_name_or_path=base)
    denoiser.requires_grad_(False)
    return peft.inject_adapter_in_model(config, denoiser)  # the adapter's parameters require gradients


def _linear_names(module: nn.Module) -> list[str]:
    """The distinct last two parts of the names of `module`'s linear layers ("attn.q", "mlp.0", ...)."""
    names = [".".join(n.split(".")[-2:]) for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    return sorted(set(names))


def save_lora(denoiser: nn.Module, folder: str | Path, **info) -> Path:
    """Write the adapter of `denoiser` (`add_lora`'s) alone into `folder`, in peft's format (module
    docstring); `info` (JSON: the training command and figures), if any, into folder/training.json."""
    if not getattr(denoiser, "peft_config", None):
        raise ValueError(f"This {type(denoiser).__name__} holds no LoRA adapter (see add_lora).")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    denoiser.peft_config["default"].save_pretrained(str(folder))
    # A and B of each layer, without the adapter's name; no embedding layers (peft would look the base up on the Hub)
    state = _peft().get_peft_model_state_dict(denoiser, save_embedding_layers=False)
    tensors = {PREFIX + k: v.detach().cpu().contiguous() for k, v in state.items()}
    atomic_write(folder / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp))
    if info:
        text = json.dumps(info, indent=1)
        atomic_write(folder / INFO_FILE, lambda tmp: Path(tmp).write_text(text))
    return folder


def load_lora(target, folder: str | Path, merge: bool = False):
    """Load the adapter in `folder` onto `target` (a pipeline, a `CaptionConditioned` or a bare denoiser:
    on its `.transformer` if it has one) with peft's own `PeftModel.from_pretrained`. merge=True adds
    (alpha / r) B A into each weight and removes the LoRA layers again: the same function at the cost of
    the plain model. Returns `target`."""
    denoiser = getattr(target, "transformer", target)
    if getattr(denoiser, "peft_config", None):
        raise ValueError(f"This {type(denoiser).__name__} already holds a LoRA adapter; load onto a fresh one.")
    check_fits(denoiser, folder)
    model = _peft().PeftModel.from_pretrained(denoiser, str(folder))  # injects into `denoiser` in place
    if merge:
        model.merge_and_unload()
    return target


def check_fits(denoiser: nn.Module, folder: str | Path):
    """A clear error if `folder` is not a LoRA adapter or its tensors do not fit `denoiser`'s layers
    (another architecture or width): peft's own would be a RuntimeError of size mismatches, or none."""
    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise WeightsError(f"{folder} is not a LoRA adapter folder: it needs {CONFIG_FILE} and {WEIGHTS_FILE} "
                           "(as save_lora and peft's save_pretrained write them).")
    with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    problems = []
    for key, shape in sorted(shapes.items()):
        name, part = key.removeprefix(PREFIX).rsplit(".lora_", 1)  # "blocks.0.attn.q", "A.weight"
        try:
            layer = denoiser.get_submodule(name)
        except AttributeError:
            problems.append(f"{name}: no such layer")
            continue
        size, want = (shape[1], "in_features") if part.startswith("A") else (shape[0], "out_features")
        if getattr(layer, want, None) != size:
            problems.append(f"{name}: adapter for {want} {size}, layer has {getattr(layer, want, 'none')}")
    if problems:
        more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise ValueError(f"The LoRA adapter in {folder} does not fit this {type(denoiser).__name__}: "
                         f"{'; '.join(problems[:3])}{more}. Load it onto the model it was trained on "
                         f"(base_model_name_or_path in its {CONFIG_FILE}).")


def trainable_share(module: nn.Module) -> tuple[int, int]:
    """(parameters that train, frozen parameters) of `module`: after `add_lora`, the adapter's and the base's."""
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in module.parameters()) - trainable

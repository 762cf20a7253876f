"""Notebook 03's denoiser: a Diffusion Transformer (DiT) over patches of the latent, text-conditioned.

DiT (Peebles & Xie, 2023, "Scalable Diffusion Models with Transformers") cuts the latent
x [B, C, H, W] into N = (H/p)(W/p) patches of p x p, embeds each as a token of width D, adds a
fixed 2D sin-cos position embedding, runs `depth` transformer blocks and maps every token back
to its p x p x C patch. The noise level t and a pooled caption vector form one conditioning
vector c = t_emb + y_emb, which every block turns into its own shifts, scales and gates
(adaLN-Zero, below). The caption tokens also enter every block through cross-attention, as in
PixArt-alpha (Chen et al., 2023).

One block, with c's modulation (shift, scale, gate) x (attention, MLP) = adaLN_modulation(c):

    x = x + gate_msa * SelfAttn(modulate(LN(x), shift_msa, scale_msa))
    x = x + CrossAttn(LN'(x), text tokens, text mask)
    x = x + gate_mlp * MLP(modulate(LN(x), shift_mlp, scale_mlp))

adaLN-Zero: the linear layers that produce the modulation are zero-initialised, so every gate
starts at 0 and every block starts as the identity; the cross-attention's output projection and
the final layer are zero-initialised too. A freshly built DiT therefore outputs exactly 0 for any
input. The model does not know what it predicts (x0, eps, v or a flow velocity): that is the
parametrization's business (`tutorial_lib.diffusion.parametrizations`). A zero output is the
parametrization's "no correction": for example x0_hat = c_skip x + c_out F(x) starts as the skip
path c_skip x (EDM, Karras et al., 2022), and eps-prediction starts by predicting no noise.

Options beyond the paper, each a config field: 2D RoPE instead of the additive sin-cos embedding
(pos_embed="rope"), QK-norm (qk_norm="layer" or "rms"), grouped-query attention
(num_kv_heads < num_heads), and cross_attention=False for the paper's adaLN-only conditioning.

Notebook 06's options, for training at scale (micro_diffusion, Sehwag et al., 2024):
- num_experts > 0: every moe_every-th block's MLP is a Mixture of Experts (models/moe.py), routed by
  expert choice or token choice.
- mixer_depth > 0: that many blocks run on all tokens before the rest (the patch-mixer), so that
  forward(..., keep=indices) can drop the masked tokens after it (models/masking.py).
- pos_interpolation: positions scaled to the config's grid when the latent is larger or smaller
  (PixArt-alpha's interpolation, used by the references from 256 to 512 pixels).

Notebook 07's options (the architecture zoo):
- adaln_single: PixArt-alpha's adaLN-single (Chen et al., 2023, section 2.3). One shared MLP, t_block
  (SiLU, Linear(D, 6D)), turns c into the six modulations once; each block adds its own learned table
  scale_shift_table [6, D] (initialised N(0, 1/D), as PixArt's) to them instead of running its own adaLN
  MLP of 6D^2 + 6D parameters: DiT-XL/2 loses 29% of its parameters (32% without cross-attention). The
  final layer's shift and scale are, as in PixArt, c plus a table [2, D]. The final linear map is still
  zeroed, so a fresh model still outputs 0; its blocks are not the identity (the tables' gates start
  random, as in PixArt).
- integrator: Integrator Neurons (models/integrator.py) at the end of every block (the patch-mixer's
  too): a per-token gate decides, over integrator_iterations steps, how much of a refinement MLP the token
  takes. forward(..., return_gates=True) also returns the gates; `integrator.compute_fractions` averages them.

Activation checkpointing (Chen et al., 2016, "Training Deep Nets with Sublinear Memory Cost") is a
switch on the module, not a config field, so configs and saved weights do not depend on it (as
diffusers' `gradient_checkpointing`): with `model.gradient_checkpointing = True` (the Trainer's
`activation_checkpointing`), each block keeps only its inputs during a forward that records gradients
and runs again in backward (`torch.utils.checkpoint`, non-reentrant), so activation memory grows with
one block instead of `depth` blocks, for about one more forward pass of compute. The checkpoint sits
inside each block's own forward (`checkpointed`), not around the call to the block: under FSDP2 each
block is a unit whose pre-forward hook gathers its weights and casts its inputs to bfloat16 before
forward starts, so the checkpoint saves the cast inputs and the recompute runs on them, as torchtitan
does by wrapping each block in `checkpoint_wrapper` before `fully_shard`. A checkpoint around the
unit's call instead keeps float32 inputs, and torch releases whose FSDP2 does not cast inputs again
during the recompute then meet bfloat16 weights with float32 activations (a dtype error in
backward). The blocks keep their names, so state_dict keys (and shipped weights) do not change, as
they would under `checkpoint_wrapper`'s `_checkpoint_wrapped_module` prefix.

`DiT.fsdp_units()` names the modules FSDP shards as units (train/distributed.py): the blocks, in the
order they run.

Written for this course from the papers. facebookresearch/DiT's code (CC BY-NC) was read, not
copied; module names (x_embedder, t_embedder, y_embedder, adaLN_modulation, final_layer) follow
it so readers can map one onto the other.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import wraps

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..text.base import TextEmbedding, masked_mean
from .integrator import GATE_RATIO, IntegratorNeurons
from .layers import MLP, Attention, check_text_mask, modulate, rope_2d, sincos_2d, timestep_embedding
from .masking import num_kept, restore_tokens, take_tokens
from .moe import ROUTINGS, ExpertChoiceMoE, TokenChoiceMoE

POS_EMBEDS = ("sincos", "rope")
QK_NORMS = ("none", "layer", "rms")


def latent_grid(input_size, patch_size: int) -> tuple[int, int]:
    """A config's latent size as (H, W), each divisible by patch_size: JSON (the safetensors metadata)
    turns tuples into lists, and an int means a square latent."""
    size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    if len(size) != 2 or patch_size < 1 or any(s % patch_size for s in size):
        raise ValueError(f"input_size {size} must be (H, W), each divisible by patch_size {patch_size}.")
    return size


@dataclass
class DiTConfig:
    """A DiT's shape. Field names follow DiT's code (hidden_size, depth, num_heads, mlp_ratio)."""

    in_channels: int = 4  # latent channels C; the output has the same
    input_size: tuple[int, int] = (8, 8)  # the latent (H, W) it is meant for; any multiple of patch_size runs
    patch_size: int = 2  # p: each p x p patch of the latent is one token
    hidden_size: int = 128  # D, the token width
    depth: int = 4  # number of DiT blocks
    num_heads: int = 4
    num_kv_heads: int | None = None  # None: = num_heads (multi-head); fewer: grouped-query attention
    mlp_ratio: float = 4.0
    text_dim: int = 128  # D_text of the caption tokens (the text encoder's width)
    cross_attention: bool = True  # False: text enters only through the pooled vector in adaLN (as DiT)
    qk_norm: str = "none"  # "none" | "layer" | "rms"
    pos_embed: str = "sincos"  # "sincos": added to the tokens once; "rope": 2D RoPE in self-attention
    rope_theta: float = 10_000.0
    frequency_embedding_size: int = 256  # width of the sinusoidal t embedding fed to t_embedder
    num_experts: int = 0  # 0: a dense MLP in every block; E > 0: MoE MLPs (models/moe.py)
    moe_every: int = 2  # with experts, blocks moe_every-1, 2 moe_every-1, ... are MoE (2: every other)
    routing: str = "expert_choice"  # "expert_choice" | "token_choice"
    capacity_factor: float = 2.0  # expert choice: C = capacity_factor N / E; token choice: x top_k
    top_k: int = 2  # token choice: experts per token
    router_aux_loss_coef: float = 0.01  # token choice: weight of the load-balancing loss
    mixer_depth: int = 0  # patch-mixer blocks, on all tokens before masking (models/masking.py)
    pos_interpolation: bool = False  # scale positions to input_size's grid on other latent sizes
    adaln_single: bool = False  # PixArt-alpha's shared modulation MLP plus a table per block
    integrator: bool = False  # Integrator Neurons at the end of every block (models/integrator.py)
    integrator_iterations: int = 2  # T, the gated refinement steps of each Integrator
    integrator_mlp_ratio: float = 1.0  # the refinement MLP's hidden width / D

    def __post_init__(self):
        self.input_size = latent_grid(self.input_size, self.patch_size)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads "
                             f"{self.num_heads}.")
        if self.num_kv_heads is not None and (self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads):
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads "
                             f"{self.num_kv_heads}.")
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"Unknown qk_norm {self.qk_norm!r}; choose one of {', '.join(QK_NORMS)}.")
        if self.pos_embed not in POS_EMBEDS:
            raise ValueError(f"Unknown pos_embed {self.pos_embed!r}; choose one of {', '.join(POS_EMBEDS)}.")
        if self.pos_embed == "sincos" and self.hidden_size % 4:
            raise ValueError(f"2D sin-cos position embedding needs hidden_size divisible by 4, "
                             f"got {self.hidden_size}.")
        if self.pos_embed == "rope" and (self.hidden_size // self.num_heads) % 4:
            raise ValueError(f"2D RoPE needs a head dimension divisible by 4, got "
                             f"{self.hidden_size} / {self.num_heads}.")
        if self.num_experts < 0 or self.moe_every < 1 or self.mixer_depth < 0:
            raise ValueError(f"Need num_experts >= 0, moe_every >= 1 and mixer_depth >= 0, got "
                             f"{self.num_experts}, {self.moe_every}, {self.mixer_depth}.")
        if self.integrator_iterations < 1 or int(self.hidden_size * self.integrator_mlp_ratio) < 1:
            raise ValueError(f"Integrator Neurons need integrator_iterations >= 1 and integrator_mlp_ratio > 0, got "
                             f"{self.integrator_iterations} and {self.integrator_mlp_ratio}; integrator=False turns "
                             f"them off.")
        if self.routing not in ROUTINGS:
            raise ValueError(f"Unknown routing {self.routing!r}; choose one of {', '.join(ROUTINGS)}.")
        if self.num_experts:  # a clear error now for a layer that could not be built or run
            with torch.device("meta"):
                layer = self.moe_layer()
            if self.routing == "expert_choice":
                layer.capacity(self.num_tokens)

    @property
    def num_tokens(self) -> int:
        """N, the tokens of a latent of input_size."""
        return (self.input_size[0] // self.patch_size) * (self.input_size[1] // self.patch_size)

    def is_moe(self, block: int) -> bool:
        return self.num_experts > 0 and (block + 1) % self.moe_every == 0

    def moe_layer(self) -> ExpertChoiceMoE | TokenChoiceMoE:
        """A new MoE feed-forward layer of this config: experts as wide as the dense MLP."""
        d, m = self.hidden_size, int(self.hidden_size * self.mlp_ratio)
        if self.routing == "expert_choice":
            return ExpertChoiceMoE(d, m, self.num_experts, self.capacity_factor)
        return TokenChoiceMoE(d, m, self.num_experts, self.capacity_factor, self.top_k, self.router_aux_loss_coef)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


# (hidden_size, depth, num_heads) of DiT's Table 1 (Peebles & Xie, 2023), with head dim 64, 64, 64, 72.
_PAPER_SIZES = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}
_SIZES = {name: DiTConfig(hidden_size=d, depth=n, num_heads=h) for name, (d, n, h) in _PAPER_SIZES.items()}
# XXL: the widths of Lumina-Image 2.0's 2.6B Unified Next-DiT (Qin et al., 2025; Alpha-VLLM's
# NextDiT_2B_GQA_patch2_Adaln_Refiner: dim 2304, 26 layers, 24 heads, 8 KV heads, QK-norm (RMS),
# 2D RoPE), with this file's block (separate cross-attention, GELU MLP) rather than Lumina's joint
# attention and SwiGLU, so its parameter count differs. It is the preset that exercises GQA,
# QK-norm and RoPE together; the paper sizes are plain DiT (MHA, sin-cos, no QK-norm).
_SIZES["XXL"] = DiTConfig(hidden_size=2304, depth=26, num_heads=24, num_kv_heads=8, qk_norm="rms",
                          pos_embed="rope")

# Named sizes. "tiny" trains on a laptop CPU (notebook 03); the others are DiT's, at patch 1, 2, 4.
PRESETS: dict[str, DiTConfig] = {"tiny": DiTConfig()}
PRESETS.update({f"DiT-{name}/{p}": dataclasses.replace(cfg, patch_size=p)
                for name, cfg in _SIZES.items() for p in (1, 2, 4)})

# Sparse presets (notebook 06). At CPU scale, the tiny DiT with a MoE MLP in every other block (4 experts
# at capacity factor 1: the FLOPs of the dense MLP, 4x its parameters), with a one-block patch-mixer for
# masked training, and both. At scale, micro_diffusion's recipe (Sehwag et al., 2024): 8 experts at
# capacity factor 2 in every other block and a patch-mixer, on SD-VAE latents of 256 px (32 x 32 x 4)
# read from a 1024-wide text encoder. MoE-DiT-XL/2 is its 1.16B MicroDiT_XL_2 with uniform widths
# (theirs grow with depth): 1.15B parameters, 0.64B active (`dit_cost`).
_TINY_MOE = dict(num_experts=4, capacity_factor=1.0)
PRESETS.update({"tiny-moe": DiTConfig(**_TINY_MOE), "tiny-mixer": DiTConfig(mixer_depth=1),
                "tiny-moe-mixer": DiTConfig(mixer_depth=1, **_TINY_MOE)})
_SPARSE = dict(input_size=(32, 32), patch_size=2, num_experts=8, capacity_factor=2.0, text_dim=1024)
PRESETS.update({f"MoE-DiT-{name}/2": dataclasses.replace(_SIZES[name], mixer_depth=2, **_SPARSE)
                for name in ("S", "B")})
PRESETS["MoE-DiT-XL/2"] = DiTConfig(hidden_size=1024, depth=20, num_heads=16, mixer_depth=4, **_SPARSE)

# Notebook 07's presets: the tiny DiT with adaLN-single, and with Integrator Neurons (T = 2 steps).
PRESETS.update({"tiny-single": DiTConfig(adaln_single=True), "tiny-integrator": DiTConfig(integrator=True)})

# Notebook 08's guide for autoguidance (Karras et al., 2024): a smaller DiT of the tiny one's family (half
# the width, half the depth), trained for fewer steps on the same captions, encoder and VAE.
PRESETS["tiny-guide"] = DiTConfig(hidden_size=64, depth=2, num_heads=2)


def preset(name: str, **overrides) -> DiTConfig:
    """A fresh copy of the named config, with `overrides` (any DiTConfig field) applied.

    preset("DiT-S/2", text_dim=384) is DiT-S/2 reading a 384-wide text encoder.
    """
    if name not in PRESETS:
        raise ValueError(f"Unknown DiT preset {name!r}; choose one of {', '.join(PRESETS)}.")
    return dataclasses.replace(PRESETS[name], **overrides)


def adaln_layers(cfg: DiTConfig, k: int) -> tuple[nn.Module | None, nn.Parameter | None]:
    """(adaLN_modulation, scale_shift_table) of a layer that needs k shifts, scales or gates of width D:
    adaLN-Zero's own MLP c [B, D] -> [B, k D], or adaLN-single's table [k, D] (set by `initialize_weights`)."""
    d = cfg.hidden_size
    if cfg.adaln_single:
        return None, nn.Parameter(torch.empty(k, d))
    return nn.Sequential(nn.SiLU(), nn.Linear(d, k * d)), None


def adaln(layer: nn.Module, c: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """k modulations [B, D] of `layer` (built by `adaln_layers`): adaLN_modulation(c) with c [B, D]; with
    adaLN-single, c + scale_shift_table, c being t_block's shared [B, k D] or, for the final layer, c [B, D]."""
    if layer.scale_shift_table is None:
        return layer.adaLN_modulation(c).chunk(k, dim=1)
    table = layer.scale_shift_table  # [k, D]
    return (c.view(len(c), -1, table.shape[1]) + table).unbind(1)  # [B, k or 1, D] + [k, D] -> k x [B, D]


def checkpointed(forward):
    """A block's forward that recomputes itself in backward while the block's `gradient_checkpointing` is
    True and gradients are recorded (`torch.utils.checkpoint`, non-reentrant; module docstring: it runs
    inside the call, after any forward pre-hook such as FSDP's)."""

    @wraps(forward)
    def run(block, *args, **kwargs):
        if block.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(forward, block, *args, use_reentrant=False, **kwargs)
        return forward(block, *args, **kwargs)

    return run


class BlockCheckpointing:
    """A model whose blocks' forwards are `checkpointed`: its `gradient_checkpointing` switch (the
    Trainer's activation_checkpointing) is that of every block in its `fsdp_units()`."""

    @property
    def gradient_checkpointing(self) -> bool:
        """True: recompute each block in backward, inside the block (module docstring)."""
        return all(block.gradient_checkpointing for block in self.fsdp_units())

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, on: bool):
        for block in self.fsdp_units():
            block.gradient_checkpointing = on


class DiTBlock(nn.Module):
    """Self-attention, cross-attention to the text, MLP; adaLN-Zero gates on the first and last; optionally
    Integrator Neurons at the end."""

    gradient_checkpointing = False  # True: recompute in backward (`checkpointed`); DiT's switch sets it

    def __init__(self, cfg: DiTConfig, moe: bool = False):
        super().__init__()
        d, attn = cfg.hidden_size, dict(kv_heads=cfg.num_kv_heads, qk_norm=cfg.qk_norm)
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)  # adaLN supplies the affine
        self.attn = Attention(d, cfg.num_heads, **attn)
        if cfg.cross_attention:
            self.norm_cross = nn.LayerNorm(d, eps=1e-6)
            self.cross_attn = Attention(d, cfg.num_heads, cfg.text_dim, **attn)
        else:
            self.norm_cross = self.cross_attn = None
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.mlp = cfg.moe_layer() if moe else MLP(d, cfg.mlp_ratio)  # MoE: [B, N, D] -> [B, N, D] as the MLP
        self.adaLN_modulation, self.scale_shift_table = adaln_layers(cfg, 6)
        self.integrator = (IntegratorNeurons(d, cfg.integrator_iterations, cfg.integrator_mlp_ratio)
                           if cfg.integrator else None)

    @checkpointed
    def forward(self, x, c, text: TextEmbedding, rope=None, return_gates: bool = False):
        """x [B, N, D], c [B, D] (adaLN-single: t_block's [B, 6D]), text tokens [B, L, D_text] with mask
        [B, L] (None: no padding, and the cross-attention runs with no mask) -> [B, N, D]; with
        return_gates, also the Integrator's gates [B, T, N]."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = adaln(self, c, 6)  # 6 x [B, D]
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope=rope)
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.norm_cross(x), text.tokens, text.mask)
        x = x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        if self.integrator is None:
            return x
        x, gates = self.integrator(x, shift_mlp, scale_mlp)  # the MLP's modulation conditions it on c
        return (x, gates) if return_gates else x


class FinalLayer(nn.Module):
    """LN, modulated by c (shift, scale), then a linear map of each token to its p x p x C patch."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        d = cfg.hidden_size
        self.norm_final = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation, self.scale_shift_table = adaln_layers(cfg, 2)
        self.linear = nn.Linear(d, cfg.patch_size ** 2 * cfg.in_channels)

    def forward(self, x, c):
        shift, scale = adaln(self, c, 2)  # 2 x [B, D]
        return self.linear(modulate(self.norm_final(x), shift, scale))  # [B, N, p*p*C]


def init_dit_like(model: nn.Module):
    """DiT's initialisation of the parts every DiT-like model has: Xavier-uniform linear layers with zero
    biases, the patch embedding (x_embedder) as the linear map it is, N(0, 0.02) for the t and y embedders."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:  # the MoE router has none
                nn.init.zeros_(m.bias)
    w = model.x_embedder.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.zeros_(model.x_embedder.bias)
    for embedder in (model.t_embedder, model.y_embedder):
        nn.init.normal_(embedder[0].weight, std=0.02)
        nn.init.normal_(embedder[2].weight, std=0.02)


class DiT(BlockCheckpointing, nn.Module):
    """forward(x [B, C, H, W], t [B] in [0, 1], TextEmbedding(tokens [B, L, D_text], mask [B, L]))
    -> [B, C, H, W]. H and W may be any multiples of patch_size."""

    def __init__(self, config: DiTConfig | None = None):
        super().__init__()
        self.config = cfg = config or DiTConfig()
        d, p = cfg.hidden_size, cfg.patch_size
        # A p x p convolution with stride p = one linear map applied to each flattened patch.
        self.x_embedder = nn.Conv2d(cfg.in_channels, d, kernel_size=p, stride=p)
        f = cfg.frequency_embedding_size
        self.t_embedder = nn.Sequential(nn.Linear(f, d), nn.SiLU(), nn.Linear(d, d))
        self.y_embedder = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.SiLU(), nn.Linear(d, d))
        # adaLN-single: one modulation MLP for every block, c [B, D] -> [B, 6D]
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d)) if cfg.adaln_single else None
        self.mixer = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.mixer_depth))  # on all tokens
        self.blocks = nn.ModuleList(DiTBlock(cfg, cfg.is_moe(i)) for i in range(cfg.depth))
        self.final_layer = FinalLayer(cfg)
        self._positions: dict = {}  # (h, w, device) -> position embedding or RoPE table; never saved
        self.initialize_weights()

    def initialize_weights(self):
        """All initialisation in one place, as DiT's: Xavier-uniform linear layers with zero biases
        (the patch embedding as the linear map it is), N(0, 0.02) for the t and y embedders, and
        zeros for every adaLN modulation, the cross-attention output and the final layer. adaLN-single
        as PixArt-alpha: N(0, 0.02) for t_block, N(0, 1/D) for the tables. Integrator Neurons: zeros
        for the refinement's output layer."""
        init_dit_like(self)
        blocks = [*self.mixer, *self.blocks]
        modulated = [*blocks, self.final_layer]
        zeroed = [layer.adaLN_modulation[-1] for layer in modulated if layer.adaLN_modulation is not None]
        zeroed += [block.cross_attn.out for block in blocks if block.cross_attn is not None]
        zeroed += [block.integrator.refine[-1] for block in blocks if block.integrator is not None]
        zeroed += [self.final_layer.linear]
        for layer in zeroed:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        if self.t_block is not None:
            nn.init.normal_(self.t_block[1].weight, std=0.02)
            for layer in modulated:
                nn.init.normal_(layer.scale_shift_table, std=self.config.hidden_size ** -0.5)

    def fsdp_units(self) -> list[nn.Module]:
        """The modules FSDP shards one by one (train/distributed.py): the blocks, the patch-mixer's first."""
        return [*self.mixer, *self.blocks]

    def positions(self, h: int, w: int, device) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """For an h x w grid of patches: the sin-cos embedding [h*w, D], or RoPE's (cos, sin)."""
        key = (h, w, str(device))
        if key not in self._positions:
            # Built outside inference mode: a cached inference tensor would break later training.
            with torch.inference_mode(False):
                self._positions[key] = self._make_positions(h, w, device)
        return self._positions[key]

    def build_positions(self, input_size: int | tuple[int, int] | None = None):
        """Fill the position cache for latents of input_size (default: the config's) on the model's
        device. Call it before the first call of a torch.compile'd model: a compiled forward that
        fills the cache itself has changed what it was traced with, and is traced again at its next call."""
        cfg = self.config
        height, width = latent_grid(cfg.input_size if input_size is None else input_size, cfg.patch_size)
        self.positions(height // cfg.patch_size, width // cfg.patch_size, self.x_embedder.weight.device)

    def _make_positions(self, h: int, w: int, device):
        cfg, p = self.config, self.config.patch_size
        scale = (cfg.input_size[0] / p / h, cfg.input_size[1] / p / w) if cfg.pos_interpolation else (1.0, 1.0)
        if cfg.pos_embed == "rope":
            return tuple(t.to(device) for t in rope_2d(h, w, cfg.head_dim, cfg.rope_theta, scale))
        return sincos_2d(h, w, cfg.hidden_size, scale).to(device)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """nn.Module's, with a clear error for weights of a DiT with or without a patch-mixer, experts,
        adaLN-single or Integrator Neurons where this one differs."""
        for part, field_name, what in (("mixer.", "mixer_depth", "a patch-mixer"),
                                       ("mlp.router.", "num_experts", "MoE layers"),
                                       ("t_block.", "adaln_single", "adaLN-single"),
                                       ("integrator.", "integrator", "Integrator Neurons")):
            saved = any(k.startswith(part) or f".{part}" in k for k in state_dict)
            ours = any(k.startswith(part) or f".{part}" in k for k in self.state_dict())
            if strict and saved != ours:
                raise ValueError(f"These weights come from a DiT {'with' if saved else 'without'} {what}, and this "
                                 f"one is {'without' if saved else 'with'}: build the DiT with the checkpoint's "
                                 f"config ({field_name} as saved in its config.json).")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def check_inputs(self, x: torch.Tensor, t: torch.Tensor, text: TextEmbedding):
        """Shapes and dtypes only: no look at the values, so no sync with the host and no graph break
        under torch.compile. That every caption has a real token (else attention is NaN) is checked
        where masks are made, once per batch of prompts (`text.base.check_mask`)."""
        cfg, p = self.config, self.config.patch_size
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"Expected latents [B, {cfg.in_channels}, H, W], got {tuple(x.shape)}.")
        if x.shape[2] % p or x.shape[3] % p:
            raise ValueError(f"Latent size {tuple(x.shape[2:])} is not divisible by the patch size {p}.")
        tokens, mask = text
        if tokens.ndim != 3 or tokens.shape[2] != cfg.text_dim:
            raise ValueError(f"Expected text tokens [B, L, {cfg.text_dim}], got {tuple(tokens.shape)}.")
        check_text_mask(tokens, mask)
        if t.shape != (x.shape[0],) or tokens.shape[0] != x.shape[0]:
            raise ValueError(f"Batch sizes differ: x {x.shape[0]}, t {tuple(t.shape)}, "
                             f"text {tokens.shape[0]}.")

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: TextEmbedding, keep: torch.Tensor | None = None,
                return_gates: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x_t [B, C, H, W], noise level t [B] in [0, 1], caption tokens -> F(x_t) [B, C, H, W].

        keep [B, K] (`masking.random_keep`): the blocks after the mixer see only these tokens; the
        masked patches' output is the final layer's on zero tokens, meaningless (the loss skips them).
        return_gates (integrator=True): (F(x_t), the Integrator gates [B, blocks, T, N]), blocks being the
        mixer's then the others, N in raster order (`integrator.compute_fractions`)."""
        self.check_inputs(x, t, text)
        if keep is not None and (keep.ndim != 2 or keep.shape[0] != x.shape[0]):
            raise ValueError(f"keep must hold [B, K] token indices for B = {x.shape[0]}, got {tuple(keep.shape)}.")
        if return_gates and (not self.config.integrator or keep is not None):
            raise ValueError("return_gates needs a DiT built with integrator=True, run on all tokens (keep=None); "
                             f"got integrator={self.config.integrator}, keep {'given' if keep is not None else None}.")
        cfg, p = self.config, self.config.patch_size
        b, c_in, height, width = x.shape
        h, w = height // p, width // p
        tokens = self.x_embedder(x).flatten(2).transpose(1, 2)  # [B, D, h, w] -> [B, N = h*w, D]
        pos = self.positions(h, w, x.device)
        rope = pos if cfg.pos_embed == "rope" else None
        if rope is None:
            tokens = tokens + pos.to(tokens.dtype)  # + [N, D]

        # Conditioning c = t_emb + y_emb, y = the mean of the real caption tokens.
        dtype = self.t_embedder[0].weight.dtype
        t_emb = self.t_embedder(timestep_embedding(t, cfg.frequency_embedding_size).to(dtype))  # [B, D]
        c = t_emb + self.y_embedder(masked_mean(text).to(dtype))  # [B, D_text] -> [B, D]
        c_blocks = c if self.t_block is None else self.t_block(c)  # adaLN-single: [B, D] -> [B, 6D], shared

        gates = [] if return_gates else None
        tokens = self.run_blocks(self.mixer, tokens, c_blocks, text, rope, gates)  # [B, N, D]
        if keep is not None:
            tokens = take_tokens(tokens, keep)  # [B, K, D]
            if rope is not None:
                rope = tuple(r[keep][:, None] for r in rope)  # each [B, 1, K, head_dim]
        tokens = self.run_blocks(self.blocks, tokens, c_blocks, text, rope, gates)  # [B, K or N, D]
        if keep is not None:
            tokens = restore_tokens(tokens, keep, h * w)  # [B, N, D]
        out = self.final_layer(tokens, c)  # [B, N, p*p*C]
        out = out.reshape(b, h, w, p, p, c_in)  # [B, h, w, p, p, C]
        out = torch.einsum("bhwpqc->bchpwq", out).reshape(b, c_in, height, width)  # [B, C, H, W]
        return (out, torch.stack(gates, dim=1)) if return_gates else out  # gates [B, blocks, T, N]

    def run_blocks(self, blocks: nn.ModuleList, tokens, c, text, rope, gates: list | None = None):
        """tokens [B, N, D] through `blocks`; each block's Integrator gates [B, T, N] appended to `gates` if given."""
        for block in blocks:
            if gates is None:
                tokens = block(tokens, c, text, rope)  # [B, N, D]
            else:
                tokens, block_gates = block(tokens, c, text, rope, return_gates=True)
                gates.append(block_gates)
        return tokens


# ----------------------------------------------------------------------------- cost
@dataclass(frozen=True)
class DiTCost:
    """Parameters (all, and active: used per token) and forward FLOPs per image, by part (`dit_cost`)."""

    params: int
    active_params: int
    flops_by_part: dict[str, int]

    @property
    def flops(self) -> int:
        return sum(self.flops_by_part.values())

    @property
    def gflops(self) -> float:
        return self.flops / 1e9


def _block_flops(cfg: DiTConfig, n: int, ell: int, moe: bool) -> dict[str, float]:
    """Forward FLOPs of one block on n image tokens and ell caption tokens (see `dit_cost`)."""
    d, dt = cfg.hidden_size, cfg.text_dim
    k = d * (cfg.num_kv_heads or cfg.num_heads) // cfg.num_heads
    m = int(d * cfg.mlp_ratio)
    flops = {
        "adaLN": 0 if cfg.adaln_single else 2 * d * 6 * d,  # adaLN-single: a table, added (elementwise)
        "self_attn_proj": 2 * n * (d * d + d * 2 * k + d * d),
        "self_attn_sdpa": 2 * 2 * n * n * d,
        "cross_attn_proj": 2 * (n * d * d + ell * dt * 2 * k + n * d * d),
        "cross_attn_sdpa": 2 * 2 * n * ell * d,
    }
    if not cfg.cross_attention:
        flops["cross_attn_proj"] = flops["cross_attn_sdpa"] = 0
    if not moe:
        flops["mlp"] = 2 * 2 * n * d * m
    else:  # the experts process E * C slots of each image; the router scores every token
        slots = cfg.num_experts * _capacity(cfg, n)
        flops["moe_experts"] = 2 * 2 * slots * d * m
        flops["moe_router"] = 2 * n * d * cfg.num_experts
    if cfg.integrator:  # every step runs for every token: T gate MLPs and T refinement MLPs
        g, r = int(d * GATE_RATIO), int(d * cfg.integrator_mlp_ratio)
        flops["integrator"] = cfg.integrator_iterations * (2 * n * (d * g + g) + 2 * 2 * n * d * r)
    return flops


def _capacity(cfg: DiTConfig, n: int) -> int:
    with torch.device("meta"):
        return cfg.moe_layer().capacity(n)


def dit_cost(config: DiTConfig, input_size: int | tuple[int, int] | None = None,
             text_len: int = 16, mask_ratio: float = 0.0) -> DiTCost:
    """Parameters, and the FLOPs of one image's forward pass at `input_size` (default the config's)
    with `text_len` caption tokens, computed from the config; with `mask_ratio`, the blocks after the
    patch-mixer see K = round(N (1 - mask_ratio)) tokens (models/masking.py).

    Parameters are counted on a model built on the meta device (no memory, no arithmetic). FLOPs
    count every matrix multiply and the patch convolution at 2 FLOPs per multiply-add, as
    `torch.utils.flop_counter.FlopCounterMode` does; elementwise work (norms, softmax, GELU, SiLU,
    modulation, RoPE, pooling, routing's top-k) is left out by both. With n tokens in a block, L
    caption tokens, width D, text width D_t, K = D * num_kv_heads / num_heads, M = int(D * mlp_ratio):

        self-attention projections  2n(D*D + D*2K + D*D)     attention  2 * 2 n n D
        cross-attention projections 2(n D*D + L D_t*2K + n D*D)  attention  2 * 2 n L D
        MLP                         2 * 2 n D M               adaLN      2 D * 6D
        MoE (instead of the MLP)    2 * 2 (E C) D M  +  router 2 n D E
        Integrator Neurons          T (2n(D G + G) + 2 * 2 n D R),  G = int(D / 4), R = int(D integrator_mlp_ratio)

    where E C is the slots the experts fill: capacity_factor * n for expert choice (exactly), and up to
    capacity_factor * top_k * n for token choice (counted full: empty slots are computed too).
    Active parameters count the experts a token passes through on average (capacity_factor for expert
    choice, top_k for token choice) instead of all E. With adaLN-single, the blocks' adaLN is a table
    (no FLOPs) and "adaLN" is the shared t_block's 2 D * 6D, once; the final layer's modulation is a
    table too. Integrator Neurons are counted at all T steps, which they always compute (soft gates).

    Note DiT's paper (Table 4) reports multiply-adds as "Gflops": DiT-XL/2 at 32x32 latents
    (without cross-attention) is 118.6 there and 2 x 118.6 here.
    """
    cfg = dataclasses.replace(config, input_size=input_size or config.input_size)
    (height, width), p = cfg.input_size, cfg.patch_size
    d, dt = cfg.hidden_size, cfg.text_dim
    n = (height // p) * (width // p)
    kept = n if mask_ratio == 0 else num_kept(n, mask_ratio)
    flops = {"patch_embed": 2 * n * d * cfg.in_channels * p * p,
             "t_y_embedders": 2 * (cfg.frequency_embedding_size * d + d * d + dt * d + d * d)}
    blocks = [(n, False)] * cfg.mixer_depth + [(kept, cfg.is_moe(i)) for i in range(cfg.depth)]
    for tokens, moe in blocks:
        for part, f in _block_flops(cfg, tokens, text_len, moe).items():
            flops[part] = flops.get(part, 0) + f
    if cfg.adaln_single:
        flops["adaLN"] = 2 * d * 6 * d  # t_block, shared by all blocks
    final_adaln = 0 if cfg.adaln_single else 2 * d * 2 * d
    flops["final_layer"] = final_adaln + 2 * n * d * p * p * cfg.in_channels
    with torch.device("meta"):
        model = DiT(cfg)
    params = sum(t.numel() for t in model.parameters())
    m = int(d * cfg.mlp_ratio)
    per_expert = d * m + m + m * d + d  # w1, b1, w2, b2 of one expert
    used = cfg.capacity_factor if cfg.routing == "expert_choice" else cfg.top_k
    moe_blocks = sum(cfg.is_moe(i) for i in range(cfg.depth))
    active = params - round(moe_blocks * (cfg.num_experts - used) * per_expert)
    return DiTCost(params, active, {part: int(f) for part, f in flops.items()})

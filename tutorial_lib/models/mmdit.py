"""Notebook 07's joint-attention denoiser: MMDiT double-stream blocks and Flux single-stream blocks.

MMDiT (Esser et al., 2024, "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis",
Stable Diffusion 3) drops the DiT's cross-attention: the caption tokens become a second sequence that
runs through the transformer beside the image tokens, and the two meet in one attention over their
concatenation. FLUX.1 (Black Forest Labs, 2024) keeps SD3's blocks for its first layers and then
merges the two streams into one. This file builds both, as Flux stacks them:

    image tokens  img [B, N, D]: the latent x [B, C, H, W] cut into N = (H/p)(W/p) patches of p x p
    text tokens   txt [B, L, D]: the caption tokens [B, L, D_text] through one linear map
    condition     c [B, D] = t_emb(t) + y_emb(pooled caption)

    depth double-stream blocks: each stream has its own weights (adaLN modulation, QKV, QK-norm,
      output projection, MLP); only the attention is shared. With (shift, scale, gate) of each stream,

          q, k, v = cat_seq(QKV_txt(modulate(LN(txt))), QKV_img(modulate(LN(img))))
          a_txt, a_img = split(Attention(q, k, v))          # over all L + N tokens
          img = img + gate_msa * Proj_img(a_img);  img = img + gate_mlp * MLP_img(modulate(LN(img)))
          (the same for txt with its own weights)

    depth_single_blocks single-stream blocks on x = [txt; img] [B, L + N, D]: one set of weights
      for both, attention and MLP in parallel from one fused input projection (parallel layers as in
      ViT-22B, Dehghani et al., 2023):

          q, k, v, u = split(linear1(modulate(LN(x), shift, scale)))
          x = x + gate * linear2(cat(Attention(q, k, v), GELU(u)))

    final layer on the image tokens only, as the DiT's: LN modulated by c, a linear map to each patch.

Choices, each as Flux's unless said:
- QK-norm: an RMSNorm of each head's queries and keys before their dot product (`layers.qk_norm_layer`).
- Positions: 2D RoPE on the image tokens (`layers.rope_2d`: half of each head's channel pairs rotated
  by the row, half by the column); the text tokens sit at position (0, 0), which rotates nothing, as
  Flux's txt_ids = 0. No position is added to the tokens.
- Caption mask: padding tokens are hidden from every query as keys, in every block, and left out of
  the pooled vector; so what sits behind the mask never reaches the image tokens. Image tokens are
  never masked, and a batch without padding (mask None) runs with no attention mask at all
  (`joint_mask`), so that SDPA may take flash attention.
- Pooled caption vector (ours): `TextEmbedding` has no pooled vector (Flux takes CLIP's beside its T5
  tokens), so y is the masked mean of the caption tokens, as in the course's DiT: the same for
  every encoder, and the null caption "" pools to a real vector.
- No guidance embedding (FLUX.1 [dev] is guidance-distilled): guidance here is classifier-free, at
  sampling (diffusion/guidance.py).
- adaLN-Zero initialisation (Peebles & Xie, 2023): every modulation and the final layer start at zero,
  so every block starts as the identity and a fresh model outputs exactly 0, the parametrization's
  "no correction" (see models/dit.py).

`from_flux` builds this model from a diffusers `FluxTransformer2DModel` of a matching shape (and
`flux_config` gives that shape), so that a test can show both compute the same function.

Written for this course from the papers and from reading diffusers' transformer_flux.py (Apache-2.0);
block and stream names (img, txt, linear1, linear2) follow Black Forest Labs' reference code.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..text.base import TextEmbedding, masked_mean
from .dit import (BlockCheckpointing, DiT, DiTConfig, DiTCost, FinalLayer, checkpointed, init_dit_like,
                  latent_grid)
from .layers import MLP, apply_rope, modulate, qk_norm_layer, rope_2d, timestep_embedding


@dataclass
class MMDiTConfig:
    """An MMDiT's shape. Latent and width fields are named as the DiT's (`dit.DiTConfig`)."""

    in_channels: int = 4  # latent channels C; the output has the same
    input_size: tuple[int, int] = (8, 8)  # the latent (H, W) it is meant for; any multiple of patch_size runs
    patch_size: int = 2  # p: each p x p patch of the latent is one token
    hidden_size: int = 128  # D, the token width of both streams
    depth: int = 2  # double-stream blocks (Flux's depth; diffusers' num_layers)
    depth_single_blocks: int = 1  # single-stream blocks, after the double-stream ones
    num_heads: int = 4
    mlp_ratio: float = 4.0
    text_dim: int = 128  # D_text of the caption tokens (the text encoder's width)
    rope_theta: float = 10_000.0
    frequency_embedding_size: int = 256  # width of the sinusoidal t embedding fed to t_embedder

    def __post_init__(self):
        self.input_size = latent_grid(self.input_size, self.patch_size)
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            raise ValueError(f"2D RoPE needs hidden_size / num_heads to be a whole head dimension divisible "
                             f"by 4, got {self.hidden_size} / {self.num_heads}.")
        if self.depth < 0 or self.depth_single_blocks < 0 or self.depth + self.depth_single_blocks == 0:
            raise ValueError(f"Need depth >= 0 and depth_single_blocks >= 0, not both 0, got {self.depth} "
                             f"and {self.depth_single_blocks}.")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


# Named sizes. "tiny" trains on a laptop CPU (notebook 07): 2 double- and 1 single-stream blocks at the
# tiny DiT's width, for its parameters (1.571M against 1.572M) and 1.15x its FLOPs per image at 16
# caption tokens, since here the caption tokens pass through every projection and MLP (`mmdit_cost`).
# MMDiT-S/2 and -B/2 have DiT-S and DiT-B's widths and heads and Flux's 1:2 ratio of double- to
# single-stream blocks (4 + 8): 39.8M and 158.7M parameters. "FLUX.1" has FLUX.1's widths (3072 wide,
# 24 heads of 128, 19 + 38 blocks) on its 16-channel latents of 1024 px (128 x 128) read from T5-XXL's
# 4096-wide tokens: 11.9B parameters, FLUX.1 [dev]'s less its guidance embedder, with a pooled vector
# 4096 wide instead of CLIP's 768 (tests/test_mmdit.py).
PRESETS: dict[str, MMDiTConfig] = {
    "tiny": MMDiTConfig(),
    "MMDiT-S/2": MMDiTConfig(hidden_size=384, num_heads=6, depth=4, depth_single_blocks=8),
    "MMDiT-B/2": MMDiTConfig(hidden_size=768, num_heads=12, depth=4, depth_single_blocks=8),
    "FLUX.1": MMDiTConfig(in_channels=16, input_size=(128, 128), hidden_size=3072, num_heads=24, depth=19,
                          depth_single_blocks=38, text_dim=4096),
}


def preset(name: str, **overrides) -> MMDiTConfig:
    """A fresh copy of the named config, with `overrides` (any MMDiTConfig field) applied."""
    if name not in PRESETS:
        raise ValueError(f"Unknown MMDiT preset {name!r}; choose one of {', '.join(PRESETS)}.")
    return dataclasses.replace(PRESETS[name], **overrides)


def split_heads(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, S, 3D] (q, k, v side by side) -> q, k, v, each [B, heads, S, D / heads]."""
    b, s, _ = qkv.shape
    return qkv.view(b, s, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


def joint_attention(q, k, v, rope, mask) -> torch.Tensor:
    """Attention over all tokens of q, k, v [B, H, S, d]: RoPE (cos, sin [S, d]) on q and k, then
    softmax(q k^T / sqrt(d)) v with keys where mask [B, S] is False hidden (`joint_mask`; None: no
    key hidden, and SDPA may take flash attention). -> [B, S, H d]."""
    q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    attn_mask = None if mask is None else mask[:, None, None, :]  # [B, 1, 1, S]
    h = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # [B, H, S, d]
    return h.transpose(1, 2).flatten(2)  # [B, S, H d]


class QKNorm(nn.Module):
    """RMSNorm of each head's queries and keys (QK-norm, as SD3 and Flux; `layers.qk_norm_layer`)."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.q_norm, self.k_norm = qk_norm_layer("rms", head_dim), qk_norm_layer("rms", head_dim)

    def forward(self, q, k, v):
        return self.q_norm(q), self.k_norm(k), v


class Stream(nn.Module):
    """One modality's weights in a double-stream block: its modulation, QKV, output projection, MLP."""

    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        d = cfg.hidden_size
        self.heads = cfg.num_heads
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)  # adaLN supplies the affine
        self.qkv = nn.Linear(d, 3 * d)
        self.qk_norm = QKNorm(cfg.head_dim)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(d, cfg.mlp_ratio)

    def attention_input(self, x, mod):
        """x [B, S, D] -> q, k, v [B, H, S, d], from modulate(LN(x), shift_msa, scale_msa)."""
        shift_msa, scale_msa = mod[:2]
        return self.qk_norm(*split_heads(self.qkv(modulate(self.norm1(x), shift_msa, scale_msa)), self.heads))

    def update(self, x, attn, mod):
        """The gated residuals: x [B, S, D] plus this stream's share attn [B, S, D] of the attention, then its MLP."""
        gate_msa, shift_mlp, scale_mlp, gate_mlp = mod[2:]
        x = x + gate_msa[:, None] * self.proj(attn)
        return x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class DoubleStreamBlock(nn.Module):
    """MMDiT's block (SD3; Flux's first blocks): separate weights per stream, one joint attention."""

    gradient_checkpointing = False  # True: recompute in backward (dit.checkpointed); MMDiT's switch sets it

    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        self.txt, self.img = Stream(cfg), Stream(cfg)

    @checkpointed
    def forward(self, txt, img, c, rope, mask):
        """txt [B, L, D], img [B, N, D], c [B, D], rope over L + N tokens, mask [B, L + N] -> txt, img."""
        txt_mod = self.txt.adaLN_modulation(c).chunk(6, dim=1)  # 6 x [B, D]
        img_mod = self.img.adaLN_modulation(c).chunk(6, dim=1)
        qkv = zip(self.txt.attention_input(txt, txt_mod), self.img.attention_input(img, img_mod))
        q, k, v = (torch.cat(pair, dim=2) for pair in qkv)  # each [B, H, L + N, d]
        txt_attn, img_attn = joint_attention(q, k, v, rope, mask).split([txt.shape[1], img.shape[1]], dim=1)
        return self.txt.update(txt, txt_attn, txt_mod), self.img.update(img, img_attn, img_mod)


class SingleStreamBlock(nn.Module):
    """Flux's single-stream block on [txt; img]: parallel attention and MLP from one fused projection."""

    gradient_checkpointing = False  # as DoubleStreamBlock's

    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        d, self.heads = cfg.hidden_size, cfg.num_heads
        self.mlp_hidden = int(d * cfg.mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 3 * d))
        self.norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.linear1 = nn.Linear(d, 3 * d + self.mlp_hidden)  # q, k, v and the MLP's hidden layer
        self.qk_norm = QKNorm(cfg.head_dim)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.linear2 = nn.Linear(d + self.mlp_hidden, d)  # attention output and MLP hidden -> D

    @checkpointed
    def forward(self, x, c, rope, mask):
        """x [B, L + N, D], c [B, D], rope over L + N tokens, mask [B, L + N] -> [B, L + N, D]."""
        shift, scale, gate = self.adaLN_modulation(c).chunk(3, dim=1)  # 3 x [B, D]
        qkv, u = self.linear1(modulate(self.norm(x), shift, scale)).split([x.shape[2] * 3, self.mlp_hidden], dim=2)
        attn = joint_attention(*self.qk_norm(*split_heads(qkv, self.heads)), rope, mask)  # [B, L + N, D]
        return x + gate[:, None] * self.linear2(torch.cat([attn, self.mlp_act(u)], dim=2))


class MMDiT(BlockCheckpointing, nn.Module):
    """forward(x [B, C, H, W], t [B] in [0, 1], TextEmbedding(tokens [B, L, D_text], mask [B, L]))
    -> [B, C, H, W]. H and W may be any multiples of patch_size."""

    check_inputs = DiT.check_inputs  # the same fields, the same checks and messages

    def __init__(self, config: MMDiTConfig | None = None):
        super().__init__()
        self.config = cfg = config or MMDiTConfig()
        d, p, f = cfg.hidden_size, cfg.patch_size, cfg.frequency_embedding_size
        # A p x p convolution with stride p = one linear map of each flattened (C, p, p) patch.
        self.x_embedder = nn.Conv2d(cfg.in_channels, d, kernel_size=p, stride=p)
        self.context_embedder = nn.Linear(cfg.text_dim, d)
        self.t_embedder = nn.Sequential(nn.Linear(f, d), nn.SiLU(), nn.Linear(d, d))
        self.y_embedder = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(cfg) for _ in range(cfg.depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(cfg) for _ in range(cfg.depth_single_blocks))
        self.final_layer = FinalLayer(DiTConfig(in_channels=cfg.in_channels, input_size=cfg.input_size,
                                                patch_size=p, hidden_size=d, num_heads=cfg.num_heads))  # the DiT's
        self._rope: dict = {}  # (h, w, device) -> the image tokens' RoPE (cos, sin); never saved
        self.initialize_weights()

    def initialize_weights(self):
        """As the DiT's: Xavier-uniform linear layers (the patch embedding too) with zero biases,
        N(0, 0.02) for the t and y embedders, zeros for every adaLN modulation and the final layer."""
        init_dit_like(self)
        streams = [s for block in self.double_blocks for s in (block.txt, block.img)]
        zeroed = [m.adaLN_modulation[-1] for m in [*streams, *self.single_blocks, self.final_layer]]
        for layer in [*zeroed, self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def fsdp_units(self) -> list[nn.Module]:
        """The modules FSDP shards one by one (train/distributed.py): the double-stream blocks, then the single."""
        return [*self.double_blocks, *self.single_blocks]

    def rope(self, text_len: int, h: int, w: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE (cos, sin), each [L + N, head_dim], for L text tokens at (0, 0) then an h x w grid."""
        key = (h, w, str(device))
        if key not in self._rope:
            # Built outside inference mode: a cached inference tensor would break later training.
            with torch.inference_mode(False):
                cos, sin = rope_2d(h, w, self.config.head_dim, self.config.rope_theta)
                self._rope[key] = cos.to(device), sin.to(device)
        cos, sin = self._rope[key]
        return F.pad(cos, (0, 0, text_len, 0), value=1.0), F.pad(sin, (0, 0, text_len, 0))  # angle 0

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: TextEmbedding) -> torch.Tensor:
        """x_t [B, C, H, W], noise level t [B] in [0, 1], caption tokens -> F(x_t) [B, C, H, W]."""
        self.check_inputs(x, t, text)
        cfg, p = self.config, self.config.patch_size
        b, c_in, height, width = x.shape
        h, w = height // p, width // p
        dtype = self.t_embedder[0].weight.dtype
        img = self.x_embedder(x).flatten(2).transpose(1, 2)  # [B, D, h, w] -> [B, N = h*w, D]
        txt = self.context_embedder(text.tokens.to(dtype))  # [B, L, D_text] -> [B, L, D]
        # Conditioning c = t_emb + y_emb, y = the mean of the real caption tokens.
        t_emb = self.t_embedder(timestep_embedding(t, cfg.frequency_embedding_size).to(dtype))  # [B, D]
        c = t_emb + self.y_embedder(masked_mean(text).to(dtype))  # [B, D_text] -> [B, D]
        text_len = txt.shape[1]
        rope = self.rope(text_len, h, w, x.device)  # 2 x [L + N, head_dim]
        mask = joint_mask(text.mask, h * w)  # [B, L + N] or None

        for block in self.double_blocks:
            txt, img = block(txt, img, c, rope, mask)  # [B, L, D], [B, N, D]
        tokens = torch.cat([txt, img], dim=1)  # [B, L + N, D]
        for block in self.single_blocks:
            tokens = block(tokens, c, rope, mask)  # [B, L + N, D]
        out = self.final_layer(tokens[:, text_len:], c)  # [B, N, C*p*p], each patch (C, p, p) as Flux packs it
        out = out.reshape(b, h, w, c_in, p, p)  # [B, h, w, C, p, p]
        return torch.einsum("bhwcpq->bchpwq", out).reshape(b, c_in, height, width)  # [B, C, H, W]


def joint_mask(text_mask: torch.Tensor | None, num_image_tokens: int) -> torch.Tensor | None:
    """The keys the joint attention may see, [B, L + N]: the caption's mask [B, L], then the N image
    tokens, which are never padding. None when the captions have no padding (text_mask None, decided
    where the mask was made: `text.base.padding_mask`), so that no all-True mask reaches SDPA."""
    if text_mask is None:
        return None
    return torch.cat([text_mask, text_mask.new_ones(len(text_mask), num_image_tokens)], dim=1)


# ----------------------------------------------------------------------------- cost
def mmdit_cost(config: MMDiTConfig, input_size: int | tuple[int, int] | None = None,
               text_len: int = 16) -> DiTCost:
    """Parameters, and the FLOPs of one image's forward pass at `input_size` (default the config's) with
    `text_len` caption tokens, counted as `dit.dit_cost` counts them (matrix multiplies and the patch
    convolution at 2 FLOPs per multiply-add, as FlopCounterMode; no elementwise work). With n image
    tokens, L caption tokens, S = n + L, width D, text width D_t, M = int(D * mlp_ratio):

        double-stream block  adaLN 2 * 2 D*6D   QKV 2S D*3D   out 2S D*D   MLP 2 * 2S D M   attention 2 * 2S S D
        single-stream block  adaLN 2 D*3D   linear1 2S D(3D + M)   linear2 2S (D + M) D     attention 2 * 2S S D
        embedders            patches 2n D C p^2   captions 2L D_t D   t, y 2(256 D + D D + D_t D + D D)
        final layer          2 D*2D + 2n D p^2 C
    """
    cfg = dataclasses.replace(config, input_size=input_size or config.input_size)
    (height, width), p = cfg.input_size, cfg.patch_size
    d, dt, m, ell = cfg.hidden_size, cfg.text_dim, int(cfg.hidden_size * cfg.mlp_ratio), text_len
    n = (height // p) * (width // p)
    s = n + ell
    attention = 2 * 2 * s * s * d
    double = {"double_adaLN": 2 * 2 * d * 6 * d, "double_qkv": 2 * s * d * 3 * d, "double_out": 2 * s * d * d,
              "double_mlp": 2 * 2 * s * d * m, "double_sdpa": attention}
    single = {"single_adaLN": 2 * d * 3 * d, "single_linear1": 2 * s * d * (3 * d + m),
              "single_linear2": 2 * s * (d + m) * d, "single_sdpa": attention}
    flops = {"patch_embed": 2 * n * d * cfg.in_channels * p * p, "context_embedder": 2 * ell * dt * d,
             "t_y_embedders": 2 * (cfg.frequency_embedding_size * d + d * d + dt * d + d * d)}
    flops.update({part: cfg.depth * f for part, f in double.items()})
    flops.update({part: cfg.depth_single_blocks * f for part, f in single.items()})
    flops["final_layer"] = 2 * d * 2 * d + 2 * n * d * p * p * cfg.in_channels
    with torch.device("meta"):
        params = sum(t.numel() for t in MMDiT(cfg).parameters())
    return DiTCost(params, params, {part: int(f) for part, f in flops.items()})


# ----------------------------------------------------------------------------- diffusers' Flux
def flux_config(config: MMDiTConfig) -> dict:
    """The `diffusers.FluxTransformer2DModel` arguments of the same shape as `config`.

    Flux's pipeline packs each 2 x 2 patch of the latent into one token of 4C channels before the
    transformer (whose own patch_size is then 1), in the (C, 2, 2) order our patch convolution reads.
    Its RoPE has three axes (index, row, column; FLUX.1's are 16, 56, 56 channels of 128); ours rotates
    every channel, half by row and half by column, so the first axis gets 0 channels. Its pooled vector
    has the caption tokens' width, since ours is their masked mean.
    """
    if config.patch_size != 2 or config.mlp_ratio != 4.0:
        raise ValueError(f"diffusers' Flux packs 2 x 2 patches and has MLPs 4 times as wide; this config has "
                         f"patch_size {config.patch_size} and mlp_ratio {config.mlp_ratio}.")
    half = config.head_dim // 2
    return dict(patch_size=1, in_channels=4 * config.in_channels, num_layers=config.depth,
                num_single_layers=config.depth_single_blocks, attention_head_dim=config.head_dim,
                num_attention_heads=config.num_heads, joint_attention_dim=config.text_dim,
                pooled_projection_dim=config.text_dim, guidance_embeds=False, axes_dims_rope=(0, half, half))


def _rope_order(head_dim: int) -> torch.Tensor:
    """Flux's RoPE rotates channel pairs (2i, 2i + 1) of a head, `layers.apply_rope` pairs (i, i + d/2),
    with the same angles in the same order: channel i here is Flux's channel order[i] (evens, then odds)."""
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])


def from_flux_state_dict(state_dict: dict[str, torch.Tensor], config: MMDiTConfig) -> dict[str, torch.Tensor]:
    """A diffusers `FluxTransformer2DModel` state dict (of the shape `flux_config(config)`) as this
    model's. Besides renaming: q, k, v (and the single blocks' MLP input) are fused into one weight;
    the rows of q and k and the QK-norm weights are reordered per head for our RoPE's channel pairs
    (`_rope_order`: q.k is unchanged when q and k permute their channels alike); the patch embedding
    becomes a convolution; AdaLayerNormContinuous's (scale, shift) become our final layer's (shift, scale).
    Keys left over (a guidance embedder, IP-adapter layers) are an error."""
    sd, out = dict(state_dict), {}
    heads, hd, d = config.num_heads, config.head_dim, config.hidden_size
    order = (torch.arange(heads)[:, None] * hd + _rope_order(hd)).flatten()  # over the H * hd rows of q or k

    def take(*names: str) -> list[torch.Tensor]:
        missing = [n for n in names if n not in sd]
        if missing:
            raise ValueError(f"Not a Flux state dict of this shape: no {', '.join(missing)}.")
        return [sd.pop(n) for n in names]

    def linear(ours: str, theirs: str | list[str], rope_rows: int = 0):
        """ours.weight/bias from theirs (several: stacked along the outputs); the first rope_rows
        projections (q, then k) reordered for RoPE."""
        for kind in ("weight", "bias"):
            parts = take(*[f"{name}.{kind}" for name in ([theirs] if isinstance(theirs, str) else theirs)])
            parts = [x[order] if i < rope_rows else x for i, x in enumerate(parts)]
            out[f"{ours}.{kind}"] = torch.cat(parts)

    def qk_norm(ours: str, q: str, k: str):
        out[f"{ours}.q_norm.weight"], out[f"{ours}.k_norm.weight"] = (w[_rope_order(hd)] for w in
                                                                      take(f"{q}.weight", f"{k}.weight"))

    weight, bias = take("x_embedder.weight", "x_embedder.bias")
    out["x_embedder.weight"] = weight.view(d, config.in_channels, config.patch_size, config.patch_size)
    out["x_embedder.bias"] = bias
    linear("context_embedder", "context_embedder")
    for ours, theirs in (("t_embedder", "timestep_embedder"), ("y_embedder", "text_embedder")):
        linear(f"{ours}.0", f"time_text_embed.{theirs}.linear_1")
        linear(f"{ours}.2", f"time_text_embed.{theirs}.linear_2")
    for i in range(config.depth):
        a, b = f"transformer_blocks.{i}.attn", f"double_blocks.{i}"
        names = {"img": ("norm1", "to_q", "to_k", "to_v", "norm_q", "norm_k", "to_out.0", "ff"),
                 "txt": ("norm1_context", "add_q_proj", "add_k_proj", "add_v_proj", "norm_added_q",
                         "norm_added_k", "to_add_out", "ff_context")}
        for stream, (norm, q, k, v, norm_q, norm_k, proj, ff) in names.items():
            linear(f"{b}.{stream}.adaLN_modulation.1", f"transformer_blocks.{i}.{norm}.linear")
            linear(f"{b}.{stream}.qkv", [f"{a}.{q}", f"{a}.{k}", f"{a}.{v}"], rope_rows=2)
            qk_norm(f"{b}.{stream}.qk_norm", f"{a}.{norm_q}", f"{a}.{norm_k}")
            linear(f"{b}.{stream}.proj", f"{a}.{proj}")
            linear(f"{b}.{stream}.mlp.0", f"transformer_blocks.{i}.{ff}.net.0.proj")
            linear(f"{b}.{stream}.mlp.2", f"transformer_blocks.{i}.{ff}.net.2")
    for i in range(config.depth_single_blocks):
        theirs, b = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        linear(f"{b}.adaLN_modulation.1", f"{theirs}.norm.linear")
        linear(f"{b}.linear1", [f"{theirs}.attn.to_q", f"{theirs}.attn.to_k", f"{theirs}.attn.to_v",
                                f"{theirs}.proj_mlp"], rope_rows=2)
        qk_norm(f"{b}.qk_norm", f"{theirs}.attn.norm_q", f"{theirs}.attn.norm_k")
        linear(f"{b}.linear2", f"{theirs}.proj_out")
    for kind in ("weight", "bias"):
        scale, shift = take(f"norm_out.linear.{kind}")[0].chunk(2)
        out[f"final_layer.adaLN_modulation.1.{kind}"] = torch.cat([shift, scale])
    linear("final_layer.linear", "proj_out")
    if sd:
        raise ValueError(f"These Flux weights have parts with no counterpart here: {', '.join(sorted(sd)[:5])}"
                         f"{' ...' if len(sd) > 5 else ''} (a guidance-distilled Flux's guidance embedder, "
                         f"adapters). Load a Flux built with flux_config(config).")
    return out


def from_flux(flux, input_size: tuple[int, int] = (8, 8)) -> MMDiT:
    """The MMDiT computing what the diffusers `FluxTransformer2DModel` `flux` computes (given our pooled
    vector, the masked mean of the caption tokens, as its pooled_projections): for latents of input_size."""
    c = flux.config
    if c.patch_size != 1 or c.in_channels % 4 or (c.out_channels or c.in_channels) != c.in_channels:
        raise ValueError(f"Expected a Flux on packed 2 x 2 patches (patch_size 1, in_channels = out_channels "
                         f"= 4C), got patch_size {c.patch_size}, in_channels {c.in_channels}, "
                         f"out_channels {c.out_channels}.")
    config = MMDiTConfig(in_channels=c.in_channels // 4, input_size=input_size,
                         hidden_size=c.num_attention_heads * c.attention_head_dim, depth=c.num_layers,
                         depth_single_blocks=c.num_single_layers, num_heads=c.num_attention_heads,
                         text_dim=c.joint_attention_dim)
    expected, got = flux_config(config), {k: c[k] for k in ("pooled_projection_dim", "guidance_embeds")}
    got["axes_dims_rope"] = tuple(c.axes_dims_rope)
    differs = {k: (v, expected[k]) for k, v in got.items() if v != expected[k]}
    if differs:
        raise ValueError(f"This Flux differs from what the MMDiT computes in {', '.join(differs)} (got, "
                         f"needed): {differs}. Our pooled vector is the mean of the caption tokens, there is no "
                         f"guidance embedder, and our 2D RoPE rotates every channel by row or column.")
    model = MMDiT(config)
    model.load_state_dict(from_flux_state_dict(flux.state_dict(), config))
    return model

"""Mixture-of-Experts MLPs (models/moe.py) and the MoE DiT (notebook 06): both routings against
from-scratch loops, expert capacity, the unchosen and dropped fractions, the balancing loss, routing
within each image, bad configs, adaLN-Zero, gradients and activation checkpointing, the computed cost,
the routing metrics of the training loss, and masked MoE training under FSDP. Tiny widths, CPU."""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from tests.test_distributed import WORLD, spawn
from tests.test_dit import inputs, randomize, text, tiny
from tests.test_fsdp import run_config
from tutorial_lib.models.dit import PRESETS, DiT, DiTConfig, dit_cost
from tutorial_lib.models.masking import random_keep
from tutorial_lib.models.moe import ExpertChoiceMoE, TokenChoiceMoE, router_aux_loss
from tutorial_lib.text.base import TextEmbedding
from tutorial_lib.train import distributed
from tutorial_lib.train.text_to_image import Objective, diffusion_loss
from tutorial_lib.train.trainer import Trainer

D, M, E, N = 8, 16, 4, 12  # token width, expert hidden width, experts, tokens per image
ROUTINGS = ["expert_choice", "token_choice"]


def perturbed(layer):
    """The layer with nonzero biases too (they start at 0)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return layer


def tokens(b: int = 3, n: int = N, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, n, D, generator=torch.Generator().manual_seed(seed))


def expert(layer, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e's MLP on tokens x [T, D], read from the layer's batched weights: D -> M -> D, tanh-GELU."""
    ex = layer.experts
    return F.gelu(x @ ex.w1[e] + ex.b1[e], approximate="tanh") @ ex.w2[e] + ex.b2[e]


def probs(layer, x: torch.Tensor) -> torch.Tensor:
    """p [B, N, E]: softmax over experts of the router's scores."""
    return torch.softmax(x @ layer.router.weight.T, dim=-1)


def expert_choice_reference(layer, x):
    """(output, unchosen fraction): per image, each expert takes its top-C tokens by p."""
    b, n, _ = x.shape
    c = int(layer.capacity_factor * n / layer.num_experts)
    p, out, chosen = probs(layer, x), torch.zeros_like(x), torch.zeros(b, n, dtype=torch.bool)
    for i in range(b):
        for e in range(layer.num_experts):
            top = p[i, :, e].topk(c).indices
            out[i, top] += p[i, top, e, None] * expert(layer, e, x[i, top])
            chosen[i, top] = True
    return out, 1 - chosen.float().mean()


def token_choice_reference(layer, x):
    """(output, dropped fraction, aux loss): per image, first choices of all tokens (in token order),
    then second choices, ...; a pick that finds its expert full (C picks) is dropped."""
    b, n, _ = x.shape
    e_, k = layer.num_experts, layer.top_k
    c = math.ceil(layer.capacity_factor * k * n / e_)
    p, out = probs(layer, x), torch.zeros_like(x)
    dropped, picked = 0, torch.zeros(e_)
    for i in range(b):
        gates, picks = p[i].topk(k, dim=-1)  # [N, k]
        load = [0] * e_
        for j in range(k):
            for t in range(n):
                e = int(picks[t, j])
                picked[e] += 1
                if load[e] < c:
                    load[e] += 1
                    out[i, t] += gates[t, j] * expert(layer, e, x[i, t:t + 1])[0]
                else:
                    dropped += 1
    f = picked / (b * n * k)  # share of picks per expert
    aux = layer.aux_loss_coef * e_ * (f * p.mean(dim=(0, 1))).sum()
    return out, dropped / (b * n * k), aux


# ----------------------------------------------------------------------------- the layers
@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 2.0, 4.0])
def test_expert_choice_matches_a_loop(capacity_factor):
    torch.manual_seed(0)
    layer, x = perturbed(ExpertChoiceMoE(D, M, E, capacity_factor)), tokens()
    expected, unchosen = expert_choice_reference(layer, x)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected)
    assert layer.stats["unchosen"].item() == pytest.approx(unchosen.item())


@pytest.mark.parametrize("top_k, capacity_factor", [(1, 1.0), (2, 1.0), (2, 0.5), (3, 4.0)])
def test_token_choice_matches_a_loop(top_k, capacity_factor):
    """Capacity factor 0.5 leaves room for half the picks: the drops must be the loop's."""
    torch.manual_seed(0)
    layer, x = perturbed(TokenChoiceMoE(D, M, E, capacity_factor, top_k, aux_loss_coef=0.1)), tokens()
    expected, dropped, aux = token_choice_reference(layer, x)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected)
    assert layer.stats["dropped"].item() == pytest.approx(dropped)
    assert layer.aux_loss.item() == pytest.approx(aux.item(), rel=1e-6)
    if capacity_factor == 0.5:
        assert dropped >= 0.5
    elif capacity_factor == 4.0:
        assert dropped == 0


def test_balancing_loss_is_one_when_uniform_and_num_experts_when_collapsed():
    """E sum_e f_e P_e: a zero router gives p = 1/E, so E * sum_e f_e / E = 1 however the ties are
    picked (times the coefficient); a router that sends everything to expert 0 gives E."""
    layer, x = TokenChoiceMoE(D, M, E, 1.0, top_k=1, aux_loss_coef=0.5), tokens()
    with torch.no_grad():
        layer.router.weight.zero_()
        layer(x)
        assert layer.aux_loss.item() == pytest.approx(0.5 * 1.0)
        layer.router.weight[0] = 50.0
        layer(x.abs() + 1)  # every score of expert 0 is far above the others
        assert layer.aux_loss.item() == pytest.approx(0.5 * E)
        assert layer.stats["dropped"].item() == pytest.approx(1 - 1 / E)  # expert 0 holds N / E of N picks


@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 2.0])
def test_every_expert_takes_exactly_c_distinct_tokens(capacity_factor):
    torch.manual_seed(0)
    layer, x = ExpertChoiceMoE(D, M, E, capacity_factor), tokens()
    c = int(capacity_factor * N / E)
    with torch.no_grad():
        gates, index = layer.route(x)
        p = probs(layer, x).transpose(1, 2)  # [B, E, N]
    assert gates.shape == index.shape == (3, E, c) and layer.capacity(N) == c
    assert (index.sort(dim=-1).values.diff(dim=-1) > 0).all()  # distinct tokens per expert
    torch.testing.assert_close(gates, p.gather(-1, index))
    unpicked = p.scatter(-1, index, -1.0)  # each expert's best token it did not take
    assert (gates.min(-1).values >= unpicked.max(-1).values).all()


def test_unchosen_fraction_on_a_hand_built_router():
    """Token n is the unit vector e_n, so router scores are the weights themselves. Tokens 0, 1 score
    (2, 2, 2, 0), tokens 2, 3 score (0, 0, 0, 2), tokens 4-7 score 0: experts 0-2 all take tokens 0
    and 1 (p = 0.32 > 0.25 > 0.10), expert 3 takes 2 and 3 (0.71 > 0.25 > 0.04). With C = 2 per
    expert, 8 slots reach only 4 of the 8 tokens: half are unchosen, and their output is 0. (All four
    experts cannot rank the tokens alike: each token's p sums to 1 over the experts.)"""
    layer = ExpertChoiceMoE(8, M, E, capacity_factor=1.0)
    scores = torch.zeros(8, E)
    scores[:2, :3] = 2.0
    scores[2:4, 3] = 2.0
    x = torch.eye(8)[None]
    with torch.no_grad():
        layer.router.weight.copy_(scores.T)
        _, index = layer.route(x)
        out = layer(x)
    assert [sorted(i.tolist()) for i in index[0]] == [[0, 1], [0, 1], [0, 1], [2, 3]]
    assert layer.stats["unchosen"].item() == 0.5
    assert (out[0, 4:] == 0).all() and (out[0, :4] != 0).any(dim=-1).all()


@pytest.mark.parametrize("routing", ROUTINGS)
def test_an_images_output_does_not_depend_on_its_batch(routing):
    """Routing and capacity are per image: classifier-free guidance's doubled batch changes nothing."""
    torch.manual_seed(0)
    model = randomize(DiT(tiny("tiny-moe", routing=routing, capacity_factor=0.5)))
    x, t = inputs(b=3)
    emb = text(b=3, real=(2, 1, 5))
    with torch.no_grad():
        whole = model(x, t, emb)
        for i in range(3):
            one = model(x[i:i + 1], t[i:i + 1], TextEmbedding(emb.tokens[i:i + 1], emb.mask[i:i + 1]))
            torch.testing.assert_close(one, whole[i:i + 1])


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("make, match", [
    (lambda: ExpertChoiceMoE(D, M, E, 0.0), "capacity_factor must be > 0"),
    (lambda: TokenChoiceMoE(D, M, E, -1.0, 2, 0.01), "capacity_factor must be > 0"),
    (lambda: DiTConfig(num_experts=4, capacity_factor=0.0), "capacity_factor must be > 0"),
    (lambda: ExpertChoiceMoE(D, M, 0, 1.0), "at least one expert"),
    (lambda: DiTConfig(num_experts=-1), "num_experts >= 0"),
    # 4 tokens of a 4x4 latent over 8 experts: C = int(4 / 8) = 0
    (lambda: DiTConfig(input_size=(4, 4), num_experts=8, capacity_factor=1.0), r"C = 1.0 \* 4 / 8 < 1.*fewer experts"),
    (lambda: TokenChoiceMoE(D, M, E, 1.0, 5, 0.01), r"top_k must be between 1 and the number of experts \(4\)"),
    (lambda: DiTConfig(num_experts=4, routing="token_choice", top_k=0), "top_k must be between"),
    (lambda: DiTConfig(num_experts=4, routing="hash"), "Unknown routing 'hash'; choose one of expert_choice"),
])
def test_bad_moe_configs(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_too_few_tokens_at_forward_time():
    """The config's 16 tokens give C = 4; a 2x2 latent (1 token) or 3 kept tokens give C = 0."""
    model = DiT(tiny("tiny-moe")).eval()
    x, t = inputs()
    with torch.no_grad(), pytest.raises(ValueError, match="C = 1.0 \\* 1 / 4 < 1.*more tokens"):
        model(x[..., :2, :2], t, text())
    with torch.no_grad(), pytest.raises(ValueError, match="C = 1.0 \\* 3 / 4 < 1.*less masking"):
        model(x, t, text(), keep=torch.tensor([[0, 5, 9], [1, 2, 3]]))


# ----------------------------------------------------------------------------- the MoE DiT

@pytest.mark.parametrize("routing", ROUTINGS)
def test_moe_dit_starts_at_zero_and_trains_router_and_experts(routing):
    torch.manual_seed(0)
    # 4 experts in block 1 (moe_every=2); top_k = 4 so that every expert gets tokens under token choice too
    model = DiT(tiny("tiny-moe", routing=routing, top_k=4)).eval()
    x, t = inputs()
    with torch.no_grad():
        assert torch.equal(model(x, t, text()), torch.zeros_like(x))  # adaLN-Zero
    randomize(model)
    loss = model(x, t, text()).square().mean()
    if routing == "token_choice":
        loss = loss + router_aux_loss(model)
    loss.backward()
    moe = model.blocks[1].mlp
    assert isinstance(moe, ExpertChoiceMoE if routing == "expert_choice" else TokenChoiceMoE)
    assert moe.router.weight.grad.abs().sum() > 0
    for w in (moe.experts.w1, moe.experts.b1, moe.experts.w2, moe.experts.b2):
        assert (w.grad.flatten(1).abs().sum(1) > 0).all()  # every expert


@pytest.mark.parametrize("routing", ROUTINGS)
def test_activation_checkpointing_gives_the_same_loss_and_gradients(routing):
    """Bit for bit, with a patch-mixer and masking: the whole loss, then the balancing loss alone (its
    graph runs through the recomputed blocks)."""
    torch.manual_seed(0)
    plain = randomize(DiT(tiny("tiny-moe-mixer", routing=routing)))
    ckpt = copy.deepcopy(plain)
    ckpt.gradient_checkpointing = True
    x, t = inputs()
    keep = random_keep(2, 16, 0.5, torch.Generator().manual_seed(0))

    def loss_of(model, with_output: bool):
        out = model(x, t, text(), keep=keep).square().mean()
        aux = router_aux_loss(model)
        return (out if with_output else 0) + (0 if aux is None else 10 * aux)

    for with_output in (True, False) if routing == "token_choice" else (True,):
        losses = []
        for model in (plain, ckpt):
            model.zero_grad()
            losses.append(loss_of(model, with_output))
            losses[-1].backward()
        assert torch.equal(losses[0], losses[1])
        for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
            assert (a.grad is None) == (b.grad is None), name
            if a.grad is not None:
                assert torch.equal(a.grad, b.grad), name
        assert plain.blocks[1].mlp.router.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- cost
def expert_params(cfg: DiTConfig) -> tuple[int, int]:
    """(MoE blocks, parameters of one expert) of a model built from cfg."""
    model = DiT(cfg)
    moe = [b.mlp for b in model.blocks if hasattr(b.mlp, "experts")]
    return len(moe), sum(p[0].numel() for p in moe[0].experts.parameters())


@pytest.mark.parametrize("overrides, used", [
    (dict(), 1.0), (dict(capacity_factor=2.0, moe_every=1), 2.0), (dict(routing="token_choice", top_k=3), 3)])
def test_active_params_count_the_experts_a_token_uses(overrides, used):
    """Active = all - (E - experts per token) experts in each MoE block: capacity_factor of them
    under expert choice, top_k under token choice."""
    cfg = tiny("tiny-moe", **overrides)
    cost = dit_cost(cfg)
    blocks, per_expert = expert_params(cfg)
    assert cost.params == sum(p.numel() for p in DiT(cfg).parameters())
    assert cost.active_params == cost.params - blocks * (cfg.num_experts - used) * per_expert


def test_moe_cost_against_the_dense_dit():
    """At capacity factor 1 the experts fill N slots: the dense MLP's FLOPs plus the router's, and its
    active parameters plus the router's. The dense count is what the model holds."""
    dense, moe = dit_cost(PRESETS["tiny"]), dit_cost(PRESETS["tiny-moe"])
    cfg = PRESETS["tiny-moe"]
    assert dense.params == dense.active_params == sum(p.numel() for p in DiT(PRESETS["tiny"]).parameters())
    assert dense.flops == dit_cost(PRESETS["tiny"], mask_ratio=0.0).flops
    assert 0 < moe.flops - dense.flops < 0.01 * dense.flops
    routers = sum(map(cfg.is_moe, range(cfg.depth))) * cfg.hidden_size * cfg.num_experts
    assert moe.flops - dense.flops == 2 * cfg.num_tokens * routers
    blocks, per_expert = expert_params(cfg)
    assert moe.active_params == dense.params + routers
    assert moe.params == dense.params + routers + blocks * (cfg.num_experts - 1) * per_expert


def test_moe_dit_xl_is_a_billion_parameters():
    cost = dit_cost(PRESETS["MoE-DiT-XL/2"])
    assert 1.0e9 < cost.params < 1.3e9
    assert cost.active_params == pytest.approx(0.64e9, rel=0.01)  # the presets' comment


@pytest.mark.parametrize("name, overrides, mask_ratio", [
    ("tiny-moe", {}, 0.0), ("tiny-moe", dict(routing="token_choice", capacity_factor=0.6), 0.0),
    ("tiny-moe-mixer", {}, 0.5), ("tiny-mixer", {}, 0.75)])
def test_dit_cost_matches_flop_counter(name, overrides, mask_ratio):
    """Exact, as test_dit's dense check: the experts' batched matmuls over their E C slots (empty
    token-choice slots included), the router, and the blocks after the mixer on the K kept tokens."""
    cfg = tiny(name, **overrides)
    model = DiT(cfg).eval()
    x, t = inputs()
    emb = text(length=5, real=(5, 1))
    keep = random_keep(2, 16, mask_ratio, torch.Generator().manual_seed(0)) if mask_ratio else None
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, t, emb, keep=keep)
    assert counter.get_total_flops() == 2 * dit_cost(cfg, text_len=5, mask_ratio=mask_ratio).flops


# ----------------------------------------------------------------------------- the training loss
@pytest.mark.parametrize("routing, metrics", [("expert_choice", {"unchosen"}),
                                              ("token_choice", {"dropped", "router_aux_loss"})])
def test_diffusion_loss_adds_the_balancing_loss_and_reports_routing(routing, metrics):
    torch.manual_seed(0)
    model = randomize(DiT(tiny("tiny-moe", routing=routing, router_aux_loss_coef=0.5)))
    x0, _ = inputs()

    def loss_and_metrics():
        return diffusion_loss(model, x0, text(), Objective(prediction="v"), torch.Generator().manual_seed(0))

    loss, logged = loss_and_metrics()
    assert set(logged) == metrics and all(v.ndim == 0 for v in logged.values())
    if routing == "token_choice":  # the same draws without the balancing loss: lower by exactly it
        model.blocks[1].mlp.aux_loss_coef = 0.0
        without, _ = loss_and_metrics()
        assert logged["router_aux_loss"] > 0
        torch.testing.assert_close(loss - without, logged["router_aux_loss"])


# ----------------------------------------------------------------------------- FSDP
def _fsdp_worker(rank: int, port: int, root: str):
    """One rank of a masked MoE + mixer DiT trained under FSDP with activation checkpointing: the
    history (averaged over ranks) to root/rank{rank}.json."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = DiT(tiny("tiny-moe-mixer", in_channels=2, hidden_size=16, text_dim=8,
                         frequency_embedding_size=16))
        g = torch.Generator().manual_seed(0)
        data = (torch.randn(16, 2, 8, 8, generator=g), torch.randn(16, 3, 8, generator=g),
                torch.ones(16, 3, dtype=torch.bool))
        objective = Objective(prediction="v", mask_ratio=0.5)

        def loss_fn(model, batch, generator):
            x0, tokens, mask = batch
            return diffusion_loss(model, x0, TextEmbedding(tokens, mask), objective, generator)

        trainer = Trainer(model, loss_fn, data, run_config(Path(root) / "run", steps=3, batch_size=4,
                                                           activation_checkpointing=True))
        out = {"history": trainer.fit(), "units": len(distributed.fsdp_units(trainer.model)),
               "expert_shard": list(trainer.model.blocks[1].mlp.experts.w1.to_local().shape)}
        (Path(root) / f"rank{rank}.json").write_text(json.dumps(out))
    finally:
        distributed.cleanup()


def test_masked_moe_dit_trains_under_fsdp(tmp_path):
    """2 CPU ranks (test_fsdp's setup): the mixer block and both blocks are FSDP units, the expert
    weights shard like any other, and every step's loss and unchosen fraction agree across ranks."""
    spawn(_fsdp_worker, (str(tmp_path),), seconds=120)
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD))
    assert rank0 == rank1 and rank0["units"] == 3
    assert rank0["expert_shard"] == [2, 16, 64]  # each rank holds 2 of the 4 experts' [16, 64] weights
    history = rank0["history"]
    assert len(history) == 3 and len({r["loss"] for r in history}) == 3
    assert all(math.isfinite(r["loss"]) and 0 <= r["unchosen"] < 1 for r in history)


def test_expert_choice_capacity_above_every_token_is_refused():
    """capacity_factor > num_experts would ask each expert for more tokens than an image has."""
    with pytest.raises(ValueError, match="at most capacity_factor = num_experts"):
        DiTConfig(num_experts=2, capacity_factor=4.0)

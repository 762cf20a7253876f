"""Notebook 06's exercises: token choice's drops and expert choice's unchosen tokens (each predicted,
then measured), a MoE layer's FLOPs, and the patch mask drawn and undone."""

from __future__ import annotations

import torch

from ..models.dit import dit_cost
from ..models.masking import num_kept, random_keep, restore_tokens, take_tokens
from ..models.moe import ExpertChoiceMoE, TokenChoiceMoE
from . import exercise_check


def _report(prediction, measured: float, what: str):
    said = "none yet (set my_prediction first)" if prediction is None else f"{100 * float(prediction):.1f}%"
    print(f"{what}: your prediction {said}, measured {100 * measured:.1f}%")


def _close(got, want: float, tol: float = 1e-5) -> bool:
    got = torch.as_tensor(got, dtype=torch.float64)
    return got.numel() == 1 and abs(got.item() - want) <= tol


@exercise_check(refuses=[(TokenChoiceMoE, "forward")])
def check_dropped_share(answer, prediction=None) -> str | None:
    """answer(picks [B, N] expert per token, num_experts, capacity) -> the share of the B*N tokens that
    top-1 token choice drops: in each image an expert keeps its first `capacity` tokens."""
    g = torch.Generator().manual_seed(0)
    cases = [(torch.zeros(2, 8, dtype=torch.long), 4, 2, "every token picks expert 0"),
             (torch.arange(8).remainder(4).expand(3, 8), 4, 2, "an even load"),
             (torch.randint(0, 4, (5, 16), generator=g), 4, 4, "random picks"),
             (torch.randint(0, 8, (4, 64), generator=g), 8, 6, "random picks, 8 experts"),
             (torch.cat([torch.zeros(1, 12, dtype=torch.long), torch.ones(1, 12, dtype=torch.long)]), 2, 6,
              "image 1 all on expert 0, image 2 all on expert 1")]
    for picks, e, c, name in cases:
        dropped = 0
        for image in picks.tolist():  # the reference: count each image's tokens beyond capacity, one by one
            taken = [0] * e
            for expert in image:
                taken[expert] += 1
                dropped += taken[expert] > c
        want = dropped / picks.numel()
        batch_load = torch.bincount(picks.reshape(-1), minlength=e)  # the same count, wrongly over the whole batch
        batch_wide = (batch_load - c).clamp(min=0).sum().item() / picks.numel()
        got = answer(picks, e, c)
        if not _close(got, want):
            hint = (" Count the capacity in each image separately: routing is per image, so an expert's C "
                    "places are per image, not per batch." if _close(got, batch_wide) else
                    " A token is dropped when its expert already holds C tokens of the same image.")
            return f"for {name} (E = {e}, C = {c}) the dropped share is {want:.4f}, got {got}.{hint}"
    picks = torch.randint(0, 8, (2000, 256), generator=g)  # a uniform random router, E = 8, N = 256, c = 1
    _report(prediction, float(answer(picks, 8, 32)), "uniform random router, 8 experts, 256 tokens, capacity factor 1")
    return None


@exercise_check(refuses=[(ExpertChoiceMoE, "forward"), (ExpertChoiceMoE, "route")])
def check_unchosen_share(answer, prediction=None) -> str | None:
    """answer(probs [B, N, E], capacity) -> the share of the B*N tokens that no expert's top-`capacity`
    (by probs, in each image) contains."""
    g = torch.Generator().manual_seed(0)
    cases = [(torch.rand(3, 16, 4, generator=g), 4), (torch.rand(2, 10, 3, generator=g), 2),
             (torch.rand(4, 32, 8, generator=g).softmax(-1), 8)]
    same = torch.linspace(0.1, 0.9, 12)[None, :, None].expand(2, 12, 3).contiguous()  # every expert likes the same tokens
    cases.append((same, 4))
    for probs, c in cases:
        b, n, e = probs.shape
        chosen = torch.zeros(b, n, dtype=torch.bool)
        for i in range(b):  # the reference: each expert's C best tokens, marked one expert at a time
            for k in range(e):
                order = sorted(range(n), key=lambda t: -probs[i, t, k].item())
                chosen[i, order[:c]] = True
        want = 1 - chosen.float().mean().item()
        got = answer(probs, c)
        if not _close(got, want):
            return (f"for probs of shape {tuple(probs.shape)} and C = {c} the unchosen share is {want:.4f}, got {got}. "
                    "Each expert takes the top C over the tokens (dim 1) of each image, not the top C experts of "
                    "each token; a token is unchosen when no expert took it.")
    probs = torch.rand(4000, 16, 4, generator=g)  # experts choosing independently at random, E = 4, N = 16, c = 1
    _report(prediction, float(answer(probs, 4)), "experts choosing at random, 4 experts, 16 tokens, capacity factor 1")
    return None


@exercise_check(refuses=[dit_cost])
def check_moe_flops(answer) -> str | None:
    """answer(n, d, mlp_hidden, num_experts, capacity_factor) -> forward FLOPs (2 per multiply-add) of one
    expert-choice MoE layer on n tokens: the router, and E experts D -> M -> D on C = int(c n / E) tokens each."""
    for n, d, m, e, cf in [(16, 128, 512, 4, 1.0), (256, 1024, 4096, 8, 2.0), (64, 64, 256, 8, 0.5), (10, 32, 96, 3, 1.0)]:
        c = int(cf * n / e)
        router = 2 * n * d * e  # [n, D] @ [D, E]
        experts = e * (2 * c * d * m + 2 * c * m * d)  # each expert's two matmuls on its C tokens
        want = router + experts
        got = answer(n, d, m, e, cf)
        if got != want:
            hint = ""
            if got == 2 * n * d * e + 2 * 2 * n * d * m * e:
                hint = " Each expert processes only its C tokens, not all N."
            elif got == experts:
                hint = " Add the router: every token is scored against every expert."
            elif got == want // 2 or got == router // 2 + experts // 2:
                hint = " Count 2 FLOPs per multiply-add."
            return f"for N = {n}, D = {d}, M = {m}, E = {e}, capacity factor {cf}: expected {want:,} FLOPs, got {got}.{hint}"
    return None


@exercise_check(refuses=[random_keep, take_tokens, restore_tokens, num_kept])
def check_mask_and_restore(answer) -> str | None:
    """answer(tokens [B, N, D], mask_ratio, generator) -> (keep [B, K] sorted token indices, K = max(1,
    round(N (1 - mask_ratio))), drawn uniformly from `generator`, a fresh draw per image; restored [B, N, D]:
    the kept tokens in their places, zeros elsewhere)."""
    for b, n, d, ratio in [(3, 16, 5, 0.75), (2, 14, 3, 0.75), (4, 10, 2, 0.5), (2, 7, 4, 0.9), (2, 5, 2, 0.95)]:
        tokens = torch.randn(b, n, d, generator=torch.Generator().manual_seed(n))
        k = max(1, round(n * (1 - ratio)))
        keep, restored = answer(tokens, ratio, torch.Generator().manual_seed(0))
        keep = torch.as_tensor(keep)
        if tuple(keep.shape) != (b, k):
            return (f"for N = {n} and mask ratio {ratio}, keep should be [B, K] = [{b}, {k}] (K = max(1, round(N (1 - "
                    f"ratio)))), got {tuple(keep.shape)}.")
        if keep.min() < 0 or keep.max() >= n:
            return f"keep holds indices outside 0..{n - 1}."
        if not (keep[:, 1:] > keep[:, :-1]).all():
            return ("the kept indices of each image must be distinct and sorted ascending (sort the kept indices: the "
                    "kept tokens then keep their raster order).")
        want = torch.zeros(b, n, d)
        for i in range(b):
            for j in keep[i].tolist():
                want[i, j] = tokens[i, j]
        if tuple(torch.as_tensor(restored).shape) != (b, n, d) or not torch.allclose(torch.as_tensor(restored), want):
            return "restored should hold each kept token at its own index and zeros at the masked ones."
        again, _ = answer(tokens, ratio, torch.Generator().manual_seed(0))
        if not torch.equal(torch.as_tensor(again), keep):
            return "draw the mask from `generator` (the same seed must give the same mask), not the global RNG."
    keep, _ = answer(torch.zeros(4000, 16, 1), 0.75, torch.Generator().manual_seed(1))
    keep = torch.as_tensor(keep)
    share = torch.zeros(16).scatter_add_(0, keep.reshape(-1), torch.ones(keep.numel())) / 4000  # each position's rate
    if (share - 0.25).abs().max() > 0.05:
        return (f"over 4,000 images each position should be kept a quarter of the time; the rates range from "
                f"{share.min():.2f} to {share.max():.2f}. Draw the K kept tokens uniformly without replacement.")
    if len({tuple(row) for row in keep.tolist()}) < 1000:
        return "every image should get its own random mask: draw a fresh permutation (or scores) per image."
    return None

"""Mixture-of-Experts feed-forward layers: expert-choice routing, and token-choice top-k as the contrast.

A MoE layer replaces a block's MLP by E experts (MLPs of the same shape) and a router, a linear map
of each token x_n [D] to E scores. Each token is processed by a few experts only, so the layer holds
E times the MLP's parameters at a few times its FLOPs (Shazeer et al., 2017).

Token choice (Shazeer et al., 2017; GShard, Lepikhin et al., 2021; Switch, Fedus et al., 2022): each
token picks its top-k experts by p = softmax(router(x)). An expert holds at most C = capacity_factor
* k * N / E tokens: the first to pick it (first choices before second choices); the rest of its
tokens are dropped and pass on the residual. Routers collapse onto a few experts unless trained
with the load-balancing loss (Switch, eq. 4)

    L_aux = E * sum_e f_e P_e,   f_e = share of the N k picks that chose e,   P_e = mean_n p_ne,

which is 1 when the load is uniform and E when one expert takes everything.

Expert choice (Zhou et al., 2022, "Mixture-of-Experts with Expert Choice Routing"; in a DiT by
micro_diffusion, Sehwag et al., 2024): each expert picks its top-C tokens by the same p, with
C = capacity_factor * N / E. Every expert is exactly full, so no balancing loss is needed; a token
may be chosen by several experts or by none, and an unchosen token passes on the residual alone.
The output is sum over the experts that chose token n of p_ne * expert_e(x_n).

Both route within each image (the N tokens of one item): an image's output never depends on the
rest of its batch, so classifier-free guidance, batch size and sharding leave samples unchanged.
Dispatch gathers the chosen tokens into equal-capacity groups [E, B*C, D], runs all experts as one
batched matmul and adds the results back with scatter_add: memory O(B E C D), never the
O(B N E C) one-hot dispatch tensor.

After each forward, `stats` holds detached routing statistics for the logs: the fraction of tokens
no expert chose ("unchosen", expert choice) or of picks dropped for capacity ("dropped", token
choice). Token choice also keeps `aux_loss` (router_aux_loss_coef * L_aux), which the objective adds
to the diffusion loss (`router_aux_loss`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ROUTINGS = ("expert_choice", "token_choice")


class Experts(nn.Module):
    """E two-layer GELU MLPs D -> M -> D held as batched weights: forward(x [E, T, D]) -> [E, T, D]."""

    def __init__(self, num_experts: int, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.b1 = nn.Parameter(torch.zeros(num_experts, 1, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.b2 = nn.Parameter(torch.zeros(num_experts, 1, dim))
        for w in (self.w1, self.w2):  # each expert as nn.Linear's Xavier-uniform (DiT's init)
            bound = math.sqrt(6 / (w.shape[1] + w.shape[2]))
            nn.init.uniform_(w, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(torch.baddbmm(self.b1, x, self.w1), approximate="tanh")  # [E, T, M]
        return torch.baddbmm(self.b2, h, self.w2)  # [E, T, D]


class _MoE(nn.Module):
    def __init__(self, dim: int, hidden: int, num_experts: int, capacity_factor: float):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"A MoE layer needs at least one expert, got num_experts={num_experts}.")
        if not capacity_factor > 0:
            raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}: it sets how many tokens "
                             f"each expert processes.")
        self.num_experts, self.capacity_factor = num_experts, capacity_factor
        self.router = nn.Linear(dim, num_experts, bias=False)
        self.experts = Experts(num_experts, dim, hidden)
        self.stats: dict[str, torch.Tensor] = {}

    def router_probs(self, x: torch.Tensor) -> torch.Tensor:
        """p = softmax over experts of the router's scores, in float32: [B, N, D] -> [B, N, E]."""
        return self.router(x).float().softmax(dim=-1)

    def _run_experts(self, x: torch.Tensor, slots: torch.Tensor, capacity: int) -> torch.Tensor:
        """x [B, N, D] gathered at slots [B, E*C] (token index per slot), through the experts -> [B, E*C, D]."""
        b, _, d = x.shape
        e = self.num_experts
        xin = x.gather(1, slots[..., None].expand(-1, -1, d))  # [B, E*C, D]
        xin = xin.view(b, e, capacity, d).transpose(0, 1).reshape(e, b * capacity, d)  # [E, B*C, D]
        h = self.experts(xin)  # [E, B*C, D]
        return h.view(e, b, capacity, d).transpose(0, 1).reshape(b, e * capacity, d)  # [B, E*C, D]


class ExpertChoiceMoE(_MoE):
    """Each expert takes its top-C tokens of each image, C = capacity_factor * N / E (module docstring)."""

    def capacity(self, num_tokens: int) -> int:
        c = int(self.capacity_factor * num_tokens / self.num_experts)
        if c > num_tokens:
            raise ValueError(f"Expert choice with capacity_factor {self.capacity_factor} > num_experts "
                             f"{self.num_experts} would give each expert C = {c} of {num_tokens} tokens: at most "
                             f"capacity_factor = num_experts (every expert takes every token).")
        if c < 1:
            raise ValueError(f"Expert choice with {self.num_experts} experts and capacity_factor "
                             f"{self.capacity_factor} on {num_tokens} tokens gives each expert "
                             f"C = {self.capacity_factor} * {num_tokens} / {self.num_experts} < 1 token: use fewer "
                             f"experts, a larger capacity_factor, or more tokens (a smaller patch, less masking).")
        return c

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(gates [B, E, C], token indices [B, E, C]): each expert's top-C tokens by p and their p."""
        return self.router_probs(x).transpose(1, 2).topk(self.capacity(x.shape[1]), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, N, D] -> sum over the experts e that chose token n of p_ne expert_e(x_n): [B, N, D]."""
        b, n, d = x.shape
        gates, tokens = self.route(x)  # [B, E, C] each
        capacity = gates.shape[-1]
        tokens = tokens.reshape(b, -1)  # [B, E*C]
        h = self._run_experts(x, tokens, capacity) * gates.reshape(b, -1, 1).to(x.dtype)  # [B, E*C, D]
        out = torch.zeros_like(x).scatter_add_(1, tokens[..., None].expand(-1, -1, d), h)  # [B, N, D]
        chosen = torch.zeros(b, n, device=x.device).scatter_add_(1, tokens, torch.ones_like(tokens, dtype=torch.float))
        self.stats = {"unchosen": (chosen == 0).float().mean().detach()}
        return out


class TokenChoiceMoE(_MoE):
    """Each token picks its top-k experts; an expert keeps at most C = capacity_factor * k * N / E of
    them, first come (first choices first), and the load-balancing loss keeps the load even."""

    def __init__(self, dim: int, hidden: int, num_experts: int, capacity_factor: float, top_k: int,
                 aux_loss_coef: float):
        super().__init__(dim, hidden, num_experts, capacity_factor)
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be between 1 and the number of experts ({num_experts}), got {top_k}.")
        self.top_k, self.aux_loss_coef = top_k, aux_loss_coef
        self.aux_loss: torch.Tensor | None = None

    def capacity(self, num_tokens: int) -> int:
        return max(1, math.ceil(self.capacity_factor * self.top_k * num_tokens / self.num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, N, D] -> sum over token n's kept picks e of p_ne expert_e(x_n): [B, N, D]."""
        b, n, d = x.shape
        e, k, capacity = self.num_experts, self.top_k, self.capacity(n)
        probs = self.router_probs(x)  # [B, N, E]
        gates, picks = probs.topk(k, dim=-1)  # [B, N, k]
        picks, gates = picks.transpose(1, 2).reshape(b, k * n), gates.transpose(1, 2).reshape(b, k * n)  # choice-major
        token = torch.arange(n, device=x.device).repeat(k)  # [k*N]: the token of each pick
        # A pick's place in its expert's queue: how many earlier picks chose the same expert.
        place = F.one_hot(picks, e).cumsum(1).gather(2, picks[..., None]).squeeze(-1) - 1  # [B, k*N]
        kept = place < capacity
        slot = torch.where(kept, picks * capacity + place, e * capacity)  # [B, k*N]; overflow -> a spare slot
        slots = torch.zeros(b, e * capacity + 1, dtype=torch.long, device=x.device)
        slots.scatter_(1, slot, token.expand(b, -1))  # [B, E*C + 1]: the token in each slot (0 if empty)
        filled = torch.zeros(b, e * capacity + 1, device=x.device).scatter_(1, slot, 1.0)[:, :-1]  # [B, E*C]
        h = self._run_experts(x, slots[:, :-1], capacity) * filled[..., None].to(x.dtype)  # [B, E*C, D]
        h = torch.cat([h, h.new_zeros(b, 1, d)], dim=1)  # the spare slot contributes 0
        y = h.gather(1, slot[..., None].expand(-1, -1, d)) * (gates * kept)[..., None].to(x.dtype)  # [B, k*N, D]
        out = torch.zeros_like(x).scatter_add_(1, token[None, :, None].expand(b, -1, d), y)  # [B, N, D]
        f = F.one_hot(picks, e).float().mean(dim=(0, 1))  # [E]: share of picks per expert
        self.aux_loss = self.aux_loss_coef * e * (f * probs.mean(dim=(0, 1))).sum()
        self.stats = {"dropped": (~kept).float().mean().detach()}
        return out


def router_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """The sum of the token-choice layers' balancing losses from `model`'s last forward; None if it has none."""
    losses = [m.aux_loss for m in model.modules() if isinstance(m, TokenChoiceMoE) and m.aux_loss is not None]
    return sum(losses) if losses else None


def routing_stats(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each routing statistic of `model`'s last forward, averaged over its MoE layers (for the logs)."""
    stats: dict[str, list] = {}
    for m in model.modules():
        if isinstance(m, _MoE):
            for name, value in m.stats.items():
                stats.setdefault(name, []).append(value)
    return {name: torch.stack(values).mean() for name, values in stats.items()}

"""Per-token views of the flat routing rows: each token's top-1 expert and its set of chosen experts.

Shape legend: T tokens, E experts, N routed rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_lightning.routing.base import Routing

UNROUTED = -1
"""Top-1 value of a token that is in no routed row (dropped, or unpicked under expert choice)."""


def top1_expert(routing: Routing) -> Tensor:
    """``[T]`` int64: the expert of each token's highest-weight row (lowest expert id on ties), or ``UNROUTED``.

    Taken from the rows rather than ``argmax(probs)`` so that drops, expert choice and biased selection count.
    """
    num_tokens, num_experts = routing.num_tokens, routing.num_experts
    token_N, expert_N, weight_N = routing.token_idx_N, routing.expert_idx_N, routing.weight_N.float()
    best_T = weight_N.new_full((num_tokens,), float("-inf")).scatter_reduce(0, token_N, weight_N, "amax")
    candidate_N = torch.where(weight_N == best_T[token_N], expert_N, num_experts)
    top1_T = expert_N.new_full((num_tokens,), num_experts).scatter_reduce(0, token_N, candidate_N, "amin")
    return torch.where(top1_T == num_experts, UNROUTED, top1_T)


def chosen_experts(routing: Routing) -> Tensor:
    """``[T, E]`` float 0/1: which experts each token was sent to (a repeated row counts once)."""
    chosen_TE = routing.probs_TE.new_zeros(routing.num_tokens, routing.num_experts, dtype=torch.float32)
    chosen_TE[routing.token_idx_N, routing.expert_idx_N] = 1.0
    return chosen_TE

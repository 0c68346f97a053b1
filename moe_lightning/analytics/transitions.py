"""Layer-to-layer routing transitions: where a token's top-1 expert at layer l sends it at layer l + 1."""

from __future__ import annotations

import torch
from torch import Tensor


def transition_counts(top1_T: Tensor, next_top1_T: Tensor, num_experts: int, num_next_experts: int | None = None) -> Tensor:
    """``[E, E']``: entry ``(i, j)`` counts tokens with top-1 i at one layer and j at the next; unrouted tokens are left out."""
    num_next_experts = num_experts if num_next_experts is None else num_next_experts
    if top1_T.shape != next_top1_T.shape:
        raise ValueError(f"both layers must route the same tokens, got {tuple(top1_T.shape)} and {tuple(next_top1_T.shape)}")
    routed_T = (top1_T >= 0) & (next_top1_T >= 0)
    pair_T = top1_T[routed_T] * num_next_experts + next_top1_T[routed_T]
    counts = torch.bincount(pair_T, minlength=num_experts * num_next_experts)
    return counts.view(num_experts, num_next_experts).double()

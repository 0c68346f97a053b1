"""bf16 near-ties: tokens whose K-th and (K+1)-th router scores are so close that rounding can flip the choice.

Shape legend: T tokens, E experts, K experts per token.
"""

from __future__ import annotations

import torch
from torch import Tensor

BF16_TIE_MARGIN = 2.0**-8
"""Half the spacing of bf16 numbers just below 1 (8 significant bits): a smaller margin can round away."""


def topk_margin(probs_TE: Tensor, k: int) -> Tensor:
    """``[T]``: the K-th best score minus the (K+1)-th; ``inf`` when ``k >= E`` (no expert left out)."""
    num_experts = probs_TE.shape[-1]
    if not 1 <= k:
        raise ValueError(f"k must be >= 1, got k={k}")
    if k >= num_experts:
        return torch.full(probs_TE.shape[:-1], float("inf"), dtype=probs_TE.dtype, device=probs_TE.device)
    best_TK1 = probs_TE.topk(k + 1, dim=-1).values
    return best_TK1[..., k - 1] - best_TK1[..., k]


def near_tie_mask(probs_TE: Tensor, k: int, threshold: float = BF16_TIE_MARGIN) -> Tensor:
    """``[T]`` bool: tokens whose top-k margin is below ``threshold``."""
    return topk_margin(probs_TE, k) < threshold

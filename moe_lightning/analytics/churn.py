"""Routing churn: the share of a fixed probe batch's tokens whose top-1 expert changed since the last check."""

from __future__ import annotations

from torch import Tensor


def churn_counts(previous_top1_T: Tensor, current_top1_T: Tensor) -> tuple[Tensor, int]:
    """``(changed, total)`` for the same tokens routed at two checks; counts add up over layers and ranks."""
    if previous_top1_T.shape != current_top1_T.shape:
        raise ValueError(
            f"churn compares the same probe tokens, got shapes {tuple(previous_top1_T.shape)} "
            f"and {tuple(current_top1_T.shape)}"
        )
    return (previous_top1_T != current_top1_T).sum(), current_top1_T.numel()


def routing_churn(previous_top1_T: Tensor, current_top1_T: Tensor) -> float:
    """Fraction of probe tokens whose top-1 expert changed."""
    changed, total = churn_counts(previous_top1_T, current_top1_T)
    return float(changed) / max(total, 1)

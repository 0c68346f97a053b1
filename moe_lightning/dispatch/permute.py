"""Autograd functions of the fixed-K dispatch, whose both directions only gather (no atomics, no sort).

Shape legend: T tokens, K rows per token, N = T * K routed rows (sorted by expert), D model dim.

Autograd's own backward of ``x[index]`` scatters with accumulation (a sort or atomics), because it cannot know
that each token is gathered exactly K times. These functions know the permutation and its inverse.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_lightning.kernels.unpermute import weighted_gather_sum, weighted_gather_sum_backward


class _ReplicateAndPermute(torch.autograd.Function):
    """``x_ND[i] = x_TD[order_N[i] // K]``: each token copied K times, straight into sorted order."""

    @staticmethod
    def forward(ctx, x_TD: Tensor, order_N: Tensor, inverse_N: Tensor, rows_per_token: int) -> Tensor:
        ctx.save_for_backward(inverse_N)
        ctx.rows_per_token = rows_per_token
        return x_TD.index_select(0, order_N // rows_per_token)

    @staticmethod
    def backward(ctx, grad_ND: Tensor):
        (inverse_N,) = ctx.saved_tensors
        # Each token sums the gradients of its K copies.
        return weighted_gather_sum(grad_ND, inverse_N, None, ctx.rows_per_token), None, None, None


class _WeightedUnpermute(torch.autograd.Function):
    """``y_TD[t] = sum_k weight_TK[t, k] * y_ND[inverse_N[t * K + k]]``: back to tokens, weighted and summed."""

    @staticmethod
    def forward(ctx, y_ND: Tensor, weight_TK: Tensor, inverse_N: Tensor) -> Tensor:
        ctx.save_for_backward(y_ND, weight_TK, inverse_N)
        return weighted_gather_sum(y_ND, inverse_N, weight_TK, weight_TK.shape[1])

    @staticmethod
    def backward(ctx, grad_TD: Tensor):
        y_ND, weight_TK, inverse_N = ctx.saved_tensors
        grad_y_ND, grad_weight_TK = weighted_gather_sum_backward(grad_TD, y_ND, inverse_N, weight_TK)
        return grad_y_ND, grad_weight_TK.to(weight_TK.dtype), None


def inverse_permutation(perm_N: Tensor) -> Tensor:
    return torch.empty_like(perm_N).scatter_(0, perm_N, torch.arange(perm_N.shape[0], device=perm_N.device))


def replicate_and_permute(x_TD: Tensor, order_N: Tensor, inverse_N: Tensor, rows_per_token: int) -> Tensor:
    return _ReplicateAndPermute.apply(x_TD, order_N, inverse_N, rows_per_token)


def weighted_unpermute(y_ND: Tensor, weight_TK: Tensor, inverse_N: Tensor) -> Tensor:
    return _WeightedUnpermute.apply(y_ND, weight_TK, inverse_N)

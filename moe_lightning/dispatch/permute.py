"""Row permutations whose backward passes are gathers too (no atomics, no sort), for the fixed-K dispatch.

Shape legend: T tokens, K rows per token, N = T * K routed rows, D model dim.

Autograd's own backward of ``x[index]`` scatters with accumulation (a sort or atomics), because it cannot know
that ``index`` is a permutation. These functions are told the inverse permutation, so both directions read
rows in one pass.
"""

from __future__ import annotations

import torch
from torch import Tensor


class _ReplicateAndPermute(torch.autograd.Function):
    """``out[i] = x_TD[perm_N[i] // K]``: each token copied K times, straight into sorted order."""

    @staticmethod
    def forward(ctx, x_TD: Tensor, perm_N: Tensor, inverse_N: Tensor, rows_per_token: int) -> Tensor:
        ctx.save_for_backward(inverse_N)
        ctx.shape = (x_TD.shape[0], rows_per_token, x_TD.shape[1])
        return x_TD.index_select(0, perm_N // rows_per_token)

    @staticmethod
    def backward(ctx, grad_ND: Tensor):
        (inverse_N,) = ctx.saved_tensors
        # Back to token-major order, then each token sums the gradients of its K copies.
        return grad_ND.index_select(0, inverse_N).view(ctx.shape).sum(dim=1), None, None, None


class _Permute(torch.autograd.Function):
    """``out[i] = x_ND[perm_N[i]]`` for a permutation whose inverse is known."""

    @staticmethod
    def forward(ctx, x_ND: Tensor, perm_N: Tensor, inverse_N: Tensor) -> Tensor:
        ctx.save_for_backward(inverse_N)
        return x_ND.index_select(0, perm_N)

    @staticmethod
    def backward(ctx, grad_ND: Tensor):
        (inverse_N,) = ctx.saved_tensors
        return grad_ND.index_select(0, inverse_N), None, None


def inverse_permutation(perm_N: Tensor) -> Tensor:
    return torch.empty_like(perm_N).scatter_(0, perm_N, torch.arange(perm_N.shape[0], device=perm_N.device))


def replicate_and_permute(x_TD: Tensor, perm_N: Tensor, inverse_N: Tensor, rows_per_token: int) -> Tensor:
    return _ReplicateAndPermute.apply(x_TD, perm_N, inverse_N, rows_per_token)


def permute_rows(x_ND: Tensor, perm_N: Tensor, inverse_N: Tensor) -> Tensor:
    return _Permute.apply(x_ND, perm_N, inverse_N)

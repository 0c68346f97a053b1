"""Un-permutation of expert outputs with the routing weights folded in, for fixed-K routings.

Shape legend: T tokens, K rows per token, N = T * K rows (sorted by expert), D model dim.

``inverse_N[t * K + k]`` is the sorted position of token ``t``'s ``k``-th row. Two operations:

- ``weighted_gather_sum``: ``out_TD[t] = sum_k w_TK[t, k] * x_ND[inverse_N[t * K + k]]`` (``w`` None: all ones).
  It is the combine's forward, and, with unit weights, the backward of the dispatch.
- ``weighted_gather_sum_backward``: for a gradient ``g_TD``, ``grad_x[inverse_N[t * K + k]] = w[t, k] * g[t]``
  (a permutation: each row is written once) and ``grad_w[t, k] = g[t] . x[inverse_N[t * K + k]]``.

On CUDA each is one Triton kernel, one program per token, reading every row once and writing no intermediate;
elsewhere the torch references below run.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_lightning.kernels import HAS_TRITON


def weighted_gather_sum_reference(x_ND: Tensor, inverse_N: Tensor, weight_TK: Tensor | None, k: int) -> Tensor:
    x_TKD = x_ND.index_select(0, inverse_N).view(-1, k, x_ND.shape[-1])
    if weight_TK is None:
        return x_TKD.sum(dim=1)
    return torch.bmm(weight_TK.to(x_ND.dtype).unsqueeze(1), x_TKD).squeeze(1)


def weighted_gather_sum_backward_reference(
    grad_TD: Tensor, x_ND: Tensor, inverse_N: Tensor, weight_TK: Tensor
) -> tuple[Tensor, Tensor]:
    num_tokens, k = weight_TK.shape
    x_TKD = x_ND.index_select(0, inverse_N).view(num_tokens, k, -1)
    accumulate = torch.promote_types(x_ND.dtype, torch.float32)
    grad_weight_TK = torch.bmm(x_TKD.to(accumulate), grad_TD.to(accumulate).unsqueeze(-1)).squeeze(-1)
    grad_x_TKD = weight_TK.to(grad_TD.dtype).unsqueeze(-1) * grad_TD.unsqueeze(1)
    grad_x_ND = torch.empty_like(x_ND).index_copy_(0, inverse_N, grad_x_TKD.reshape(-1, x_ND.shape[-1]))
    return grad_x_ND, grad_weight_TK


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _gather_sum_kernel(x_ptr, inverse_ptr, weight_ptr, out_ptr, dim, K: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                           BLOCK_D: tl.constexpr):
        token = tl.program_id(0).to(tl.int64)
        for start in range(0, dim, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            mask = cols < dim
            acc = tl.zeros([BLOCK_D], dtype=tl.float32)
            for k in tl.static_range(K):
                row = tl.load(inverse_ptr + token * K + k)
                x = tl.load(x_ptr + row * dim + cols, mask=mask, other=0.0).to(tl.float32)
                if HAS_WEIGHT:
                    x = x * tl.load(weight_ptr + token * K + k)
                acc += x
            tl.store(out_ptr + token * dim + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _gather_sum_backward_kernel(grad_ptr, x_ptr, inverse_ptr, weight_ptr, grad_x_ptr, grad_weight_ptr, dim,
                                    K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_D: tl.constexpr):
        token = tl.program_id(0).to(tl.int64)
        ks = tl.arange(0, K_PAD)
        dots = tl.zeros([K_PAD], dtype=tl.float32)
        for start in range(0, dim, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            mask = cols < dim
            grad = tl.load(grad_ptr + token * dim + cols, mask=mask, other=0.0).to(tl.float32)
            for k in tl.static_range(K):
                row = tl.load(inverse_ptr + token * K + k)
                weight = tl.load(weight_ptr + token * K + k)
                tl.store(grad_x_ptr + row * dim + cols, (weight * grad).to(grad_x_ptr.dtype.element_ty), mask=mask)
                x = tl.load(x_ptr + row * dim + cols, mask=mask, other=0.0).to(tl.float32)
                dots = tl.where(ks == k, dots + tl.sum(grad * x), dots)
        tl.store(grad_weight_ptr + token * K + ks, dots, mask=ks < K)


def _block_d(dim: int) -> int:
    return min(1024, triton.next_power_of_2(dim))


def _use_triton(x: Tensor) -> bool:
    return HAS_TRITON and x.is_cuda


def weighted_gather_sum(x_ND: Tensor, inverse_N: Tensor, weight_TK: Tensor | None, k: int) -> Tensor:
    if not _use_triton(x_ND):
        return weighted_gather_sum_reference(x_ND, inverse_N, weight_TK, k)
    x_ND, inverse_N = x_ND.contiguous(), inverse_N.contiguous()
    num_tokens, dim = inverse_N.shape[0] // k, x_ND.shape[-1]
    out_TD = x_ND.new_empty(num_tokens, dim)
    weight = inverse_N if weight_TK is None else weight_TK.float().contiguous()  # unused pointer when no weight
    _gather_sum_kernel[(num_tokens,)](
        x_ND, inverse_N, weight, out_TD, dim, K=k, HAS_WEIGHT=weight_TK is not None, BLOCK_D=_block_d(dim)
    )
    return out_TD


def weighted_gather_sum_backward(
    grad_TD: Tensor, x_ND: Tensor, inverse_N: Tensor, weight_TK: Tensor
) -> tuple[Tensor, Tensor]:
    if not _use_triton(x_ND):
        return weighted_gather_sum_backward_reference(grad_TD, x_ND, inverse_N, weight_TK)
    grad_TD, x_ND, inverse_N = grad_TD.contiguous(), x_ND.contiguous(), inverse_N.contiguous()
    num_tokens, k = weight_TK.shape
    dim = x_ND.shape[-1]
    grad_x_ND = torch.empty_like(x_ND)
    grad_weight_TK = torch.empty(num_tokens, k, device=x_ND.device, dtype=torch.float32)
    _gather_sum_backward_kernel[(num_tokens,)](
        grad_TD, x_ND, inverse_N, weight_TK.float().contiguous(), grad_x_ND, grad_weight_TK, dim,
        K=k, K_PAD=triton.next_power_of_2(k), BLOCK_D=_block_d(dim),
    )
    return grad_x_ND, grad_weight_TK

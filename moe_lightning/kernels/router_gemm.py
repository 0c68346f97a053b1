"""Router logits in fp32 from a half-precision model without fp32 copies of its activations.

The reference casts the tokens ``[T, D]`` and the router weight to fp32 and multiplies in fp32 (no tensor cores),
and its backward writes an fp32 ``[T, D]`` gradient that is cast back. When tokens and weight are both bf16 (or
both fp16) on CUDA, one tensor-core GEMM with fp32 accumulation and an fp32 result gives the same logits: the
inputs are exactly representable and cuBLAS accumulates in fp32 either way. The backward runs in the model's dtype,
whose gradients it produces anyway; only the ``[T, E]`` logit gradient is rounded to it first. Which path a router
takes, and fp64 logits (always the reference), are chosen by :class:`~moe_lightning.routing.numerics.RouterNumerics`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_HALF = (torch.bfloat16, torch.float16)


class _HalfInputFp32Logits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD: Tensor, weight_ED: Tensor) -> Tensor:
        ctx.save_for_backward(x_TD, weight_ED)
        return torch.mm(x_TD, weight_ED.t(), out_dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad_TE: Tensor):
        x_TD, weight_ED = ctx.saved_tensors
        grad_TE = grad_TE.to(x_TD.dtype)
        grad_x = grad_TE @ weight_ED if ctx.needs_input_grad[0] else None
        grad_weight = grad_TE.t() @ x_TD if ctx.needs_input_grad[1] else None
        return grad_x, grad_weight


def router_logits_reference(x_TD: Tensor, weight_ED: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    return F.linear(x_TD.to(dtype), weight_ED.to(dtype))


def router_logits(
    x_TD: Tensor, weight_ED: Tensor, dtype: torch.dtype = torch.float32, half_input_gemm: bool = True
) -> Tensor:
    """``x_TD @ weight_ED.T`` in ``dtype`` (fp32 or fp64), whatever the model dtype or autocast state: routing
    decisions are precision-sensitive. For fp32 with ``half_input_gemm``, the half-input GEMM on CUDA when both are
    bf16 or both fp16; the reference elsewhere."""
    with torch.autocast(device_type=x_TD.device.type, enabled=False):
        half_inputs = x_TD.dtype in _HALF and weight_ED.dtype == x_TD.dtype
        if half_input_gemm and dtype == torch.float32 and x_TD.is_cuda and x_TD.dim() == 2 and half_inputs:
            return _HalfInputFp32Logits.apply(x_TD, weight_ED)
        return router_logits_reference(x_TD, weight_ED, dtype)

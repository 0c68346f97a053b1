"""SwiGLU activation ``silu(gate) * up`` as one fused Triton kernel each way, beside its torch reference.

Unfused, autograd runs silu, a product and their backward as separate passes over ``[rows, F]`` tensors and
keeps ``silu(gate)`` alive for the backward; fused, the forward reads gate and up once and writes the output
once, and the backward recomputes the sigmoid from the saved inputs instead of storing it.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch import Tensor

HAS_TRITON = importlib.util.find_spec("triton") is not None

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _swiglu_forward_kernel(gate_ptr, up_ptr, out_ptr, numel, BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < numel
        gate = tl.load(gate_ptr + offsets, mask=mask).to(tl.float32)
        up = tl.load(up_ptr + offsets, mask=mask).to(tl.float32)
        out = gate * tl.sigmoid(gate) * up
        tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_backward_kernel(gate_ptr, up_ptr, grad_out_ptr, grad_gate_ptr, grad_up_ptr, numel, BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < numel
        gate = tl.load(gate_ptr + offsets, mask=mask).to(tl.float32)
        up = tl.load(up_ptr + offsets, mask=mask).to(tl.float32)
        grad_out = tl.load(grad_out_ptr + offsets, mask=mask).to(tl.float32)
        sig = tl.sigmoid(gate)
        silu = gate * sig
        # d silu(g) / dg = sig * (1 + g * (1 - sig))
        grad_gate = grad_out * up * sig * (1.0 + gate * (1.0 - sig))
        tl.store(grad_gate_ptr + offsets, grad_gate.to(grad_gate_ptr.dtype.element_ty), mask=mask)
        tl.store(grad_up_ptr + offsets, (grad_out * silu).to(grad_up_ptr.dtype.element_ty), mask=mask)


_BLOCK = 2048


class _TritonSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor) -> Tensor:
        gate, up = gate.contiguous(), up.contiguous()
        out = torch.empty_like(gate)
        numel = gate.numel()
        _swiglu_forward_kernel[(triton.cdiv(numel, _BLOCK),)](gate, up, out, numel, BLOCK=_BLOCK)
        ctx.save_for_backward(gate, up)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        gate, up = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_gate, grad_up = torch.empty_like(gate), torch.empty_like(up)
        numel = gate.numel()
        _swiglu_backward_kernel[(triton.cdiv(numel, _BLOCK),)](
            gate, up, grad_out, grad_gate, grad_up, numel, BLOCK=_BLOCK
        )
        return grad_gate, grad_up


def swiglu_reference(gate: Tensor, up: Tensor) -> Tensor:
    return F.silu(gate) * up


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up``: the fused kernel on CUDA tensors of one shape and dtype, the reference elsewhere."""
    if HAS_TRITON and gate.is_cuda and gate.shape == up.shape and gate.dtype == up.dtype:
        return _TritonSwiGLU.apply(gate, up)
    return swiglu_reference(gate, up)

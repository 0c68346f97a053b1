"""SwiGLU on a fused projection: ``silu(h[:, :F]) * h[:, F:]``, one Triton kernel each way, beside its reference.

The experts compute gate and up with one GEMM into ``h`` of width 2F (gate columns first). Unfused, autograd
slices it, runs silu, a product and their backward as separate passes and keeps ``silu(gate)`` alive for the
backward; fused, the forward reads ``h`` once and writes the output once, and the backward recomputes the
sigmoid from the saved ``h`` and writes ``grad_h`` directly in the fused layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from moe_lightning.kernels import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _swiglu_forward_kernel(h_ptr, out_ptr, numel, hidden, BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < numel
        gate_offsets = (offsets // hidden) * (2 * hidden) + offsets % hidden
        gate = tl.load(h_ptr + gate_offsets, mask=mask).to(tl.float32)
        up = tl.load(h_ptr + gate_offsets + hidden, mask=mask).to(tl.float32)
        tl.store(out_ptr + offsets, (gate * tl.sigmoid(gate) * up).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_backward_kernel(h_ptr, grad_out_ptr, grad_h_ptr, numel, hidden, BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < numel
        gate_offsets = (offsets // hidden) * (2 * hidden) + offsets % hidden
        gate = tl.load(h_ptr + gate_offsets, mask=mask).to(tl.float32)
        up = tl.load(h_ptr + gate_offsets + hidden, mask=mask).to(tl.float32)
        grad_out = tl.load(grad_out_ptr + offsets, mask=mask).to(tl.float32)
        sig = tl.sigmoid(gate)
        # d silu(g) / dg = sig * (1 + g * (1 - sig))
        grad_gate = grad_out * up * sig * (1.0 + gate * (1.0 - sig))
        grad_up = grad_out * gate * sig
        tl.store(grad_h_ptr + gate_offsets, grad_gate.to(grad_h_ptr.dtype.element_ty), mask=mask)
        tl.store(grad_h_ptr + gate_offsets + hidden, grad_up.to(grad_h_ptr.dtype.element_ty), mask=mask)


_BLOCK = 2048


class _TritonSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_NH: Tensor) -> Tensor:
        h_NH = h_NH.contiguous()
        hidden = h_NH.shape[-1] // 2
        out = h_NH.new_empty(*h_NH.shape[:-1], hidden)
        numel = out.numel()
        _swiglu_forward_kernel[(triton.cdiv(numel, _BLOCK),)](h_NH, out, numel, hidden, BLOCK=_BLOCK)
        ctx.save_for_backward(h_NH)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (h_NH,) = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_h = torch.empty_like(h_NH)
        numel = grad_out.numel()
        hidden = h_NH.shape[-1] // 2
        _swiglu_backward_kernel[(triton.cdiv(numel, _BLOCK),)](h_NH, grad_out, grad_h, numel, hidden, BLOCK=_BLOCK)
        return grad_h


def swiglu_reference(h: Tensor) -> Tensor:
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def swiglu(h: Tensor) -> Tensor:
    """``silu(gate) * up`` with ``h = [gate | up]`` on the last dim: the fused kernel on CUDA, the reference elsewhere."""
    if HAS_TRITON and h.is_cuda:
        return _TritonSwiGLU.apply(h)
    return swiglu_reference(h)

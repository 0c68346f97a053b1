"""RMSNorm with fp32 statistics, one Triton kernel each way, beside torch's own.

torch's CUDA RMSNorm runs its backward as two kernels (input gradient, then a weight-gradient reduction that reads
the activations again); here the backward reads ``x`` and the output gradient once, writes the input gradient and
per-program fp32 partial sums of the weight gradient, which one small sum finishes. The forward keeps one fp32
reciprocal RMS per row for it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moe_lightning.kernels import HAS_TRITON

MAX_FUSED_DIM = 16384
"""Rows wider than this take torch's RMSNorm: the kernels hold a whole row in registers."""

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rms_norm_forward_kernel(x_ptr, weight_ptr, out_ptr, rstd_ptr, dim, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < dim
        x = tl.load(x_ptr + row * dim + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / dim + eps)
        weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * dim + cols, (x * rstd * weight).to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(rstd_ptr + row, rstd)

    @triton.jit
    def _rms_norm_backward_kernel(
        x_ptr, weight_ptr, rstd_ptr, grad_out_ptr, grad_x_ptr, grad_weight_partial_ptr,
        rows, dim, rows_per_program, BLOCK: tl.constexpr,
    ):
        program = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < dim
        weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        grad_weight = tl.zeros((BLOCK,), tl.float32)
        first = program.to(tl.int64) * rows_per_program
        for row in range(first, tl.minimum(first + rows_per_program, rows)):
            x = tl.load(x_ptr + row * dim + cols, mask=mask, other=0.0).to(tl.float32)
            grad_out = tl.load(grad_out_ptr + row * dim + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + row)
            x_hat = x * rstd
            grad_weight += grad_out * x_hat
            # d/dx of x * rstd * w: rstd * (g - x_hat * mean(g * x_hat)), with g = grad_out * w
            g = grad_out * weight
            grad_x = rstd * (g - x_hat * (tl.sum(g * x_hat, axis=0) / dim))
            tl.store(grad_x_ptr + row * dim + cols, grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask)
        tl.store(grad_weight_partial_ptr + program * dim + cols, grad_weight, mask=mask)


class _TritonRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        x_ND = x.reshape(-1, x.shape[-1]).contiguous()
        rows, dim = x_ND.shape
        out = torch.empty_like(x_ND)
        rstd_N = torch.empty(rows, device=x.device, dtype=torch.float32)
        block = triton.next_power_of_2(dim)
        _rms_norm_forward_kernel[(rows,)](x_ND, weight, out, rstd_N, dim, eps, BLOCK=block, num_warps=_warps(block))
        ctx.save_for_backward(x_ND, weight, rstd_N)
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x_ND, weight, rstd_N = ctx.saved_tensors
        rows, dim = x_ND.shape
        grad_out_ND = grad_out.reshape(rows, dim).contiguous()
        grad_x = torch.empty_like(x_ND)
        # A few programs per SM, each owning a run of rows: enough parallelism, few partial weight gradients.
        programs = min(rows, 4 * torch.cuda.get_device_properties(x_ND.device).multi_processor_count)
        rows_per_program = triton.cdiv(rows, programs)
        programs = triton.cdiv(rows, rows_per_program)
        partial_PD = torch.empty(programs, dim, device=x_ND.device, dtype=torch.float32)
        block = triton.next_power_of_2(dim)
        _rms_norm_backward_kernel[(programs,)](
            x_ND, weight, rstd_N, grad_out_ND, grad_x, partial_PD, rows, dim, rows_per_program,
            BLOCK=block, num_warps=_warps(block),
        )
        return grad_x.view(grad_out.shape), partial_PD.sum(0).to(weight.dtype), None


def _warps(block: int) -> int:
    return min(max(block // 256, 1), 16)


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` (same parameters and state dict) that runs the fused kernels on CUDA when it can: a 1-D
    affine weight of the input's dtype, a row of at most :data:`MAX_FUSED_DIM`, autocast off. Otherwise, torch's."""

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight
        if (
            HAS_TRITON and x.is_cuda and weight is not None and weight.dim() == 1 and weight.dtype == x.dtype
            and x.shape[-1] <= MAX_FUSED_DIM and not torch.is_autocast_enabled(x.device.type)
        ):
            eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
            return _TritonRMSNorm.apply(x, weight, eps)
        return super().forward(x)

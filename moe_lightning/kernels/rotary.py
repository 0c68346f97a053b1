"""Rotary position embedding (rotate-half layout) in fp32, one Triton kernel each way, beside its reference.

The reference casts the queries or keys to fp32, multiplies the two halves by the gathered cos and sin, concatenates
and casts back: about ten passes over the activation, forward and again backward. Fused, each direction reads the
activation once and writes it once, computing in fp32 in registers; the backward is the same kernel rotating by
the negated angle (a rotation's inverse is its transpose).
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_lightning.kernels import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rotate_kernel(
        x_ptr, out_ptr, cos_ptr, sin_ptr, pos_ptr,
        length, heads, half,
        x_stride_b, x_stride_h, x_stride_l,
        out_stride_b, out_stride_h, out_stride_l,
        pos_stride_b, pos_stride_l, table_stride, table_len,
        sin_sign, BLOCK_H: tl.constexpr, BLOCK_F: tl.constexpr,
    ):
        # One program per (batch row, position) and block of heads: every head shares the position's angles.
        token = tl.program_id(0).to(tl.int64)
        b, l = token // length, token % length
        pos = tl.load(pos_ptr + b * pos_stride_b + l * pos_stride_l)
        f = tl.arange(0, BLOCK_F)
        f_mask = f < half
        # A position past the tables gives NaN (the reference's indexing raises, which needs a host sync).
        in_range = (pos >= 0) & (pos < table_len)
        row = tl.where(in_range, pos, 0) * table_stride
        cos = tl.where(in_range, tl.load(cos_ptr + row + f, mask=f_mask, other=0.0).to(tl.float32), float("nan"))
        sin = tl.where(in_range, tl.load(sin_ptr + row + f, mask=f_mask, other=0.0).to(tl.float32), float("nan"))
        cos, sin = cos[None, :], sin[None, :]
        sin = sin_sign * sin
        h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        mask = (h < heads)[:, None] & f_mask[None, :]
        x_offsets = b * x_stride_b + l * x_stride_l + h[:, None] * x_stride_h + f[None, :]
        x1 = tl.load(x_ptr + x_offsets, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + x_offsets + half, mask=mask, other=0.0).to(tl.float32)
        out_offsets = b * out_stride_b + l * out_stride_l + h[:, None] * out_stride_h + f[None, :]
        dtype = out_ptr.dtype.element_ty
        tl.store(out_ptr + out_offsets, (x1 * cos - x2 * sin).to(dtype), mask=mask)
        tl.store(out_ptr + out_offsets + half, (x2 * cos + x1 * sin).to(dtype), mask=mask)

    def _rotate(x_BHLDh: Tensor, cos_LF: Tensor, sin_LF: Tensor, positions: Tensor, sin_sign: float) -> Tensor:
        if x_BHLDh.stride(-1) != 1:
            x_BHLDh = x_BHLDh.contiguous()
        batch, heads, length, head_dim = x_BHLDh.shape
        out = torch.empty_like(x_BHLDh)
        pos_stride_b, pos_stride_l = (0, positions.stride(0)) if positions.dim() == 1 else positions.stride()
        block_h = min(triton.next_power_of_2(heads), 16)
        grid = (batch * length, triton.cdiv(heads, block_h))
        _rotate_kernel[grid](
            x_BHLDh, out, cos_LF, sin_LF, positions, length, heads, head_dim // 2,
            x_BHLDh.stride(0), x_BHLDh.stride(1), x_BHLDh.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            pos_stride_b, pos_stride_l, cos_LF.stride(0), cos_LF.shape[0],
            sin_sign, BLOCK_H=block_h, BLOCK_F=triton.next_power_of_2(head_dim // 2),
        )
        return out


class _TritonRotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_BHLDh: Tensor, cos_LF: Tensor, sin_LF: Tensor, positions: Tensor) -> Tensor:
        ctx.save_for_backward(cos_LF, sin_LF, positions)
        return _rotate(x_BHLDh, cos_LF, sin_LF, positions, 1.0)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        cos_LF, sin_LF, positions = ctx.saved_tensors
        return _rotate(grad_out, cos_LF, sin_LF, positions, -1.0), None, None, None


def rotary_reference(x_BHLDh: Tensor, cos_LF: Tensor, sin_LF: Tensor, positions: Tensor) -> Tensor:
    cos, sin = cos_LF[positions], sin_LF[positions]
    if positions.dim() == 2:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, L, F]: the same angle in every head
    x1, x2 = x_BHLDh.float().chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return rotated.to(x_BHLDh.dtype)


def apply_rotary(x_BHLDh: Tensor, cos_LF: Tensor, sin_LF: Tensor, positions: Tensor) -> Tensor:
    """Rotate ``x_BHLDh`` ``[B, H, L, Dh]`` by the fp32 angle tables ``cos_LF`` / ``sin_LF`` ``[max_len, Dh / 2]`` at
    ``positions`` (``[L]`` shared by every row, or ``[B, L]``). The fused kernels on CUDA, the reference elsewhere."""
    if HAS_TRITON and x_BHLDh.is_cuda:
        return _TritonRotary.apply(x_BHLDh, cos_LF, sin_LF, positions)
    return rotary_reference(x_BHLDh, cos_LF, sin_LF, positions)

"""Mean token cross-entropy over half-precision logits with fp32 math, one Triton kernel each way, beside its reference.

The reference, ``F.cross_entropy(logits.float(), labels)``, first writes an fp32 copy of the ``[N, V]`` logits,
then fp32 log-probabilities, and in the backward an fp32 gradient that is cast back: at a 32k vocabulary and 16k
tokens that is several GB of traffic and memory per step. Fused, the forward reads the logits once and keeps one
fp32 log-sum-exp per row; the backward reads them once more and writes ``softmax - one_hot`` in their own dtype.
Unlike Liger-Kernel's cross-entropy, the gradient goes to a new tensor, so the logits stay valid after the loss
(a :meth:`MoELightningModule.compute_loss` override may still read them).
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
    def _logsumexp_forward_kernel(
        logits_ptr, labels_ptr, lse_ptr, loss_ptr, vocab, row_stride, ignore_index, BLOCK: tl.constexpr
    ):
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + row * row_stride
        # Online log-sum-exp over the row in BLOCK-wide chunks: running max m and sum of exp(x - m).
        running_max = tl.full((), float("-inf"), tl.float32)
        running_sum = tl.zeros((), tl.float32)
        for start in range(0, vocab, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(row_ptr + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
            new_max = tl.maximum(running_max, tl.max(x, axis=0))
            running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
            running_max = new_max
        lse = running_max + tl.log(running_sum)
        tl.store(lse_ptr + row, lse)
        label = tl.load(labels_ptr + row)
        ignored = label == ignore_index
        in_range = (label >= 0) & (label < vocab)
        target = tl.load(row_ptr + tl.where(in_range, label, 0)).to(tl.float32)
        # A label outside the vocabulary makes the loss NaN (the reference raises, which needs a host sync).
        loss = tl.where(in_range, lse - target, float("nan"))
        tl.store(loss_ptr + row, tl.where(ignored, 0.0, loss))

    @triton.jit
    def _softmax_minus_onehot_kernel(
        logits_ptr, labels_ptr, lse_ptr, scale_ptr, grad_ptr, vocab, row_stride, ignore_index, BLOCK: tl.constexpr
    ):
        row = tl.program_id(0).to(tl.int64)
        label = tl.load(labels_ptr + row)
        # scale = d loss / d (mean): grad_output / (number of counted rows); ignored rows get zero gradient.
        scale = tl.where(label == ignore_index, 0.0, tl.load(scale_ptr))
        lse = tl.load(lse_ptr + row)
        for start in range(0, vocab, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < vocab
            x = tl.load(logits_ptr + row * row_stride + cols, mask=mask, other=0.0).to(tl.float32)
            grad = (tl.exp(x - lse) - tl.where(cols == label, 1.0, 0.0)) * scale
            tl.store(grad_ptr + row * vocab + cols, grad.to(grad_ptr.dtype.element_ty), mask=mask)


_BLOCK = 4096


class _TritonCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_NV: Tensor, labels_N: Tensor, ignore_index: int) -> Tensor:
        if logits_NV.stride(-1) != 1:
            logits_NV = logits_NV.contiguous()
        labels_N = labels_N.contiguous()  # the kernels index labels by row
        rows, vocab = logits_NV.shape
        lse_N = torch.empty(rows, device=logits_NV.device, dtype=torch.float32)
        loss_N = torch.empty_like(lse_N)
        _logsumexp_forward_kernel[(rows,)](
            logits_NV, labels_N, lse_N, loss_N, vocab, logits_NV.stride(0), ignore_index, BLOCK=_BLOCK
        )
        # As F.cross_entropy: the mean over counted rows, NaN when every row is ignored.
        counted = (labels_N != ignore_index).sum()
        ctx.save_for_backward(logits_NV, labels_N, lse_N, counted)
        ctx.ignore_index = ignore_index
        return loss_N.sum() / counted

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        logits_NV, labels_N, lse_N, counted = ctx.saved_tensors
        rows, vocab = logits_NV.shape
        scale = (grad_loss.float() / counted).reshape(1)
        grad_NV = torch.empty(rows, vocab, device=logits_NV.device, dtype=logits_NV.dtype)
        _softmax_minus_onehot_kernel[(rows,)](
            logits_NV, labels_N, lse_N, scale, grad_NV, vocab, logits_NV.stride(0), ctx.ignore_index, BLOCK=_BLOCK
        )
        return grad_NV, None, None


def cross_entropy_reference(logits_NV: Tensor, labels_N: Tensor, ignore_index: int = -100) -> Tensor:
    return F.cross_entropy(logits_NV.float(), labels_N, ignore_index=ignore_index)


def cross_entropy(logits_NV: Tensor, labels_N: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean cross-entropy of ``logits_NV`` ``[N, V]`` against ``labels_N`` ``[N]``, computed in fp32 whatever the
    logits' dtype; rows labelled ``ignore_index`` do not count. The fused kernels on CUDA, the reference elsewhere."""
    if HAS_TRITON and logits_NV.is_cuda:
        return _TritonCrossEntropy.apply(logits_NV, labels_N, ignore_index)
    return cross_entropy_reference(logits_NV, labels_N, ignore_index)

"""AdamW whose CUDA step is one Triton kernel per parameter tensor, beside torch's AdamW as the reference.

torch's fused AdamW moved bf16 parameters, gradients and moments at about 2.6 TB/s on an H200, about 55 % of the
card's bandwidth, and took 18 of the 137 ms of a whole-model training step (benchmarks/RESULTS.md). The update is
purely memory-bound: read parameter, gradient and both moments once, write parameter and moments once, with the
arithmetic in fp32 registers. The math, the hyper-parameters, the param groups and the state dict are torch's
``AdamW``'s, so checkpoints, schedulers and the strategies' handling of param groups work unchanged; anything the
kernel does not cover (CPU or ``DTensor`` parameters, ``amsgrad``, ``maximize``, ``capturable``, ``differentiable``,
a tensor learning rate, sparse or mixed-dtype gradients) takes torch's step.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from moe_lightning.kernels import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _adamw_kernel(
        param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, numel,
        decay_factor, beta1, beta2, step_size, bias_correction2_sqrt, eps, BLOCK: tl.constexpr,
    ):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < numel
        param = tl.load(param_ptr + offsets, mask=mask).to(tl.float32)
        grad = tl.load(grad_ptr + offsets, mask=mask).to(tl.float32)
        exp_avg = tl.load(exp_avg_ptr + offsets, mask=mask).to(tl.float32)
        exp_avg_sq = tl.load(exp_avg_sq_ptr + offsets, mask=mask).to(tl.float32)
        # torch's order: decoupled decay, then the moments, then the bias-corrected step.
        param = param * decay_factor
        exp_avg = exp_avg + (1.0 - beta1) * (grad - exp_avg)
        exp_avg_sq = exp_avg_sq * beta2 + (1.0 - beta2) * grad * grad
        # IEEE-rounded square root and division, as torch's kernels use (Triton's defaults are approximate).
        denom = tl.div_rn(tl.sqrt_rn(exp_avg_sq), bias_correction2_sqrt) + eps
        param = param - tl.div_rn(step_size * exp_avg, denom)
        tl.store(param_ptr + offsets, param.to(param_ptr.dtype.element_ty), mask=mask)
        tl.store(exp_avg_ptr + offsets, exp_avg.to(exp_avg_ptr.dtype.element_ty), mask=mask)
        tl.store(exp_avg_sq_ptr + offsets, exp_avg_sq.to(exp_avg_sq_ptr.dtype.element_ty), mask=mask)


_BLOCK = 4096
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _update(
    param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: float,
    lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
) -> None:
    """One AdamW update of one tensor in place; ``step`` counts this update (1 on the first)."""
    numel = param.numel()
    _adamw_kernel[(triton.cdiv(numel, _BLOCK),)](
        param, grad, exp_avg, exp_avg_sq, numel, 1.0 - lr * weight_decay, beta1, beta2,
        lr / (1.0 - beta1**step), math.sqrt(1.0 - beta2**step), eps, BLOCK=_BLOCK,
    )


class TritonAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` (same arguments, same state) with a Triton step on CUDA. ``foreach`` and ``fused``
    only choose torch's implementation where torch's step runs."""

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:  # first: the gradients the kernel's checks look at are the closure's
            with torch.enable_grad():
                loss = closure()
        if not self._kernel_applies():
            super().step()
            return loss
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:  # as torch's AdamW initialises it (step on the host, not capturable)
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["step"] += 1
                _update(param, param.grad, state["exp_avg"], state["exp_avg_sq"], float(state["step"]),
                        lr, beta1, beta2, eps, weight_decay)
        return loss

    def _kernel_applies(self) -> bool:
        if not HAS_TRITON:
            return False
        for group in self.param_groups:
            if group["amsgrad"] or group["maximize"] or group["capturable"] or group["differentiable"]:
                return False
            if isinstance(group["lr"], Tensor) or any(isinstance(beta, Tensor) for beta in group["betas"]):
                return False
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state.get(param)
                if (
                    not param.is_cuda or isinstance(param, DTensor) or param.dtype not in _KERNEL_DTYPES
                    or param.grad.is_sparse or param.grad.dtype != param.dtype
                    or not param.is_contiguous() or not param.grad.is_contiguous()
                    or (state and (state["step"].is_cuda or not state["exp_avg"].is_contiguous()))
                ):
                    return False
        return True

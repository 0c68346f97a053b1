"""Gradient-norm clipping over the whole expert-parallel model.

``torch.nn.utils.clip_grad_norm_`` on one rank sees the dense gradients and only that rank's slice of the experts,
so each rank of an expert-parallel group would compute its own norm and scale its (identical) dense gradients by a
different factor: the replicas would drift apart. Here the norm is that of the one-process model: the dense
gradients (already equal on every rank) count once, and the squared norms of the expert slices are summed over the
expert-parallel group (the data-parallel replicas hold equal, already reduced expert gradients).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

# As torch.nn.utils.clip_grad_norm_: keeps the scale finite when every gradient is zero.
EPS = 1e-6


@torch.no_grad()
def clip_grad_norm_over_experts(
    dense: list[nn.Parameter], experts: list[nn.Parameter], expert_parallel_group: dist.ProcessGroup, max_norm: float,
) -> Tensor:
    """Scale every gradient so the global L2 norm is at most ``max_norm``; return the norm before clipping."""
    grads = [p.grad for p in (*dense, *experts) if p.grad is not None]
    if not grads:
        return torch.zeros(())
    device = grads[0].device
    dense_sq = _squared_norm([p.grad for p in dense if p.grad is not None], device)
    expert_sq = _squared_norm([p.grad for p in experts if p.grad is not None], device)
    dist.all_reduce(expert_sq, group=expert_parallel_group)
    total_norm = (dense_sq + expert_sq).sqrt()
    scale = (max_norm / (total_norm + EPS)).clamp(max=1.0)
    for grad in grads:
        grad.mul_(scale.to(grad.dtype))
    return total_norm


def _squared_norm(grads: list[Tensor], device: torch.device) -> Tensor:
    if not grads:
        return torch.zeros((), device=device, dtype=torch.float32)
    return torch.stack([g.float().pow(2).sum() for g in grads]).sum()

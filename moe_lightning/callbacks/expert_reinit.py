"""Re-initialise dead experts of an MoE layer as noisy copies of a busy one (plain PyTorch)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from moe_lightning.layer import MoELayer


@torch.no_grad()
def reinit_dead_experts(
    layer: MoELayer, dead_E: Tensor, donor: int, noise: float, generator: torch.Generator, optimizers: Iterable[Optimizer] = ()
) -> list[int]:
    """Copy expert ``donor`` into each dead expert, in the experts' and the router's per-expert parameters (those whose
    first dimension is E), plus Gaussian noise of ``noise`` times the donor slice's std; zero the optimizer state of
    the copied slices. The router then splits the donor's tokens between the copies, so the dead experts train again.

    ``generator`` must be seeded alike on every rank so that data-parallel replicas stay identical. Returns the
    re-initialised experts.
    """
    num_experts = layer.num_experts
    dead = [e for e in dead_E.nonzero().flatten().tolist() if e != donor]
    params = [p for module in (layer.router, layer.experts) for p in module.parameters() if p.shape[:1] == (num_experts,)]
    states = [opt.state.get(p, {}) for opt in optimizers for p in params]
    for param in params:
        scale = noise * float(param[donor].float().std()) if param[donor].numel() > 1 else 0.0
        for expert in dead:
            jitter = torch.randn(param.shape[1:], generator=generator) * scale
            param[expert] = param[donor] + jitter.to(param.device, param.dtype)
    for state in states:
        for value in state.values():
            if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == num_experts:
                value[dead] = 0
    return dead

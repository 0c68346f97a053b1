"""Cost per expert activation: matmul FLOPs of one routed row through one feed-forward expert."""

from __future__ import annotations

from torch import Tensor


def expert_flops_per_row(dim: int, hidden_dim: int, gated: bool = True) -> int:
    """Forward FLOPs of one row: ``2 * D * F`` per matrix; SwiGLU-style gated experts have 3 matrices, plain ones 2."""
    if dim < 1 or hidden_dim < 1:
        raise ValueError(f"dim and hidden_dim must be >= 1, got dim={dim}, hidden_dim={hidden_dim}")
    return 2 * (3 if gated else 2) * dim * hidden_dim


def expert_flops(load_E: Tensor, dim: int, hidden_dim: int, gated: bool = True) -> Tensor:
    """``[E]`` forward FLOPs each expert spent on its routed rows."""
    return load_E.double() * expert_flops_per_row(dim, hidden_dim, gated)

"""Router entropy: how sure each token's routing is, and how spread the load is (in nats)."""

from __future__ import annotations

import torch
from torch import Tensor


def distribution_entropy(p: Tensor, dim: int = -1) -> Tensor:
    """Entropy ``-sum p log p`` along ``dim`` after normalising to sum 1 (so sigmoid scores work too); 0 log 0 = 0."""
    p = p.double()
    p = p / p.sum(dim=dim, keepdim=True).clamp_min(1e-300)
    return -torch.special.xlogy(p, p).sum(dim=dim)


def token_entropy(probs_TE: Tensor) -> Tensor:
    """Per-token entropy of the router scores, ``[T]``."""
    return distribution_entropy(probs_TE, dim=-1)


def load_entropy(load_E: Tensor) -> Tensor:
    """Entropy of the load distribution over experts: ``log(E)`` is uniform, 0 is one expert taking all."""
    return distribution_entropy(load_E, dim=-1)

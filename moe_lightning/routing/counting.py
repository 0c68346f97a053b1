"""Counting routed rows per expert (or per any bin) with a shape torch.compile can trace."""

from __future__ import annotations

import torch
from torch import Tensor


def count_per_bin(index_N: Tensor, num_bins: int) -> Tensor:
    """``bincount`` with a fixed output length: ``torch.bincount``'s length depends on the data, which
    ``torch.compile`` can only treat as an unknown size."""
    counts = torch.zeros(num_bins, dtype=torch.long, device=index_N.device)
    return counts.index_add_(0, index_N, torch.ones_like(index_N))

"""Expert load statistics: how many routed rows each expert got, and how unevenly.

Shape legend: E experts. Loads are counts (rows per expert), summed over any number of steps and ranks.
"""

from __future__ import annotations

import torch
from torch import Tensor


def load_share(load_E: Tensor) -> Tensor:
    """Each expert's fraction of the rows (zeros when nothing was routed)."""
    load_E = load_E.double()
    return load_E / load_E.sum().clamp_min(1)


def coefficient_of_variation(load_E: Tensor) -> Tensor:
    """Population standard deviation of the load over its mean: 0 is perfect balance."""
    load_E = load_E.double()
    return load_E.std(correction=0) / load_E.mean().clamp_min(1e-12)


def max_mean_imbalance(load_E: Tensor) -> Tensor:
    """Busiest expert's load over the mean load: 1 is perfect balance, E is one expert taking everything."""
    load_E = load_E.double()
    return load_E.max() / load_E.mean().clamp_min(1e-12)


def dead_experts(load_E: Tensor, threshold: float) -> Tensor:
    """Bool mask of experts whose load is at most ``threshold`` times the mean load.

    ``load_E`` should be summed over a window of steps, so one unlucky step does not declare an expert dead;
    ``threshold=0`` flags only experts that got no row at all.
    """
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got threshold={threshold}")
    load_E = load_E.double()
    return load_E <= threshold * load_E.mean()


def dropped_fraction(num_dropped: Tensor | float, num_requested: Tensor | float) -> Tensor:
    """Rows dropped for capacity over the rows the router asked for (0 when nothing was asked)."""
    num_requested = torch.as_tensor(num_requested, dtype=torch.float64)
    return torch.as_tensor(num_dropped, dtype=torch.float64) / num_requested.clamp_min(1)

"""Expert co-occurrence: how often two experts are picked for the same token."""

from __future__ import annotations

from torch import Tensor

from moe_lightning.analytics.assignment import chosen_experts
from moe_lightning.routing.base import Routing


def cooccurrence_counts(routing: Routing) -> Tensor:
    """``[E, E]``: entry ``(i, j)`` counts tokens sent to both i and j; the diagonal counts tokens sent to i."""
    chosen_TE = chosen_experts(routing).double()
    return chosen_TE.T @ chosen_TE

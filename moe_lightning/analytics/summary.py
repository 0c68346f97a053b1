"""A short per-layer digest of routing decisions: how evenly the experts are loaded."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from moe_lightning.analytics.entropy import load_entropy
from moe_lightning.analytics.load import load_share, max_mean_imbalance
from moe_lightning.routing.base import Routing


@dataclass
class LayerSummary:
    layer: int
    num_experts: int
    routed_rows: int
    imbalance: float
    """Busiest expert's load over the mean load (1.0 is perfect balance)."""
    min_share: float
    """Smallest share of rows any expert received."""
    max_share: float
    """Largest share of rows any expert received."""
    idle_experts: int
    """Experts that received no row."""
    dropped_fraction: float
    load_entropy: float
    """Entropy of the load distribution divided by log(num_experts): 1.0 is uniform."""

    def as_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def summarize_routings(routings: list[Routing]) -> list[LayerSummary]:
    summaries = []
    for layer, routing in enumerate(routings):
        load_E = routing.tokens_per_expert_E.double()
        share_E = load_share(load_E)
        num_experts = routing.num_experts
        summaries.append(
            LayerSummary(
                layer=layer,
                num_experts=num_experts,
                routed_rows=int(load_E.sum()),
                imbalance=float(max_mean_imbalance(load_E)),
                min_share=float(share_E.min()),
                max_share=float(share_E.max()),
                idle_experts=int((load_E == 0).sum()),
                dropped_fraction=float(routing.dropped_fraction),
                load_entropy=float(load_entropy(load_E) / math.log(num_experts)) if num_experts > 1 else 1.0,
            )
        )
    return summaries

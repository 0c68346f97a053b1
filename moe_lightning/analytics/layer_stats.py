"""Per-layer statistics computed from summed :class:`RoutingCounts` (after the reduction over ranks)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from moe_lightning.analytics.counts import RoutingCounts
from moe_lightning.analytics.entropy import load_entropy
from moe_lightning.analytics.load import coefficient_of_variation, dead_experts, dropped_fraction, load_share, max_mean_imbalance
from moe_lightning.analytics.specialisation import normalized_mutual_information


@dataclass
class LayerRoutingStats:
    layer: int
    routed_rows: int
    load_share: list[float]
    """Each expert's fraction of the routed rows."""
    cv: float
    """Coefficient of variation of the load (0 is perfect balance)."""
    imbalance: float
    """Max over mean load (1 is perfect balance)."""
    load_entropy: float
    """Entropy of the load over ``log(E)``: 1 is uniform."""
    token_entropy: float
    """Mean per-token entropy of the router scores over ``log(E)``: 1 is undecided, 0 is certain."""
    dead_experts: int
    """Experts whose load was at most ``dead_threshold`` times the mean."""
    dropped_fraction: float
    near_tie_fraction: float
    """Tokens whose top-k margin was under the near-tie threshold."""
    nmi: float | None
    """Normalised mutual information of label and top-1 expert; None without labels."""
    churn: float | None
    """Share of probe tokens whose top-1 expert changed; None before the second probe."""

    def as_dict(self) -> dict:
        return asdict(self)

    def scalars(self) -> dict[str, float]:
        """The scalar fields that are defined, for a logger."""
        names = ("cv", "imbalance", "load_entropy", "token_entropy", "dead_experts", "dropped_fraction",
                 "near_tie_fraction", "nmi", "churn")
        return {name: float(getattr(self, name)) for name in names if getattr(self, name) is not None}


def layer_statistics(counts: RoutingCounts, dead_threshold: float = 0.0) -> list[LayerRoutingStats]:
    """One :class:`LayerRoutingStats` per layer; syncs with the host (call it only when logging)."""
    log_e = math.log(counts.num_experts) if counts.num_experts > 1 else 1.0
    stats = []
    for layer in range(counts.num_layers):
        load_E = counts.load_LE[layer]
        tokens = float(counts.tokens_L[layer])
        probed = float(counts.churn_probed_L[layer])
        labelled = counts.num_labels and float(counts.label_expert_LCE[layer].sum()) > 0
        stats.append(
            LayerRoutingStats(
                layer=layer,
                routed_rows=int(load_E.sum()),
                load_share=load_share(load_E).tolist(),
                cv=float(coefficient_of_variation(load_E)),
                imbalance=float(max_mean_imbalance(load_E)),
                load_entropy=float(load_entropy(load_E)) / log_e,
                token_entropy=float(counts.entropy_sum_L[layer]) / max(tokens, 1.0) / log_e,
                dead_experts=int(dead_experts(load_E, dead_threshold).sum()),
                dropped_fraction=float(dropped_fraction(counts.dropped_L[layer], counts.requested_L[layer])),
                near_tie_fraction=float(counts.near_ties_L[layer]) / max(tokens, 1.0),
                nmi=float(normalized_mutual_information(counts.label_expert_LCE[layer])) if labelled else None,
                churn=float(counts.churn_changed_L[layer]) / probed if probed else None,
            )
        )
    return stats

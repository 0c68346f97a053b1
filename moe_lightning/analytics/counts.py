"""RoutingCounts: every statistic's raw counts for all MoE layers, summed over steps.

Everything here is a sum, so combining steps is ``+`` and combining data-parallel ranks is one all-reduce sum of
:meth:`RoutingCounts.flatten` (float64 holds integer counts exactly up to 2**53).

Shape legend: L layers, E experts, C label classes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from moe_lightning.analytics.assignment import top1_expert
from moe_lightning.analytics.cooccurrence import cooccurrence_counts
from moe_lightning.analytics.entropy import token_entropy
from moe_lightning.analytics.near_ties import BF16_TIE_MARGIN, near_tie_mask
from moe_lightning.analytics.specialisation import label_expert_counts
from moe_lightning.analytics.transitions import transition_counts
from moe_lightning.routing.base import Routing


@dataclass
class RoutingCounts:
    load_LE: Tensor
    """Routed rows per expert."""
    dropped_L: Tensor
    """Rows dropped for capacity."""
    requested_L: Tensor
    """Rows the routers asked for."""
    tokens_L: Tensor
    """Tokens routed (for means over tokens)."""
    entropy_sum_L: Tensor
    """Sum over tokens of the router-score entropy (nats)."""
    near_ties_L: Tensor
    """Tokens whose top-k margin was under the near-tie threshold."""
    cooccurrence_LEE: Tensor
    """Tokens sent to both experts i and j (diagonal: to i)."""
    label_expert_LCE: Tensor
    """Tokens of label c whose top-1 expert is e (C = 0 when there are no labels)."""
    transitions_LEE: Tensor
    """Top-1 expert at layer l (first index, L - 1 entries) to top-1 expert at layer l + 1."""
    churn_changed_L: Tensor
    """Probe tokens whose top-1 expert changed between checks."""
    churn_probed_L: Tensor
    """Probe tokens compared."""

    @classmethod
    def zeros(cls, num_layers: int, num_experts: int, num_labels: int = 0, device: torch.device | str | None = None) -> RoutingCounts:
        def z(*shape: int) -> Tensor:
            return torch.zeros(*shape, dtype=torch.float64, device=device)

        L, E = num_layers, num_experts
        return cls(
            load_LE=z(L, E), dropped_L=z(L), requested_L=z(L), tokens_L=z(L), entropy_sum_L=z(L), near_ties_L=z(L),
            cooccurrence_LEE=z(L, E, E), label_expert_LCE=z(L, num_labels, E), transitions_LEE=z(max(L - 1, 0), E, E),
            churn_changed_L=z(L), churn_probed_L=z(L),
        )

    @property
    def num_layers(self) -> int:
        return self.load_LE.shape[0]

    @property
    def num_experts(self) -> int:
        return self.load_LE.shape[1]

    @property
    def num_labels(self) -> int:
        return self.label_expert_LCE.shape[1]

    @torch.no_grad()
    def add_routings(
        self, routings: Sequence[Routing], labels_T: Tensor | None = None, near_tie_threshold: float = BF16_TIE_MARGIN
    ) -> None:
        """Add one step's routings (one per layer, all over the same tokens); stays on device, no host sync."""
        if len(routings) != self.num_layers:
            raise ValueError(f"expected {self.num_layers} routings (one per MoE layer), got {len(routings)}")
        top1 = []
        for layer, routing in enumerate(routings):
            if routing.num_experts != self.num_experts:
                raise ValueError(f"layer {layer} has {routing.num_experts} experts, expected {self.num_experts}")
            # Rows per token: K for top-k routers; the margin below it is the one rounding can flip.
            k = max(1, round(routing.num_requested / max(routing.num_tokens, 1)))
            self.load_LE[layer] += routing.tokens_per_expert_E
            self.dropped_L[layer] += routing.num_dropped
            self.requested_L[layer] += routing.num_requested
            self.tokens_L[layer] += routing.num_tokens
            self.entropy_sum_L[layer] += token_entropy(routing.probs_TE).sum()
            self.near_ties_L[layer] += near_tie_mask(routing.probs_TE, k, near_tie_threshold).sum()
            self.cooccurrence_LEE[layer] += cooccurrence_counts(routing)
            if labels_T is not None and self.num_labels:
                self.label_expert_LCE[layer] += label_expert_counts(routing, labels_T, self.num_labels)
            top1.append(top1_expert(routing))
        for layer in range(self.num_layers - 1):
            self.transitions_LEE[layer] += transition_counts(top1[layer], top1[layer + 1], self.num_experts)

    def add_churn(self, layer: int, changed: Tensor | int, probed: int) -> None:
        self.churn_changed_L[layer] += changed
        self.churn_probed_L[layer] += probed

    def flatten(self) -> Tensor:
        """All counts as one float64 vector, for a single all-reduce."""
        return torch.cat([getattr(self, f.name).reshape(-1) for f in fields(self)])

    def with_flat(self, flat: Tensor) -> RoutingCounts:
        """Counts of the same shapes filled from ``flat`` (e.g. the all-reduced :meth:`flatten`)."""
        parts, offset = {}, 0
        for f in fields(self):
            like = getattr(self, f.name)
            parts[f.name] = flat[offset : offset + like.numel()].view_as(like)
            offset += like.numel()
        return RoutingCounts(**parts)

    def reduced(self, sum_fn: Callable[[Tensor], Tensor]) -> RoutingCounts:
        """The counts summed by ``sum_fn`` (e.g. ``lambda t: strategy.reduce(t, reduce_op="sum")``)."""
        return self.with_flat(sum_fn(self.flatten()))

    def to(self, device: torch.device | str) -> RoutingCounts:
        return RoutingCounts(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def state_dict(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name).cpu() for f in fields(self)}

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]) -> RoutingCounts:
        return cls(**{f.name: state[f.name].double() for f in fields(cls)})

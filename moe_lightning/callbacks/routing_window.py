"""What the router callbacks measure between two checks: the routing counts of the sampled steps, summed over ranks
at the check, and the churn of a fixed probe batch."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.strategies import Strategy
from torch import Tensor

from moe_lightning.analytics import BF16_TIE_MARGIN, RoutingCounts, churn_counts, top1_expert
from moe_lightning.module import unpack_output
from moe_lightning.routing.base import Routing


class CountsWindow:
    """The :class:`RoutingCounts` of the steps added since the last :meth:`take_reduced`, kept on the routings' device:
    adding never syncs with the host.

    Args:
        num_labels: label classes of the label x expert counts (0: none); may be set until the first :meth:`add`.
        near_tie_threshold: top-k score margin under which a token counts as a near-tie.
    """

    def __init__(self, num_labels: int = 0, near_tie_threshold: float = BF16_TIE_MARGIN) -> None:
        self.num_labels = num_labels
        self.near_tie_threshold = near_tie_threshold
        self.counts: RoutingCounts | None = None

    def add(self, routings: list[Routing], labels_T: Tensor | None = None) -> RoutingCounts:
        device = routings[0].tokens_per_expert_E.device
        if self.counts is None:
            self.counts = RoutingCounts.zeros(len(routings), routings[0].num_experts, self.num_labels, device)
        elif self.counts.load_LE.device != device:  # restored from a checkpoint on the CPU
            self.counts = self.counts.to(device)
        self.counts.add_routings(routings, labels_T, self.near_tie_threshold)
        return self.counts

    def take_reduced(self, strategy: Strategy) -> RoutingCounts:
        """The counts summed over all ranks in one all-reduce; the window starts empty again."""
        reduced = self.counts.reduced(lambda flat: strategy.reduce(flat, reduce_op="sum"))
        self.counts = None
        return reduced

    def state_dict(self) -> dict[str, Any]:
        return {"counts": None if self.counts is None else self.counts.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        counts = state_dict["counts"]
        self.counts = None if counts is None else RoutingCounts.from_state_dict(counts)


class ChurnProbe:
    """Routing churn of a fixed probe batch: the first ``size`` sequences of the first batch it sees, routed in eval
    mode at each check; :meth:`add_churn` counts the tokens whose top-1 expert changed since the previous check."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.input_ids: Tensor | None = None
        self.top1: list[Tensor] | None = None

    @torch.no_grad()
    def route(self, pl_module: LightningModule, batch: Any) -> list[Routing]:
        """The probe batch's routings (the first call keeps ``batch``'s first sequences as the probe)."""
        if self.input_ids is None:
            self.input_ids = batch["input_ids"][: self.size].clone()
        was_training = pl_module.training
        pl_module.eval()
        _, routings = unpack_output(pl_module({"input_ids": self.input_ids.to(pl_module.device)}))
        pl_module.train(was_training)
        return routings

    def add_churn(self, routings: list[Routing], counts: RoutingCounts) -> None:
        top1 = [top1_expert(routing) for routing in routings]
        if self.top1 is not None:
            for layer, (previous, current) in enumerate(zip(self.top1, top1)):
                counts.add_churn(layer, *churn_counts(previous.to(current.device), current))
        self.top1 = top1

    def state_dict(self) -> dict[str, Any]:
        return {
            "probe_ids": None if self.input_ids is None else self.input_ids.cpu(),
            "probe_top1": None if self.top1 is None else [t.cpu() for t in self.top1],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.input_ids = state_dict["probe_ids"]
        self.top1 = state_dict["probe_top1"]

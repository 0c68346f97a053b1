"""SoftMoELayer: soft MoE (Puigcerver et al. 2023) on the same dispatcher and experts as :class:`MoELayer`.

The slots are the rows the experts see: each expert gets its ``L * S`` slot inputs as one contiguous block
(``tokens_per_expert_E = L * S`` for every expert), so :class:`GroupedExperts` and its grouped-GEMM path run
unchanged, and so do expert parallelism (the all-to-all dispatcher moves slot rows) and quantised or offloaded experts.
What the layer returns as its routing is :class:`SoftRouting`, whose per-token rows keep the analytics working.

Shape legend: B sequences, L positions, D model dim, E experts, S slots per expert, X = E * S slots of a position,
N = E * L * S slot rows (expert-major), M rows this rank's experts receive.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_lightning.layer import MoELayer
from moe_lightning.routing.base import Routing, routing_from_topk
from moe_lightning.routing.soft import SoftMoERouter, SoftRouting


class SoftMoELayer(MoELayer):
    """A soft Mixture-of-Experts feed-forward block (see :mod:`moe_lightning.routing.soft` for the grouping).

    ``forward(x)`` takes ``[batch, length, dim]`` and returns ``(y, routing)`` as :class:`MoELayer` does; position l of
    every sequence is mixed with position l of the others, never with another position.

    Args:
        router: a :class:`SoftMoERouter`.
        experts: the experts, e.g. :class:`GroupedExperts`; called as ``experts(x_MD, tokens_per_expert_E)``.
        shared_experts: optional dense module every token also passes through.
    """

    def __init__(self, router: SoftMoERouter, experts: nn.Module, shared_experts: nn.Module | None = None) -> None:
        if not isinstance(router, SoftMoERouter):
            raise TypeError(f"SoftMoELayer runs a SoftMoERouter, got router={type(router).__name__}")
        super().__init__(router, experts, shared_experts)

    def forward(
        self, x: Tensor, token_ids: Tensor | None = None, padding_mask: Tensor | None = None
    ) -> tuple[Tensor, SoftRouting]:
        """``token_ids`` is accepted for the :class:`MoELayer` signature and not used."""
        if padding_mask is not None and padding_mask.shape != x.shape[:-1]:
            raise ValueError(f"padding_mask must have shape {tuple(x.shape[:-1])}, got {tuple(padding_mask.shape)}")
        routing = self.router.mix(x, None if padding_mask is None else padding_mask.bool())
        num_positions, dim = x.shape[1], x.shape[2]
        num_experts, slots = self.num_experts, self.router.slots_per_expert

        x_LBD = x.transpose(0, 1)
        slots_LXD = torch.einsum("lbx,lbd->lxd", routing.dispatch_LBX.to(x.dtype), x_LBD)
        # Expert-major rows: expert e's slots of every position form one block.
        slots_ND = slots_LXD.reshape(num_positions, num_experts, slots, dim).transpose(0, 1).reshape(-1, dim)
        x_MD, tokens_per_expert_E, state = self.dispatcher.dispatch(
            slots_ND, slot_rows(num_experts, num_positions * slots, x.device)
        )
        y_ND = self.dispatcher.combine(self.experts(x_MD, tokens_per_expert_E), state)
        y_LXD = y_ND.view(num_experts, num_positions, slots, dim).transpose(0, 1).reshape(num_positions, -1, dim)
        y_LBD = torch.einsum("lbx,lxd->lbd", routing.combine_LBX.to(y_LXD.dtype), y_LXD)
        y = y_LBD.transpose(0, 1).to(x.dtype)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x.reshape(-1, dim)).view(x.shape)
        return y, routing


def slot_rows(num_experts: int, rows_per_expert: int, device: torch.device) -> Routing:
    """The slot rows as a routing for the dispatcher: row n is slot row n (expert-major), weight 1, no drops."""
    expert_idx_N = torch.arange(num_experts, device=device).repeat_interleave(rows_per_expert)
    one_hot_NE = F.one_hot(expert_idx_N, num_experts).float()
    weight_N1 = one_hot_NE.new_ones(len(expert_idx_N), 1)
    return routing_from_topk(one_hot_NE.log(), one_hot_NE, expert_idx_N[:, None], weight_N1)

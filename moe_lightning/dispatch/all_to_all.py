"""Expert-parallel dispatch: send routed rows to the rank that holds their expert and bring the outputs back.

Shape legend: T tokens of this rank, D model dim, E experts (global), P expert-parallel ranks,
e = E / P experts held by each rank, N rows this rank routes (sent out), M rows this rank's experts receive.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.nn.functional import all_to_all_single as differentiable_all_to_all_single

from moe_lightning.dispatch.local import DispatchState, FixedKDispatchState, LocalDispatcher
from moe_lightning.routing.base import Routing


@dataclass
class AllToAllState:
    """What :meth:`AllToAllDispatcher.combine` needs to undo :meth:`AllToAllDispatcher.dispatch`."""

    local: DispatchState | FixedKDispatchState
    """The local sort of this rank's rows (by global expert), undone last."""
    send_splits_P: list[int]
    """Rows this rank sent to each expert-parallel rank."""
    recv_splits_P: list[int]
    """Rows this rank received from each expert-parallel rank."""
    regroup_M: Tensor
    """Permutation from the received order (by source rank, then local expert) to the order by local expert."""


class AllToAllDispatcher(LocalDispatcher):
    """Routes rows across an expert-parallel process group; rank ``p`` holds experts ``[p * e, (p + 1) * e)``.

    ``dispatch`` returns the rows of *this rank's* experts, grouped by local expert, and
    ``tokens_per_expert_e`` (length e), which is exactly what :class:`GroupedExperts` holding the local slice
    expects. ``combine`` sends the expert outputs back and sums them, weighted, into this rank's tokens.
    Both directions are differentiable. Every rank of the group must call ``dispatch`` and ``combine`` the
    same number of times (they are collectives), even with no tokens.

    Args:
        group: the expert-parallel process group (P ranks).
        num_experts: E, the global number of experts of the layer; must be divisible by P.
    """

    def __init__(self, group: dist.ProcessGroup, num_experts: int) -> None:
        super().__init__()
        self.group = group
        self.ep_size = dist.get_world_size(group)
        self.ep_rank = dist.get_rank(group)
        if num_experts % self.ep_size != 0:
            raise ValueError(
                f"num_experts must be divisible by the expert-parallel size, got num_experts={num_experts} "
                f"and expert_parallel_size={self.ep_size}"
            )
        self.num_experts = num_experts
        self.num_local_experts = num_experts // self.ep_size

    def dispatch(self, x_TD: Tensor, routing: Routing) -> tuple[Tensor, Tensor, AllToAllState]:
        # Sorted by global expert, the rows are already grouped by destination rank.
        x_ND, tokens_per_expert_E, local = super().dispatch(x_TD, routing)

        # Counts first: recv_counts_Pe[p, j] = rows rank p sends to this rank's local expert j.
        recv_counts_Pe = torch.empty_like(tokens_per_expert_E)
        dist.all_to_all_single(recv_counts_Pe, tokens_per_expert_E.contiguous(), group=self.group)
        recv_counts_Pe = recv_counts_Pe.view(self.ep_size, self.num_local_experts)
        send_splits_P = tokens_per_expert_E.view(self.ep_size, self.num_local_experts).sum(1).tolist()
        recv_splits_P = recv_counts_Pe.sum(1).tolist()

        x_MD = _exchange(x_ND, send_splits_P, recv_splits_P, self.group)

        # Received rows come by source rank; regroup them by local expert (stable: source rank order within).
        local_expert_M = torch.arange(self.num_local_experts, device=x_MD.device).repeat(self.ep_size)
        local_expert_M = local_expert_M.repeat_interleave(recv_counts_Pe.reshape(-1))
        regroup_M = local_expert_M.argsort(stable=True)
        state = AllToAllState(local, send_splits_P, recv_splits_P, regroup_M)
        return x_MD[regroup_M], recv_counts_Pe.sum(0), state

    def combine(self, y_MD: Tensor, state: AllToAllState) -> Tensor:
        # Undo the regrouping, send every row back to the rank of its token, then combine locally.
        y_received_MD = torch.empty_like(y_MD).index_copy(0, state.regroup_M, y_MD)
        y_ND = _exchange(y_received_MD, state.recv_splits_P, state.send_splits_P, self.group)
        return super().combine(y_ND, state.local)


def _exchange(x_SD: Tensor, send_splits: list[int], recv_splits: list[int], group: dist.ProcessGroup) -> Tensor:
    """Differentiable uneven all-to-all of rows (the backward sends the gradients the opposite way)."""
    out_RD = x_SD.new_empty(sum(recv_splits), x_SD.shape[-1])
    return differentiable_all_to_all_single(out_RD, x_SD.contiguous(), recv_splits, send_splits, group=group)

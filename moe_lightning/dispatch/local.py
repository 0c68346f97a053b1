"""Single-device dispatch: gather routed rows sorted by expert, then scatter the weighted results back.

Shape legend: T tokens, D model dim, E experts, N routed rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moe_lightning.routing.base import Routing


@dataclass
class DispatchState:
    """What :meth:`LocalDispatcher.combine` needs to undo :meth:`LocalDispatcher.dispatch`."""

    token_idx_N: Tensor
    """Destination token of each sorted row."""
    weight_N: Tensor
    """Combine weight of each sorted row."""
    num_tokens: int


class LocalDispatcher:
    """Sorts routed rows by expert so every expert sees one contiguous block (what grouped GEMMs need).

    Expert-parallel dispatchers implement the same two methods, so :class:`MoELayer` never knows
    whether its experts are local or spread over ranks.
    """

    def dispatch(self, x_TD: Tensor, routing: Routing) -> tuple[Tensor, Tensor, DispatchState]:
        """Return ``x_ND`` (rows grouped by expert), ``tokens_per_expert_E`` and the state for :meth:`combine`."""
        order_N = routing.expert_idx_N.argsort(stable=True)
        token_idx_N = routing.token_idx_N[order_N]
        state = DispatchState(token_idx_N, routing.weight_N[order_N], x_TD.shape[0])
        return x_TD[token_idx_N], routing.tokens_per_expert_E, state

    def combine(self, y_ND: Tensor, state: DispatchState) -> Tensor:
        """Weight each expert output row and sum the rows of every token: ``y_TD[t] = sum_n w_n y_n``."""
        weighted_ND = y_ND * state.weight_N.unsqueeze(-1).to(y_ND.dtype)
        y_TD = y_ND.new_zeros(state.num_tokens, y_ND.shape[-1])
        return y_TD.index_add(0, state.token_idx_N, weighted_ND)

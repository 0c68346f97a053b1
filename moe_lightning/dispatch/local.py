"""Single-device dispatch: gather routed rows sorted by expert, then scatter the weighted results back.

Shape legend: T tokens, D model dim, E experts, N routed rows, K rows per token (fixed-K routings only).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from moe_lightning.dispatch.permute import inverse_permutation, replicate_and_permute, weighted_unpermute
from moe_lightning.routing.base import Routing


@dataclass
class DispatchState:
    """What :meth:`LocalDispatcher.combine` needs to undo :meth:`LocalDispatcher.dispatch`."""

    token_idx_N: Tensor
    """Destination token of each sorted row."""
    weight_N: Tensor
    """Combine weight of each sorted row."""
    num_tokens: int


@dataclass
class FixedKDispatchState:
    """The state of the sort-free path for routings with exactly K rows per token."""

    inverse_N: Tensor
    """The sorted position of each routing row."""
    weight_TK: Tensor
    """The combine weights, token-major."""


class LocalDispatcher:
    """Sorts routed rows by expert so every expert sees one contiguous block (what grouped GEMMs need).

    Two paths compute the same thing. The general one gathers rows by token index and sums them back with
    ``index_add`` (any routing: drops, expert choice). Routings with exactly K rows per token
    (``routing.rows_per_token``) take a faster one: both directions only gather rows through the known
    permutation, and the weighting is folded into the un-permutation (one Triton kernel each way on CUDA), so
    nothing scatters with accumulation.

    Expert-parallel dispatchers implement the same two methods, so :class:`MoELayer` never knows
    whether its experts are local or spread over ranks.

    Args:
        allow_fixed_k: take the fast path where the routing allows it; ``False`` always takes the general path,
            the reference the fast path is tested against.
    """

    def __init__(self, allow_fixed_k: bool = True) -> None:
        self.allow_fixed_k = allow_fixed_k

    def dispatch(
        self, x_TD: Tensor, routing: Routing
    ) -> tuple[Tensor, Tensor, DispatchState | FixedKDispatchState]:
        """Return ``x_ND`` (rows grouped by expert), ``tokens_per_expert_E`` and the state for :meth:`combine`."""
        order_N = routing.expert_idx_N.argsort(stable=True)
        k = routing.rows_per_token if self.allow_fixed_k else None
        if k is None:
            token_idx_N = routing.token_idx_N[order_N]
            state = DispatchState(token_idx_N, routing.weight_N[order_N], x_TD.shape[0])
            return x_TD[token_idx_N], routing.tokens_per_expert_E, state
        inverse_N = inverse_permutation(order_N)
        state = FixedKDispatchState(inverse_N, routing.weight_N.view(-1, k))
        return replicate_and_permute(x_TD, order_N, inverse_N, k), routing.tokens_per_expert_E, state

    def combine(self, y_ND: Tensor, state: DispatchState | FixedKDispatchState) -> Tensor:
        """Weight each expert output row and sum the rows of every token: ``y_TD[t] = sum_n w_n y_n``."""
        if isinstance(state, FixedKDispatchState):
            return weighted_unpermute(y_ND, state.weight_TK, state.inverse_N)
        weighted_ND = y_ND * state.weight_N.unsqueeze(-1).to(y_ND.dtype)
        y_TD = y_ND.new_zeros(state.num_tokens, y_ND.shape[-1])
        return y_TD.index_add(0, state.token_idx_N, weighted_ND)

"""Train some experts of a :class:`GroupedExperts` and keep the others bit-identical.

The experts of a layer share one 3-D parameter per projection, so "train experts 1 and 5" is a slice of a tensor.
Masking the gradient of the other slices is not enough: AdamW's decoupled weight decay shrinks every element of a
parameter it holds, whatever its gradient, and it would keep moments for the whole stack. So the chosen rows become
a parameter of their own, and the full stack stays frozen: a ``torch.nn.utils.parametrize`` parametrization serves
``experts.w_in_EDH`` as the frozen stack with the trainable rows copied in. The optimizer only ever sees the chosen
rows (any optimizer, any weight decay), the frozen rows cannot move, and ``GroupedExperts`` itself is unchanged.

Shape legend: E experts, S selected (trainable) experts; ``...`` the per-expert matrix dims.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from moe_lightning.experts.grouped import GroupedExperts

EXPERT_WEIGHTS = ("w_in_EDH", "w_down_EFD")
"""The per-expert stacked parameters of :class:`GroupedExperts`."""


class ExpertRowsOverride(nn.Module):
    """Parametrization of a stacked expert weight ``[E, ...]``: rows ``expert_idx_S`` come from the trainable
    ``rows_S`` (initialised from the original), every other row from the frozen original."""

    def __init__(self, original_E: Tensor, expert_idx_S: Tensor) -> None:
        super().__init__()
        self.register_buffer("expert_idx_S", expert_idx_S)
        self.rows_S = nn.Parameter(original_E.detach()[expert_idx_S].clone())

    def forward(self, original_E: Tensor) -> Tensor:
        return original_E.index_copy(0, self.expert_idx_S, self.rows_S)


def train_only_experts_of(experts: GroupedExperts, expert_indices: Sequence[int]) -> None:
    """Make only experts ``expert_indices`` of ``experts`` trainable (an empty list freezes them all)."""
    if not isinstance(experts, GroupedExperts):
        raise TypeError(f"train_only_experts_of needs GroupedExperts, got {type(experts).__name__}")
    check_expert_indices(expert_indices, experts.num_experts)
    if parametrize.is_parametrized(experts):
        raise ValueError("these experts already train a subset of their rows; merge_expert_rows() them first")
    for name in EXPERT_WEIGHTS:
        weight = getattr(experts, name)
        weight.requires_grad_(False)
        if expert_indices:
            expert_idx_S = torch.tensor(sorted(expert_indices), dtype=torch.long, device=weight.device)
            parametrize.register_parametrization(experts, name, ExpertRowsOverride(weight, expert_idx_S))


def merge_expert_rows(model: nn.Module) -> None:
    """Write the trained rows back into plain expert parameters (before an export), in place; all of them frozen."""
    for module in model.modules():
        if isinstance(module, GroupedExperts) and parametrize.is_parametrized(module):
            for name in EXPERT_WEIGHTS:
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)


def check_expert_indices(expert_indices: Sequence[int], num_experts: int, where: str = "") -> None:
    """ValueError naming the indices outside ``[0, num_experts)`` or repeated; ``where`` says which layer."""
    outside = sorted({i for i in expert_indices if not 0 <= i < num_experts})
    if outside:
        raise ValueError(f"expert indices {outside}{where} are outside [0, {num_experts})")
    if len(set(expert_indices)) != len(expert_indices):
        raise ValueError(f"expert indices {list(expert_indices)}{where} repeat an expert")

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
from moe_lightning.layer import MoELayer

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
    """Replace every row-training :class:`GroupedExperts` of ``model``'s MoE layers by plain ones holding its current
    weights (frozen), in place, e.g. before an export.

    A new module rather than ``parametrize.remove_parametrizations``: that deletes the weight's property from the
    parametrized class, which a ``deepcopy`` of the model shares with the original, so merging a copy would break the
    model it was copied from."""
    for layer in model.modules():
        if isinstance(layer, MoELayer) and isinstance(layer.experts, GroupedExperts):
            if parametrize.is_parametrized(layer.experts):
                layer.experts = plain_experts_like(layer.experts, layer.experts.w_in_EDH, layer.experts.w_down_EFD)


def plain_experts_like(template: nn.Module, w_in_EDH: Tensor, w_down_EFD: Tensor) -> GroupedExperts:
    """Frozen :class:`GroupedExperts` of ``template``'s activation and implementation holding copies of these weights
    (built on the meta device first, so that no random initialisation runs)."""
    implementation = getattr(template, "implementation", "auto")
    with torch.device("meta"):
        experts = GroupedExperts(w_in_EDH.shape[0], template.dim, template.hidden_dim, template.activation, implementation)
    for name, weight in (("w_in_EDH", w_in_EDH), ("w_down_EFD", w_down_EFD)):
        setattr(experts, name, nn.Parameter(weight.detach().clone(), requires_grad=False))
    return experts.train(template.training)


def check_expert_indices(expert_indices: Sequence[int], num_experts: int, where: str = "") -> None:
    """ValueError naming the indices outside ``[0, num_experts)`` or repeated; ``where`` says which layer."""
    outside = sorted({i for i in expert_indices if not 0 <= i < num_experts})
    if outside:
        raise ValueError(f"expert indices {outside}{where} are outside [0, {num_experts})")
    if len(set(expert_indices)) != len(expert_indices):
        raise ValueError(f"expert indices {list(expert_indices)}{where} repeat an expert")

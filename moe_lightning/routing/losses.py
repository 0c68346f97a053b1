"""Auxiliary router losses as pure functions, and the aux-loss-free expert-bias step.

Shape legend: T tokens, E experts, N routed rows, S sequences.

The balance losses are normalised so that a perfectly balanced assignment scores exactly 1 for any
number of experts and any top-k; collapse onto one expert scores up to E.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from moe_lightning.routing.counting import count_per_bin


class RoutedRows(Protocol):
    """What the balance losses read of a routing decision; :class:`~moe_lightning.routing.base.Routing` has it.

    Declared here so that this module depends on nothing in ``routing`` but ``counting``: ``base`` imports the
    losses, never the other way round.
    """

    token_idx_N: Tensor
    expert_idx_N: Tensor
    probs_TE: Tensor

    @property
    def num_experts(self) -> int: ...


def _normalised_probs(probs_TE: Tensor) -> Tensor:
    # Sigmoid scores do not sum to one; balance losses compare distributions, so normalise per token.
    return probs_TE / probs_TE.sum(dim=-1, keepdim=True).clamp_min(1e-20)


def _valid_rows(routing: RoutedRows, valid_mask_T: Tensor | None) -> Tensor:
    if valid_mask_T is None:
        return routing.expert_idx_N
    return routing.expert_idx_N[valid_mask_T[routing.token_idx_N]]


def load_balancing_loss(
    routing: RoutedRows, num_experts_per_token: float, valid_mask_T: Tensor | None = None
) -> Tensor:
    """Switch Transformer / GShard balance loss ``E * sum_e f_e * P_e``.

    ``f_e`` is the share of routed rows that went to expert ``e`` (not differentiable) and ``P_e`` the mean
    router probability of ``e`` (differentiable). Padding tokens (``valid_mask_T`` False) are excluded.
    """
    num_experts = routing.num_experts
    probs_TE = _normalised_probs(routing.probs_TE)
    if valid_mask_T is not None:
        probs_TE = probs_TE[valid_mask_T]
    num_valid = max(probs_TE.shape[0], 1)
    counts_E = count_per_bin(_valid_rows(routing, valid_mask_T), num_experts).to(probs_TE.dtype)
    fraction_E = counts_E / (num_valid * num_experts_per_token)
    mean_prob_E = probs_TE.sum(dim=0) / num_valid
    return num_experts * torch.sum(fraction_E * mean_prob_E)


def router_z_loss(logits_TE: Tensor, valid_mask_T: Tensor | None = None) -> Tensor:
    """ST-MoE z-loss: mean over tokens of ``logsumexp(logits)^2``; keeps router logits small."""
    if valid_mask_T is not None:
        logits_TE = logits_TE[valid_mask_T]
    if logits_TE.shape[0] == 0:
        return logits_TE.sum()
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()


def sequence_aux_loss(
    routing: RoutedRows, num_experts_per_token: float, sequence_length: int, valid_mask_T: Tensor | None = None
) -> Tensor:
    """DeepSeek-V3 sequence-wise balance loss: the balance loss computed per sequence, averaged over sequences.

    Tokens are taken to be a flattened ``[S, sequence_length]`` batch.
    """
    num_tokens, num_experts = routing.probs_TE.shape
    if num_tokens % sequence_length != 0:
        raise ValueError(f"{num_tokens} tokens do not split into sequences of length {sequence_length}")
    num_sequences = num_tokens // sequence_length
    valid_T = (
        torch.ones(num_tokens, dtype=torch.bool, device=routing.probs_TE.device) if valid_mask_T is None else valid_mask_T
    )
    probs_TE = _normalised_probs(routing.probs_TE) * valid_T.unsqueeze(-1)
    valid_tokens_S = valid_T.view(num_sequences, sequence_length).sum(dim=1).clamp_min(1).to(probs_TE.dtype)

    row_valid_N = valid_T[routing.token_idx_N]
    sequence_N = routing.token_idx_N[row_valid_N] // sequence_length
    flat_SE = sequence_N * num_experts + routing.expert_idx_N[row_valid_N]
    counts_SE = count_per_bin(flat_SE, num_sequences * num_experts).view(num_sequences, num_experts)

    fraction_SE = counts_SE.to(probs_TE.dtype) / (valid_tokens_S.unsqueeze(-1) * num_experts_per_token)
    mean_prob_SE = probs_TE.view(num_sequences, sequence_length, num_experts).sum(dim=1) / valid_tokens_S.unsqueeze(-1)
    return num_experts * (fraction_SE * mean_prob_SE).sum(dim=-1).mean()


@torch.no_grad()
def expert_bias_step(expert_bias_E: Tensor, tokens_per_expert_E: Tensor, rate: float) -> None:
    """Aux-loss-free balancing (DeepSeek-V3): nudge each expert's selection bias toward the mean load.

    Overloaded experts get ``-rate``, underloaded ones ``+rate`` (in place). Experts at the mean stay put.
    """
    load_E = tokens_per_expert_E.to(expert_bias_E.dtype)
    expert_bias_E.add_(rate * torch.sign(load_E.mean() - load_E))

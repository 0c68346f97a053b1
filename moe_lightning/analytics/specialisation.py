"""Expert specialisation: how much knowing a token's label (task id, byte class, ...) tells about its expert.

Shape legend: T tokens, E experts, C label classes, V vocabulary.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_lightning.analytics.assignment import top1_expert
from moe_lightning.routing.base import Routing


def label_expert_counts(routing: Routing, labels_T: Tensor, num_labels: int, top1_only: bool = True) -> Tensor:
    """``[C, E]`` contingency table of label against expert; labels < 0 (padding, ignored) are left out.

    ``top1_only`` counts each token once at its top-1 expert; otherwise every routed row counts.
    """
    labels_T = labels_T.reshape(-1)
    if labels_T.numel() != routing.num_tokens:
        raise ValueError(f"need one label per token: got {labels_T.numel()} labels for {routing.num_tokens} tokens")
    if labels_T.numel() and int(labels_T.max()) >= num_labels:
        raise ValueError(f"label {int(labels_T.max())} is out of range for num_labels={num_labels}")
    if top1_only:
        expert, label = top1_expert(routing), labels_T
    else:
        expert, label = routing.expert_idx_N, labels_T[routing.token_idx_N]
    keep = (expert >= 0) & (label >= 0)
    num_experts = routing.num_experts
    counts = torch.bincount(label[keep] * num_experts + expert[keep], minlength=num_labels * num_experts)
    return counts.view(num_labels, num_experts).double()


def normalized_mutual_information(counts_CE: Tensor) -> Tensor:
    """``I(label; expert) / mean(H(label), H(expert))`` from a contingency table (sklearn's arithmetic NMI).

    1 when the expert determines the label and back, 0 when independent; 0 when either side is constant.
    """
    joint = counts_CE.double() / counts_CE.sum().clamp_min(1)
    p_label, p_expert = joint.sum(dim=1), joint.sum(dim=0)
    independent = p_label[:, None] * p_expert[None, :]
    mutual = torch.where(joint > 0, joint * (joint / independent.clamp_min(1e-300)).log(), 0.0).sum()
    h_label = -torch.special.xlogy(p_label, p_label).sum()
    h_expert = -torch.special.xlogy(p_expert, p_expert).sum()
    mean_entropy = (h_label + h_expert) / 2
    if h_label <= 0 or h_expert <= 0:
        return mutual.new_zeros(())
    return (mutual / mean_entropy).clamp(0.0, 1.0)


def token_expert_counts(routing: Routing, token_ids_T: Tensor, vocab_size: int) -> Tensor:
    """``[V, E]``: how many rows of each token id went to each expert."""
    token_ids_N = token_ids_T.reshape(-1)[routing.token_idx_N]
    num_experts = routing.num_experts
    counts = torch.bincount(token_ids_N * num_experts + routing.expert_idx_N, minlength=vocab_size * num_experts)
    return counts.view(vocab_size, num_experts).double()


def top_tokens_per_expert(counts_VE: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """``(token_ids [E, n], counts [E, n])``: each expert's most frequent token ids, most frequent first."""
    values, indices = counts_VE.T.topk(min(n, counts_VE.shape[0]), dim=1)
    return indices, values

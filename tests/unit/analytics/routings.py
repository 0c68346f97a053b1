"""Routings written out row by row, so expected statistics can be worked out by hand."""

import torch

from moe_lightning.routing import Routing


def make_routing(rows, probs_TE, num_dropped=0, num_requested=None):
    """``rows``: (token, expert, weight) triples; ``probs_TE``: nested lists, one row per token."""
    probs_TE = torch.tensor(probs_TE, dtype=torch.float32)
    num_experts = probs_TE.shape[1]
    token, expert, weight = (list(column) for column in zip(*rows)) if rows else ([], [], [])
    expert_idx_N = torch.tensor(expert, dtype=torch.long)
    return Routing(
        token_idx_N=torch.tensor(token, dtype=torch.long),
        expert_idx_N=expert_idx_N,
        weight_N=torch.tensor(weight, dtype=torch.float32),
        tokens_per_expert_E=torch.bincount(expert_idx_N, minlength=num_experts),
        logits_TE=probs_TE.clamp_min(1e-9).log(),
        probs_TE=probs_TE,
        num_dropped=torch.tensor(num_dropped),
        num_requested=len(rows) + num_dropped if num_requested is None else num_requested,
    )


# Three tokens, four experts, top-2: token 0 -> experts 2 (0.7) and 1 (0.3); token 1 -> experts 0 and 3 with
# equal weight; token 2 was dropped (in no row).
ROWS = [(0, 2, 0.7), (0, 1, 0.3), (1, 0, 0.5), (1, 3, 0.5)]
PROBS = [[0.1, 0.3, 0.5, 0.1], [0.4, 0.1, 0.1, 0.4], [0.25, 0.25, 0.25, 0.25]]


def example_routing(num_dropped=2):
    return make_routing(ROWS, PROBS, num_dropped=num_dropped, num_requested=6)

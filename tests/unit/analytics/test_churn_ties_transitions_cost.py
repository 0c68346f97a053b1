import pytest
import torch

from moe_lightning.analytics import (
    expert_flops,
    expert_flops_per_row,
    near_tie_mask,
    routing_churn,
    topk_margin,
    transition_counts,
)


def test_churn_is_the_share_of_changed_top1():
    assert routing_churn(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 2, 2, 0])) == 0.5
    with pytest.raises(ValueError, match="same probe tokens"):
        routing_churn(torch.tensor([0]), torch.tensor([0, 1]))


def test_near_ties_compare_the_kth_and_next_score():
    probs = torch.tensor([[0.4, 0.3, 0.299, 0.001], [0.5, 0.3, 0.2, 0.0]])
    assert topk_margin(probs, 2).tolist() == pytest.approx([0.001, 0.1], abs=1e-6)
    assert near_tie_mask(probs, 2).tolist() == [True, False]  # 0.001 < 2**-8 < 0.1
    assert near_tie_mask(probs, 4).tolist() == [False, False]  # every expert chosen: nothing can flip


def test_transitions_count_top1_pairs_and_skip_unrouted_tokens():
    counts = transition_counts(torch.tensor([0, 0, 1, -1]), torch.tensor([1, 1, 2, 0]), num_experts=3)
    assert counts.tolist() == [[0, 2, 0], [0, 0, 1], [0, 0, 0]]


def test_swiglu_expert_costs_three_matmuls_per_row():
    assert expert_flops_per_row(4, 8) == 3 * 2 * 4 * 8
    assert expert_flops_per_row(4, 8, gated=False) == 2 * 2 * 4 * 8
    assert expert_flops(torch.tensor([1, 2]), 4, 8).tolist() == [192, 384]

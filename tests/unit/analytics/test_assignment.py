from moe_lightning.analytics import UNROUTED, chosen_experts, cooccurrence_counts, top1_expert
from tests.unit.analytics.routings import example_routing


def test_top1_is_the_heaviest_row_lowest_expert_on_ties_and_unrouted_tokens_are_marked():
    assert top1_expert(example_routing()).tolist() == [2, 0, UNROUTED]


def test_chosen_experts_one_hot():
    assert chosen_experts(example_routing()).tolist() == [[0, 1, 1, 0], [1, 0, 0, 1], [0, 0, 0, 0]]


def test_cooccurrence_counts_pairs_of_experts_of_one_token():
    expected = [[1, 0, 0, 1], [0, 1, 1, 0], [0, 1, 1, 0], [1, 0, 0, 1]]
    assert cooccurrence_counts(example_routing()).tolist() == expected

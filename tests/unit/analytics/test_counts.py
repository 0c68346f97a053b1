import math

import pytest
import torch

from moe_lightning.analytics import RoutingCounts, layer_statistics
from tests.unit.analytics.routings import example_routing, make_routing

UNIFORM = [[0.25] * 4] * 3


def second_layer():
    return make_routing([(0, 1, 1.0), (1, 1, 1.0), (2, 3, 1.0)], UNIFORM)


def entropy(*p):
    return -sum(x * math.log(x) for x in p if x > 0)


def filled_counts():
    counts = RoutingCounts.zeros(num_layers=2, num_experts=4, num_labels=2)
    counts.add_routings([example_routing(), second_layer()], labels_T=torch.tensor([1, 0, -100]))
    return counts


def test_one_step_of_counts_by_hand():
    counts = filled_counts()
    assert counts.load_LE.tolist() == [[1, 1, 1, 1], [0, 2, 0, 1]]
    assert counts.dropped_L.tolist() == [2, 0] and counts.requested_L.tolist() == [6, 3]
    assert counts.tokens_L.tolist() == [3, 3]
    layer0_entropy = entropy(0.1, 0.3, 0.5, 0.1) + entropy(0.4, 0.1, 0.1, 0.4) + math.log(4)
    assert counts.entropy_sum_L.tolist() == pytest.approx([layer0_entropy, 3 * math.log(4)])
    # layer 0 is top-2: only the uniform token 2 has its 2nd and 3rd scores tied; layer 1 is top-1, all uniform.
    assert counts.near_ties_L.tolist() == [1, 3]
    assert counts.cooccurrence_LEE[1].diagonal().tolist() == [0, 2, 0, 1]
    assert counts.label_expert_LCE.tolist() == [[[1, 0, 0, 0], [0, 0, 1, 0]], [[0, 1, 0, 0], [0, 1, 0, 0]]]
    transitions = torch.zeros(4, 4)
    transitions[2, 1] = transitions[0, 1] = 1  # token 0: 2 -> 1, token 1: 0 -> 1, token 2 unrouted at layer 0
    assert counts.transitions_LEE[0].tolist() == transitions.tolist()


def test_steps_add_and_flat_round_trips():
    counts = filled_counts()
    once = counts.flatten().clone()
    counts.add_routings([example_routing(), second_layer()], labels_T=torch.tensor([1, 0, -100]))
    assert torch.equal(counts.flatten(), 2 * once)
    assert torch.equal(counts.with_flat(counts.flatten()).flatten(), counts.flatten())
    assert torch.equal(counts.reduced(lambda flat: 3 * flat).load_LE, 3 * counts.load_LE)
    restored = RoutingCounts.from_state_dict(counts.state_dict())
    assert torch.equal(restored.flatten(), counts.flatten())


def test_mismatched_routings_are_named():
    with pytest.raises(ValueError, match="expected 3 routings"):
        RoutingCounts.zeros(3, 4).add_routings([example_routing()])
    with pytest.raises(ValueError, match="layer 0 has 4 experts, expected 5"):
        RoutingCounts.zeros(1, 5).add_routings([example_routing()])


def test_layer_statistics_from_counts():
    counts = RoutingCounts.zeros(num_layers=1, num_experts=4, num_labels=2)
    counts.load_LE[0] = torch.tensor([3.0, 1.0, 0.0, 0.0])
    counts.dropped_L[0], counts.requested_L[0] = 2, 8
    counts.tokens_L[0], counts.entropy_sum_L[0], counts.near_ties_L[0] = 4, 2 * math.log(4), 1
    counts.label_expert_LCE[0, :, :2] = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    (stats,) = layer_statistics(counts, dead_threshold=0.0)
    assert stats.routed_rows == 4 and stats.load_share == [0.75, 0.25, 0.0, 0.0]
    assert stats.cv == pytest.approx(math.sqrt(1.5)) and stats.imbalance == pytest.approx(3.0)
    assert stats.load_entropy == pytest.approx(entropy(0.75, 0.25) / math.log(4))
    assert stats.token_entropy == pytest.approx(0.5)
    assert stats.dead_experts == 2 and stats.dropped_fraction == 0.25 and stats.near_tie_fraction == 0.25
    assert 0 < stats.nmi < 1
    assert stats.churn is None  # never probed
    counts.add_churn(0, changed=1, probed=4)
    assert layer_statistics(counts)[0].churn == 0.25
    assert set(stats.scalars()) == {"cv", "imbalance", "load_entropy", "token_entropy", "dead_experts",
                                    "dropped_fraction", "near_tie_fraction", "nmi"}

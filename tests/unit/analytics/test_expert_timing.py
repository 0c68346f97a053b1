"""Per-expert timing: each expert alone on its rows, shares of the layer's expert time, recorded expert inputs."""

import time

import pytest
import torch
from torch import nn

from moe_lightning import GroupedExperts, MoELayer, TopKRouter
from moe_lightning.analytics import expert_seconds, recorded_expert_inputs, time_share


class SleepyExperts(nn.Module):
    """Expert e sleeps 5 (e + 1) ms per call and returns its rows: a known cost per expert."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[list[int]] = []

    def forward(self, x_ND, tokens_per_expert_E):
        counts = tokens_per_expert_E.tolist()
        self.calls.append(counts)
        time.sleep(sum(0.005 * (e + 1) for e, n in enumerate(counts) if n))
        return x_ND


def test_each_expert_runs_alone_on_its_rows_and_idle_experts_cost_nothing():
    experts = SleepyExperts()
    seconds = expert_seconds(experts, torch.zeros(6, 2), torch.tensor([2, 0, 3, 1]), repeats=2)
    assert seconds[1] == 0
    assert {tuple(c) for c in experts.calls} == {(2, 0, 0, 0), (0, 0, 3, 0), (0, 0, 0, 1)}
    assert len(experts.calls) == 3 * (1 + 2)  # one warm-up and two timed calls per expert with rows
    share = time_share(seconds)
    # Sleeps of 5, 15 and 20 ms: shares 1/8, 3/8, 4/8 (sleep overshoot and timer noise allowed for).
    torch.testing.assert_close(share, torch.tensor([1 / 8, 0, 3 / 8, 4 / 8], dtype=torch.float64), atol=0.06, rtol=0)


def test_shares_of_nothing_are_zero_and_bad_repeats_are_named():
    assert time_share(torch.zeros(3, dtype=torch.float64)).tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="repeats must be >= 1, got repeats=0"):
        expert_seconds(SleepyExperts(), torch.zeros(1, 2), torch.tensor([1]), repeats=0)


def test_recorded_inputs_are_what_each_layers_experts_received():
    torch.manual_seed(0)
    model = nn.Sequential(*(MoELayer(TopKRouter(8, 4, 2), GroupedExperts(4, 8, 16)) for _ in range(2)))
    x = torch.randn(5, 8)
    with recorded_expert_inputs(model) as inputs:
        y0, routing0 = model[0](x)
        model[1](y0)
    x_ND, tokens_per_expert_E = inputs[0]
    assert torch.equal(tokens_per_expert_E, routing0.tokens_per_expert_E) and x_ND.shape == (10, 8)
    assert inputs[1] is not None
    assert not model[0].experts._forward_pre_hooks  # the hooks are gone after the block
    # Timing the real experts on what they received: a share per expert, summing to one.
    assert time_share(expert_seconds(model[0].experts, *inputs[0])).sum().item() == pytest.approx(1.0)

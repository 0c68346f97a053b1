import math

import pytest
import torch

from moe_lightning.analytics import coefficient_of_variation, dead_experts, dropped_fraction, load_share, max_mean_imbalance

LOAD = torch.tensor([3, 1, 0, 0])  # mean 1; deviations 2, 0, -1, -1 -> variance 6/4


def test_share_is_the_fraction_of_rows():
    assert load_share(LOAD).tolist() == [0.75, 0.25, 0.0, 0.0]
    assert load_share(torch.zeros(3)).tolist() == [0.0, 0.0, 0.0]


def test_coefficient_of_variation_and_imbalance():
    assert coefficient_of_variation(LOAD).item() == pytest.approx(math.sqrt(1.5))
    assert max_mean_imbalance(LOAD).item() == pytest.approx(3.0)
    assert coefficient_of_variation(torch.tensor([2, 2])).item() == 0.0
    assert max_mean_imbalance(torch.tensor([2, 2])).item() == 1.0


def test_dead_experts_are_at_or_under_threshold_times_mean():
    assert dead_experts(LOAD, 0.0).tolist() == [False, False, True, True]
    assert dead_experts(LOAD, 1.0).tolist() == [False, True, True, True]
    with pytest.raises(ValueError, match="threshold=-1"):
        dead_experts(LOAD, -1)


def test_dropped_fraction():
    assert dropped_fraction(torch.tensor(2), 8).item() == 0.25
    assert dropped_fraction(0, 0).item() == 0.0

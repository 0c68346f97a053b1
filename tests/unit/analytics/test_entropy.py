import math

import pytest
import torch

from moe_lightning.analytics import load_entropy, token_entropy


def test_token_entropy_per_row():
    probs = torch.tensor([[0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.25] * 4])
    assert token_entropy(probs).tolist() == pytest.approx([math.log(2), 0.0, math.log(4)])


def test_sigmoid_scores_are_normalised_first():
    assert token_entropy(torch.tensor([[0.2, 0.2]])).item() == pytest.approx(math.log(2))


def test_load_entropy():
    expected = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert load_entropy(torch.tensor([3, 1, 0])).item() == pytest.approx(expected)

import math

import pytest
import torch

from moe_lightning.analytics import (
    label_expert_counts,
    normalized_mutual_information,
    token_expert_counts,
    top_tokens_per_expert,
)
from tests.unit.analytics.routings import example_routing


def test_label_expert_counts_top1_and_all_rows_skip_negative_labels():
    labels = torch.tensor([1, 0, -100])
    top1 = label_expert_counts(example_routing(), labels, num_labels=2)
    assert top1.tolist() == [[1, 0, 0, 0], [0, 0, 1, 0]]
    rows = label_expert_counts(example_routing(), labels, num_labels=2, top1_only=False)
    assert rows.tolist() == [[1, 0, 0, 1], [0, 1, 1, 0]]
    with pytest.raises(ValueError, match="num_labels=1"):
        label_expert_counts(example_routing(), labels, num_labels=1)


def test_nmi_extremes():
    assert normalized_mutual_information(torch.tensor([[5.0, 0.0], [0.0, 3.0]])).item() == pytest.approx(1.0)
    assert normalized_mutual_information(torch.tensor([[2.0, 2.0], [1.0, 1.0]])).item() == pytest.approx(0.0, abs=1e-12)
    assert normalized_mutual_information(torch.tensor([[4.0, 0.0], [0.0, 0.0]])).item() == 0.0


def test_nmi_by_hand():
    # joint [[.5, 0], [.25, .25]]; label marginal [.5, .5], expert marginal [.75, .25]
    mutual = 0.5 * math.log(0.5 / 0.375) + 0.25 * math.log(0.25 / 0.375) + 0.25 * math.log(0.25 / 0.125)
    h_label = math.log(2)
    h_expert = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    nmi = normalized_mutual_information(torch.tensor([[2.0, 0.0], [1.0, 1.0]])).item()
    assert nmi == pytest.approx(mutual / ((h_label + h_expert) / 2))


def test_top_tokens_per_expert():
    counts = token_expert_counts(example_routing(), torch.tensor([7, 3, 7]), vocab_size=8)
    assert counts.sum().item() == 4 and counts[7, 2] == 1 and counts[7, 1] == 1 and counts[3, 0] == 1
    ids, values = top_tokens_per_expert(counts, 1)
    assert ids[:, 0].tolist() == [3, 7, 7, 3] and values[:, 0].tolist() == [1, 1, 1, 1]

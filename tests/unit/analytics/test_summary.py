"""The fit report's per-layer summary against numbers worked out by hand."""

import math

import pytest

from moe_lightning.analytics import summarize_routings
from tests.unit.analytics.routings import make_routing


def test_summary_of_a_hand_built_routing():
    # Three experts; expert 0 gets nothing, experts 1 and 2 two rows each; one row was dropped.
    rows = [(0, 1, 1.0), (1, 1, 1.0), (2, 2, 1.0), (3, 2, 1.0)]
    probs = [[0.2, 0.4, 0.4]] * 4
    (summary,) = summarize_routings([make_routing(rows, probs, num_dropped=1, num_requested=5)])
    assert summary.routed_rows == 4
    assert summary.imbalance == pytest.approx(2 / (4 / 3))
    assert (summary.min_share, summary.max_share) == (0.0, 0.5)
    assert summary.idle_experts == 1
    assert summary.dropped_fraction == pytest.approx(1 / 5)
    assert summary.load_entropy == pytest.approx(math.log(2) / math.log(3))

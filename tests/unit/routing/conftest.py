"""Shared checks for the routing tests: the invariants every :class:`Routing` must satisfy."""

from __future__ import annotations

import pytest
import torch

from moe_lightning.routing import Routing


def assert_routing_invariants(routing: Routing, num_tokens: int, num_experts: int) -> None:
    token_idx_N, expert_idx_N, weight_N = routing.token_idx_N, routing.expert_idx_N, routing.weight_N
    num_rows = expert_idx_N.shape[0]
    assert token_idx_N.dtype == expert_idx_N.dtype == torch.int64
    assert token_idx_N.shape == weight_N.shape == (num_rows,)
    assert routing.logits_TE.shape == routing.probs_TE.shape == (num_tokens, num_experts)
    assert routing.logits_TE.dtype == routing.probs_TE.dtype == torch.float32
    assert weight_N.dtype == torch.float32
    assert routing.tokens_per_expert_E.dtype == torch.int64
    assert int(routing.tokens_per_expert_E.sum()) == num_rows
    counts = [0] * num_experts
    for e in expert_idx_N.tolist():
        counts[e] += 1
    assert routing.tokens_per_expert_E.tolist() == counts
    assert bool(torch.isfinite(weight_N).all()) and bool((weight_N >= 0).all())
    assert all(0 <= t < num_tokens for t in token_idx_N.tolist())
    assert all(0 <= e < num_experts for e in expert_idx_N.tolist())
    pairs = list(zip(token_idx_N.tolist(), expert_idx_N.tolist()))
    assert len(set(pairs)) == len(pairs), "a (token, expert) pair is routed twice"


@pytest.fixture
def check_routing():
    """``check_routing(routing, num_tokens, num_experts)`` asserts the routing contract."""
    return assert_routing_invariants

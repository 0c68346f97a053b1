"""SinkhornRouter: balanced selection in training (checked against a plain-Python Sinkhorn), plain top-k in eval."""

from __future__ import annotations

import math

import pytest
import torch

from moe_lightning.routing import SinkhornRouter

D, E = 16, 8


def _logits(router: SinkhornRouter, x_TD: torch.Tensor) -> list[list[float]]:
    return (x_TD.double() @ router.gate.weight.double().t()).tolist()


def _topk_rows(scores, k) -> set[tuple[int, int]]:
    return {(t, e) for t, row in enumerate(scores) for e in sorted(range(len(row)), key=lambda e: -row[e])[:k]}


def _reference_sinkhorn(logits, num_iterations):
    """Scale exp(logits) so every row sums to 1 and every column to T / E, alternating, in plain floats."""
    num_tokens, num_experts = len(logits), len(logits[0])
    plan = [[math.exp(v) for v in row] for row in logits]
    for _ in range(num_iterations):
        plan = [[v / sum(row) for v in row] for row in plan]
        columns = [sum(row[e] for row in plan) for e in range(num_experts)]
        plan = [[v / columns[e] * num_tokens / num_experts for e, v in enumerate(row)] for row in plan]
    return plan


def _rows(routing) -> dict[tuple[int, int], float]:
    pairs = zip(routing.token_idx_N.tolist(), routing.expert_idx_N.tolist(), routing.weight_N.tolist())
    return {(t, e): w for t, e, w in pairs}


def _skewed(num_tokens: int, k: int, seed: int) -> tuple[SinkhornRouter, torch.Tensor]:
    torch.manual_seed(seed)
    router = SinkhornRouter(D, E, num_experts_per_token=k)
    x = torch.randn(num_tokens, D)
    x[:, 0] = 1.0
    with torch.no_grad():
        router.gate.weight.normal_()
        router.gate.weight[:, 0] = 0.0
        router.gate.weight[0, 0] = 4.0  # every token strongly prefers expert 0
        router.gate.weight[1, 0] = 2.0
    return router, x


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("router_dtype", [torch.float32, torch.bfloat16])
def test_invariants(check_routing, training, x_dtype, router_dtype):
    torch.manual_seed(0)
    router = SinkhornRouter(D, E, num_experts_per_token=2).to(router_dtype).train(training)
    routing = router(torch.randn(40, D, dtype=x_dtype))
    check_routing(routing, 40, E)
    assert routing.num_requested == 80 and int(routing.num_dropped) == 0


@pytest.mark.parametrize("k", [1, 2])
def test_training_balances_skewed_router(k):
    router, x = _skewed(1024, k, seed=1)

    def imbalance(routing):
        load = routing.tokens_per_expert_E.float()
        return float(load.max() / load.mean())

    plain = imbalance(router.eval()(x))
    balanced = imbalance(router.train()(x))
    assert plain > 2.0
    assert balanced < 1.25


@pytest.mark.parametrize(("k", "num_iterations"), [(1, 1), (1, 10), (2, 3)])
def test_training_selection_matches_loop(k, num_iterations):
    torch.manual_seed(2)
    router = SinkhornRouter(D, 4, num_experts_per_token=k, num_iterations=num_iterations)
    with torch.no_grad():
        router.gate.weight[0] += 0.3  # a skew for the plan to undo
    x = torch.randn(24, D) + 0.5
    logits = _logits(router, x)
    rows = _rows(router.train()(x))
    assert set(rows) == _topk_rows(_reference_sinkhorn(logits, num_iterations), k)
    # The combine weight is the plain sigmoid score, not the plan.
    for (t, e), weight in rows.items():
        assert weight == pytest.approx(1 / (1 + math.exp(-logits[t][e])), rel=1e-5)


@pytest.mark.parametrize("k", [1, 3])
def test_eval_is_plain_topk(k):
    router, x = _skewed(64, k, seed=3)
    logits = _logits(router, x)
    rows = _rows(router.eval()(x))
    assert set(rows) == _topk_rows(logits, k)
    for (t, e), weight in rows.items():
        assert weight == pytest.approx(1 / (1 + math.exp(-logits[t][e])), rel=1e-5)


def test_gradient_flows_through_weights_only():
    router, x = _skewed(64, 2, seed=4)
    routing = router.train()(x)
    (routing.weight_N * torch.randn_like(routing.weight_N)).sum().backward()
    assert router.gate.weight.grad is not None and router.gate.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"num_iterations": 0}, "num_iterations=0"),
    ({"num_experts_per_token": 9}, "top_k=9 and num_experts=8"),
])
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SinkhornRouter(D, E, **kwargs)

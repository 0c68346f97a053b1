"""TopKRouter against plain-Python loops over tokens and experts."""

from __future__ import annotations

import math

import pytest
import torch

from moe_lightning.routing import TopKRouter

T, D, E = 32, 16, 8


def _scores(router: TopKRouter, x_TD: torch.Tensor) -> list[list[float]]:
    logits = (x_TD.double() @ router.gate.weight.double().t()).tolist()
    if router.score_func == "sigmoid":
        return [[1 / (1 + math.exp(-v)) for v in row] for row in logits]
    out = []
    for row in logits:
        exps = [math.exp(v - max(row)) for v in row]
        out.append([v / sum(exps) for v in exps])
    return out


def _reference_rows(scores, k, normalize=True, scale=1.0, bias=None, allowed=None):
    """(token, choice rank, expert, weight) per routed row, choices sorted best first."""
    rows = []
    for t, row in enumerate(scores):
        candidates = range(len(row)) if allowed is None else allowed[t]
        key = [row[e] + (0.0 if bias is None else bias[e]) for e in range(len(row))]
        chosen = sorted(candidates, key=lambda e: -key[e])[:k]
        total = sum(row[e] for e in chosen) if normalize else 1.0
        rows += [(t, j, e, row[e] / total * scale) for j, e in enumerate(chosen)]
    return rows


def _as_dict(routing) -> dict[tuple[int, int], float]:
    pairs = zip(routing.token_idx_N.tolist(), routing.expert_idx_N.tolist(), routing.weight_N.tolist())
    return {(t, e): w for t, e, w in pairs}


def _assert_matches(routing, rows) -> None:
    got = _as_dict(routing)
    assert set(got) == {(t, e) for t, _, e, _ in rows}
    for t, _, e, w in rows:
        assert got[(t, e)] == pytest.approx(w, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("router_dtype", [torch.float32, torch.bfloat16])
def test_invariants(check_routing, x_dtype, router_dtype):
    torch.manual_seed(0)
    router = TopKRouter(D, E, num_experts_per_token=2, capacity_factor=1.0).to(router_dtype)
    routing = router(torch.randn(T, D, dtype=x_dtype))
    check_routing(routing, T, E)
    assert routing.aux_losses["load_balance"].dtype == torch.float32


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_matches_loop(check_routing, score_func, k):
    torch.manual_seed(1)
    router = TopKRouter(D, E, num_experts_per_token=k, score_func=score_func)
    x = torch.randn(T, D)
    routing = router(x)
    check_routing(routing, T, E)
    _assert_matches(routing, _reference_rows(_scores(router, x), k))


def test_unnormalised_weights_and_scaling_factor():
    torch.manual_seed(2)
    router = TopKRouter(D, E, num_experts_per_token=2, score_func="sigmoid", routed_scaling_factor=2.5)
    x = torch.randn(T, D)
    _assert_matches(router(x), _reference_rows(_scores(router, x), 2, scale=2.5))
    per_token = torch.zeros(T).index_add_(0, router(x).token_idx_N, router(x).weight_N)
    assert torch.allclose(per_token, torch.full((T,), 2.5))

    raw = TopKRouter(D, E, num_experts_per_token=2, normalize_weights=False, routed_scaling_factor=2.0)
    _assert_matches(raw(x), _reference_rows(_scores(raw, x), 2, normalize=False, scale=2.0))


def _reference_capacity(rows, capacity, policy):
    if policy == "probability":
        order = sorted(rows, key=lambda r: -r[3])  # sorted() is stable: ties keep token-major order
    else:
        order = sorted(rows, key=lambda r: (r[1], r[0]))  # all first choices, then second choices
    kept, load = [], {}
    for row in order:
        if load.get(row[2], 0) < capacity:
            load[row[2]] = load.get(row[2], 0) + 1
            kept.append(row)
    return kept


@pytest.mark.parametrize("policy", ["probability", "position"])
@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 1.25])
def test_capacity_drop_matches_loop(check_routing, policy, capacity_factor):
    torch.manual_seed(3)
    k = 2
    router = TopKRouter(D, E, num_experts_per_token=k, capacity_factor=capacity_factor, drop_policy=policy)
    with torch.no_grad():
        router.gate.weight[1] += 0.5 * router.gate.weight[0]  # correlate two experts so both overflow
    x = torch.randn(T, D)
    x[:, :4] += 1.0
    routing = router(x)
    check_routing(routing, T, E)

    capacity = math.ceil(capacity_factor * T * k / E)
    rows = _reference_rows(_scores(router, x), k)
    kept = _reference_capacity(rows, capacity, policy)
    _assert_matches(routing, kept)
    assert int(routing.num_dropped) == len(rows) - len(kept)
    assert routing.num_requested == T * k
    assert int(routing.tokens_per_expert_E.max()) <= capacity
    if capacity_factor < 1:
        assert int(routing.num_dropped) > 0


def test_eval_capacity_factor_used_in_eval():
    torch.manual_seed(4)
    router = TopKRouter(D, E, num_experts_per_token=2, capacity_factor=None, eval_capacity_factor=0.5)
    x = torch.randn(T, D)
    assert int(router.train()(x).num_dropped) == 0
    routing = router.eval()(x)
    assert int(routing.tokens_per_expert_E.max()) <= math.ceil(0.5 * T * 2 / E)
    assert int(routing.num_dropped) > 0

    generous = TopKRouter(D, E, num_experts_per_token=2, capacity_factor=0.25, eval_capacity_factor=8.0)
    assert int(generous.train()(x).num_dropped) > 0
    assert int(generous.eval()(x).num_dropped) == 0


@pytest.mark.parametrize(("groups", "groups_per_token", "k"), [(2, 1, 3), (4, 2, 2), (4, 3, 4)])
def test_group_limited_matches_loop(check_routing, groups, groups_per_token, k):
    torch.manual_seed(5)
    router = TopKRouter(
        D, E, k, score_func="sigmoid", num_expert_groups=groups, num_groups_per_token=groups_per_token
    )
    x = torch.randn(T, D)
    routing = router(x)
    check_routing(routing, T, E)

    scores = _scores(router, x)
    size = E // groups
    allowed = []
    for row in scores:
        group_score = [sum(sorted(row[g * size : (g + 1) * size], reverse=True)[:2]) for g in range(groups)]
        best_groups = sorted(range(groups), key=lambda g: -group_score[g])[:groups_per_token]
        allowed.append([e for e in range(E) if e // size in best_groups])
    rows = _reference_rows(scores, k, allowed=allowed)
    _assert_matches(routing, rows)
    for t, e in zip(routing.token_idx_N.tolist(), routing.expert_idx_N.tolist()):
        assert e in allowed[t]


def test_expert_bias_changes_selection_not_weights():
    torch.manual_seed(6)
    router = TopKRouter(D, E, num_experts_per_token=2, expert_bias=True)
    x = torch.randn(T, D)
    bias = [0.0] * E
    bias[3] = 10.0
    router.expert_bias_E[3] = 10.0
    routing = router(x)
    assert set(routing.token_idx_N[routing.expert_idx_N == 3].tolist()) == set(range(T))
    _assert_matches(routing, _reference_rows(_scores(router, x), 2, bias=bias))
    # The weights are the unbiased probabilities, renormalised over the two chosen experts.
    assert routing.weight_N.max() < 1.0


def test_aux_free_bias_balances_skewed_router():
    torch.manual_seed(7)
    router = TopKRouter(D, E, num_experts_per_token=1, expert_bias=True, bias_update_rate=0.005)
    x = torch.randn(256, D)
    x[:, 0] = 1.0
    with torch.no_grad():
        router.gate.weight.normal_()
        router.gate.weight[:, 0] = 0.0
        router.gate.weight[0, 0] = 5.0  # a constant input feature makes every token favour expert 0

    def imbalance(load_E):
        load_E = load_E.float()
        return float(load_E.max() / load_E.mean())

    history = []
    for _ in range(200):
        history.append(imbalance(router(x).tokens_per_expert_E))
        router.update_expert_bias()
    assert history[0] > 3.5
    assert max(history[-10:]) < 1.5  # sign steps oscillate around balance; all late steps stay close
    assert int(router.expert_load_E.sum()) == 0  # restarted by the last update
    assert int(router.expert_bias_E.argmin()) == 0


def test_update_expert_bias_needs_expert_bias():
    with pytest.raises(RuntimeError, match="expert_bias=True"):
        TopKRouter(D, E).update_expert_bias()


def test_jitter_only_in_training():
    torch.manual_seed(8)
    router = TopKRouter(D, E, jitter_eps=0.5)
    x = torch.randn(T, D)
    clean = (x.double() @ router.gate.weight.double().t()).float()
    router.eval()
    assert torch.allclose(router(x).logits_TE, clean, atol=1e-5)
    router.train()
    first, second = router(x).logits_TE, router(x).logits_TE
    assert not torch.allclose(first, clean, atol=1e-3)
    assert not torch.allclose(first, second, atol=1e-3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_experts_per_token": 9}, "top_k=9 and num_experts=8"),
        ({"num_experts_per_token": 0}, "top_k=0 and num_experts=8"),
        ({"capacity_factor": 0.0}, "capacity_factor=0.0"),
        ({"capacity_factor": -1.0}, "capacity_factor=-1.0"),
        ({"eval_capacity_factor": 0}, "eval_capacity_factor=0"),
        ({"num_expert_groups": 3}, "num_expert_groups=3 and num_experts=8"),
        ({"num_expert_groups": 4, "num_groups_per_token": 5}, "num_groups_per_token=5 and num_expert_groups=4"),
        ({"num_expert_groups": 4, "num_groups_per_token": 1, "num_experts_per_token": 3}, "num_experts_per_token=3"),
        ({"score_func": "relu"}, "score_func='relu'"),
        ({"drop_policy": "random"}, "drop_policy='random'"),
        ({"jitter_eps": 1.0}, "jitter_eps=1.0"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TopKRouter(D, E, **kwargs)


def test_wrong_input_shape_raises():
    with pytest.raises(ValueError, match=r"\[tokens, 16\].*\(4, 8\)"):
        TopKRouter(D, E)(torch.randn(4, 8))

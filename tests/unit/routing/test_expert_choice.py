"""ExpertChoiceRouter against a loop over experts that each pick their best tokens."""

from __future__ import annotations

import math

import pytest
import torch

from moe_lightning.routing import ExpertChoiceRouter

D, E = 16, 8


def _reference(router: ExpertChoiceRouter, x_TD: torch.Tensor, capacity: int) -> dict[tuple[int, int], float]:
    rows = {}
    for t, logits in enumerate((x_TD.double() @ router.gate.weight.double().t()).tolist()):
        exps = [math.exp(v - max(logits)) for v in logits]
        for e in range(E):
            rows[(t, e)] = exps[e] / sum(exps)
    picked = {}
    for e in range(E):
        best = sorted(range(x_TD.shape[0]), key=lambda t: -rows[(t, e)])[:capacity]
        picked.update({(t, e): rows[(t, e)] for t in best})
    return picked


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("router_dtype", [torch.float32, torch.bfloat16])
def test_invariants(check_routing, x_dtype, router_dtype):
    torch.manual_seed(0)
    router = ExpertChoiceRouter(D, E, capacity_factor=2.0).to(router_dtype)
    check_routing(router(torch.randn(30, D, dtype=x_dtype)), 30, E)


@pytest.mark.parametrize(("num_tokens", "capacity_factor"), [(32, 1.0), (30, 1.0), (30, 2.0), (13, 0.5), (5, 4.0)])
def test_matches_loop_and_fills_every_expert(check_routing, num_tokens, capacity_factor):
    torch.manual_seed(1)
    router = ExpertChoiceRouter(D, E, capacity_factor=capacity_factor)
    x = torch.randn(num_tokens, D)
    routing = router(x)
    check_routing(routing, num_tokens, E)

    capacity = math.ceil(capacity_factor * num_tokens / E)
    assert routing.tokens_per_expert_E.tolist() == [capacity] * E
    assert int(routing.num_dropped) == 0
    assert routing.num_requested == E * capacity
    pairs = zip(routing.token_idx_N.tolist(), routing.expert_idx_N.tolist(), routing.weight_N.tolist())
    got = {(t, e): w for t, e, w in pairs}
    want = _reference(router, x, capacity)
    assert set(got) == set(want)
    for pair, weight in want.items():
        assert got[pair] == pytest.approx(weight, rel=1e-5)


def test_capacity_clamped_to_tokens():
    router = ExpertChoiceRouter(D, 4, capacity_factor=10.0)
    routing = router(torch.randn(6, D))
    assert routing.tokens_per_expert_E.tolist() == [6] * 4  # ceil(10 * 6 / 4) = 15 > 6 tokens
    assert router.num_experts_per_token == 4


def test_tokens_get_zero_or_several_experts():
    torch.manual_seed(2)
    router = ExpertChoiceRouter(D, E, capacity_factor=1.0)
    with torch.no_grad():
        router.gate.weight[:4] = router.gate.weight[0]  # four experts agree, so they pick the same tokens
    routing = router(torch.randn(64, D))
    experts_per_token = torch.bincount(routing.token_idx_N, minlength=64)
    assert int(experts_per_token.min()) == 0 and int(experts_per_token.max()) >= 4


def test_load_balance_loss_is_one_when_capacity_divides():
    torch.manual_seed(3)
    router = ExpertChoiceRouter(D, E, capacity_factor=1.0, load_balance_coef=1.0)
    assert router.num_experts_per_token == 1.0
    routing = router(torch.randn(32, D))  # C = 4 and E * C = T: every fraction is exactly 1 / E
    assert routing.aux_losses["load_balance"].item() == pytest.approx(1.0, abs=1e-6)


def test_weights_carry_gradient_to_gate():
    torch.manual_seed(4)
    router = ExpertChoiceRouter(D, E)
    routing = router(torch.randn(32, D))
    (routing.weight_N * torch.randn_like(routing.weight_N)).sum().backward()
    assert router.gate.weight.grad is not None and router.gate.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("capacity_factor", [0.0, -0.5])
def test_bad_capacity_factor_raises(capacity_factor):
    with pytest.raises(ValueError, match=f"capacity_factor={capacity_factor}"):
        ExpertChoiceRouter(D, E, capacity_factor=capacity_factor)

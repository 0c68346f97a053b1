"""``capacity_factor = inf`` is dropless: the same routing, bit for bit, as ``capacity_factor = None``."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from moe_lightning.experts import GroupedExperts
from moe_lightning.inference.generate import check_per_token_routing
from moe_lightning.layer import MoELayer
from moe_lightning.routing import ExpertChoiceRouter, Routing, TopKRouter

T, D, E, K = 40, 16, 8, 2
INF = float("inf")


def assert_same_routing(got: Routing, want: Routing) -> None:
    for field in dataclasses.fields(Routing):
        a, b = getattr(got, field.name), getattr(want, field.name)
        if isinstance(a, torch.Tensor):
            assert a.dtype == b.dtype and torch.equal(a, b), field.name
        elif isinstance(a, dict):
            assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a), field.name
        else:
            assert a == b, field.name


def routers(**kwargs) -> tuple[TopKRouter, TopKRouter]:
    """Two routers with the same weights, one built with ``kwargs`` and one dropless (None)."""
    torch.manual_seed(0)
    dropless = TopKRouter(D, E, K, z_loss_coef=1e-3, **{name: None for name in kwargs})
    other = TopKRouter(D, E, K, z_loss_coef=1e-3, **kwargs)
    other.load_state_dict(dropless.state_dict())
    return other, dropless


@pytest.mark.parametrize("drop_policy", ["probability", "position"])
@pytest.mark.parametrize("training", [True, False])
def test_infinite_capacity_routes_as_dropless(drop_policy, training):
    infinite, dropless = routers(capacity_factor=INF)
    infinite.drop_policy = drop_policy
    x = torch.randn(T, D)
    x[:, 0] += 2.0  # skewed, so a finite factor would drop
    got, want = infinite.train(training)(x), dropless.train(training)(x)
    assert_same_routing(got, want)
    assert int(got.num_dropped) == 0 and got.rows_per_token == K  # the fast fixed-K dispatch still applies
    finite, _ = routers(capacity_factor=1.0)
    assert int(finite.train(training)(x).num_dropped) > 0


def test_infinity_set_after_construction_is_dropless():
    router, dropless = routers(capacity_factor=0.5)
    router.capacity_factor = INF  # as a capacity-tuning callback may
    x = torch.randn(T, D)
    assert_same_routing(router(x), dropless(x))


def test_infinite_eval_capacity_evaluates_a_capacity_limited_router_dropless():
    router, dropless = routers(capacity_factor=0.5, eval_capacity_factor=INF)
    x = torch.randn(T, D)
    assert int(router.train()(x).num_dropped) > 0
    assert_same_routing(router.eval()(x), dropless.eval()(x))
    assert router.eval_capacity_factor is None  # so generation accepts it as per-token routing
    check_per_token_routing(router)


def test_moe_layer_forward_and_backward_bitwise():
    infinite, dropless = routers(capacity_factor=INF, eval_capacity_factor=INF)
    experts = GroupedExperts(E, D, 32)
    layers = [MoELayer(infinite, experts), MoELayer(dropless, copy.deepcopy(experts))]
    x = torch.randn(2, T // 2, D)
    grad = torch.randn_like(x)
    results = []
    for layer in layers:
        x_in = x.clone().requires_grad_()
        y, routing = layer(x_in)
        ((y * grad).sum() + sum(routing.aux_losses.values())).backward()
        results.append((y, x_in.grad, [p.grad for p in layer.parameters()]))
    (y_inf, gx_inf, grads_inf), (y_none, gx_none, grads_none) = results
    assert torch.equal(y_inf, y_none) and torch.equal(gx_inf, gx_none)
    assert all(torch.equal(a, b) for a, b in zip(grads_inf, grads_none, strict=True))


def test_yaml_infinity_parses_to_dropless():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(TopKRouter, "router")
    config = parser.parse_string("router: {dim: 16, num_experts: 8, capacity_factor: .inf}")
    router = parser.instantiate(config).router
    assert router.capacity_factor is None and router.eval_capacity_factor is None


def test_expert_choice_with_infinite_capacity_sends_every_token_to_every_expert():
    torch.manual_seed(2)
    infinite = ExpertChoiceRouter(D, E, capacity_factor=INF)
    full = ExpertChoiceRouter(D, E, capacity_factor=float(E))  # C = ceil(E * T / E) = T
    full.load_state_dict(infinite.state_dict())
    x = torch.randn(T, D)
    assert infinite.capacity(T) == T
    assert_same_routing(infinite(x), full(x))
    assert infinite.num_experts_per_token == E


@pytest.mark.parametrize("make", [
    lambda value: TopKRouter(D, E, capacity_factor=value),
    lambda value: TopKRouter(D, E, eval_capacity_factor=value),
    lambda value: ExpertChoiceRouter(D, E, capacity_factor=value),
])
@pytest.mark.parametrize("value", [math.nan, -INF])
def test_nan_and_minus_infinity_are_refused_by_name(make, value):
    with pytest.raises(ValueError, match=f"capacity_factor={value}"):
        make(value)

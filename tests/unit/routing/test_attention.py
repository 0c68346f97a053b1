"""AttentionRouter: expert logits from multi-head attention of tokens over learned expert keys."""

from __future__ import annotations

import math

import pytest
import torch

from moe_lightning import GroupedExperts, MoELayer
from moe_lightning.routing import AttentionRouter

D, E = 16, 8


def _reference_logits(router: AttentionRouter, x_TD: torch.Tensor) -> list[list[float]]:
    """Per token and expert: the mean over heads of q_h . k_{h,e} / sqrt(head_dim), as explicit sums."""
    w = router.query.weight.double().tolist()
    keys = router.expert_keys_HEDh.double().tolist()
    heads, head_dim = router.num_heads, router.head_dim
    out = []
    for x in x_TD.double().tolist():
        query = [sum(wi * xi for wi, xi in zip(row, x)) for row in w]
        out.append([
            sum(
                sum(query[h * head_dim + d] * keys[h][e][d] for d in range(head_dim)) / math.sqrt(head_dim)
                for h in range(heads)
            ) / heads
            for e in range(E)
        ])
    return out


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("router_dtype", [torch.float32, torch.bfloat16])
def test_invariants(check_routing, x_dtype, router_dtype):
    torch.manual_seed(0)
    router = AttentionRouter(D, E, num_experts_per_token=2).to(router_dtype)
    routing = router(torch.randn(24, D, dtype=x_dtype))
    check_routing(routing, 24, E)
    assert routing.aux_losses["load_balance"].dtype == torch.float32


@pytest.mark.parametrize(("num_heads", "head_dim", "k"), [(4, None, 2), (1, None, 1), (3, 5, 3)])
def test_matches_loop(check_routing, num_heads, head_dim, k):
    torch.manual_seed(1)
    router = AttentionRouter(D, E, num_experts_per_token=k, num_heads=num_heads, head_dim=head_dim)
    x = torch.randn(12, D)
    routing = router(x)
    check_routing(routing, 12, E)

    logits = _reference_logits(router, x)
    assert torch.allclose(routing.logits_TE, torch.tensor(logits, dtype=torch.float32), atol=1e-5)
    want = {}
    for t, row in enumerate(logits):
        probs = [math.exp(v - max(row)) for v in row]
        chosen = sorted(range(E), key=lambda e: -probs[e])[:k]
        want.update({(t, e): probs[e] / sum(probs[c] for c in chosen) for e in chosen})
    got = dict(zip(zip(routing.token_idx_N.tolist(), routing.expert_idx_N.tolist()), routing.weight_N.tolist()))
    assert set(got) == set(want)
    for pair, weight in want.items():
        assert got[pair] == pytest.approx(weight, rel=1e-5)


def test_gradients_reach_queries_and_keys_through_moe_layer():
    torch.manual_seed(2)
    router = AttentionRouter(D, E, num_experts_per_token=2, load_balance_coef=0.01)
    layer = MoELayer(router, GroupedExperts(E, D, 32, implementation="grouped_mm"))
    x = torch.randn(2, 6, D)
    y, routing = layer(x)
    loss = (y * torch.randn_like(y)).sum() + sum(routing.aux_losses.values())
    loss.backward()
    for param in (router.query.weight, router.expert_keys_HEDh):
        assert param.grad is not None and param.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_heads": 3}, "dim=16 and num_heads=3"),
        ({"num_heads": 0}, "num_heads=0"),
        ({"head_dim": 0}, "head_dim=0"),
        ({"num_experts_per_token": 9}, "top_k=9 and num_experts=8"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AttentionRouter(D, E, **kwargs)


def test_head_dim_need_not_divide_dim():
    router = AttentionRouter(D, E, num_heads=3, head_dim=7)
    assert router.query.weight.shape == (21, D) and router.expert_keys_HEDh.shape == (3, E, 7)


def test_wrong_input_shape_raises():
    with pytest.raises(ValueError, match=r"\[tokens, 16\].*\(4, 12\)"):
        AttentionRouter(D, E)(torch.randn(4, 12))

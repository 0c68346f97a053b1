"""HashRouter: a fixed, reproducible token-id -> experts map, checked against plain-Python integer arithmetic."""

from __future__ import annotations

import pytest
import torch

from moe_lightning import GroupedExperts, MoELayer
from moe_lightning.routing import HashRouter

D, E = 16, 8
MASK = 0xFFFFFFFF


def _mix(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & MASK
    x ^= x >> 15
    x = (x * 0x5BD1E995) & MASK
    return x ^ (x >> 16)


def _reference_experts(token_id: int, seed: int, num_experts: int, k: int) -> set[int]:
    """The documented map in exact Python integers: the K largest hashes of (token id, seed, expert)."""
    token_key = _mix((token_id & MASK) ^ _mix(seed & MASK))
    hashes = [_mix(token_key ^ _mix(e)) for e in range(num_experts)]
    return set(sorted(range(num_experts), key=lambda e: -hashes[e])[:k])


def _experts_by_token(routing, num_tokens: int) -> list[set[int]]:
    out = [set() for _ in range(num_tokens)]
    for t, e in zip(routing.token_idx_N.tolist(), routing.expert_idx_N.tolist()):
        out[t].add(e)
    return out


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 3])
def test_invariants(check_routing, x_dtype, k):
    router = HashRouter(D, E, num_experts_per_token=k)
    routing = router(torch.randn(20, D, dtype=x_dtype), token_ids_T=torch.randint(0, 50_000, (20,)))
    check_routing(routing, 20, E)
    assert torch.equal(routing.weight_N, torch.full((20 * k,), 1.0 / k))
    assert torch.equal(routing.logits_TE, torch.zeros(20, E))
    assert torch.equal(routing.probs_TE.sum(dim=-1), torch.ones(20))
    assert torch.equal((routing.probs_TE > 0).sum(dim=-1), torch.full((20,), k))
    assert len(list(router.parameters())) == 0


@pytest.mark.parametrize(("seed", "k"), [(0, 1), (0, 2), (17, 3), (2**40 + 5, 2)])
def test_matches_integer_reference(seed, k):
    ids = [0, 1, 2, 3, 999, 12345, 50_256, 2**31 - 1, -100]
    router = HashRouter(D, E, num_experts_per_token=k, seed=seed)
    routing = router(torch.randn(len(ids), D), token_ids_T=torch.tensor(ids))
    assert _experts_by_token(routing, len(ids)) == [_reference_experts(i, seed, E, k) for i in ids]


def test_deterministic_and_seeded():
    ids = torch.randint(0, 2**31 - 1, (500,), generator=torch.Generator().manual_seed(0))
    x = torch.randn(500, D)
    first = _experts_by_token(HashRouter(D, E, 2, seed=3)(x, token_ids_T=ids), 500)
    again = _experts_by_token(HashRouter(D, E, 2, seed=3)(torch.randn(500, D), token_ids_T=ids.int()), 500)
    other = _experts_by_token(HashRouter(D, E, 2, seed=4)(x, token_ids_T=ids), 500)
    assert first == again
    assert sum(a == b for a, b in zip(first, other)) < 100  # two random 2-of-8 sets agree 1 time in 28


def test_same_id_same_experts_anywhere_in_batch():
    ids = torch.tensor([7, 42, 7, 7, 42])
    by_token = _experts_by_token(HashRouter(D, E, 2)(torch.randn(5, D), token_ids_T=ids), 5)
    assert by_token[0] == by_token[2] == by_token[3] and by_token[1] == by_token[4]


@pytest.mark.parametrize("k", [1, 2])
def test_roughly_balanced_over_many_ids(k):
    num_ids = 64_000
    routing = HashRouter(D, 16, k)(torch.zeros(num_ids, D), token_ids_T=torch.arange(num_ids))
    load = routing.tokens_per_expert_E.float()
    assert float(load.max() / load.mean()) < 1.05
    assert float(load.min() / load.mean()) > 0.95


def test_needs_token_ids():
    with pytest.raises(ValueError, match="token_ids="):
        HashRouter(D, E)(torch.randn(4, D))


def test_token_ids_validated():
    router = HashRouter(D, E)
    with pytest.raises(ValueError, match=r"\(4,\).*\(3,\)"):
        router(torch.randn(4, D), token_ids_T=torch.arange(3))
    with pytest.raises(TypeError, match="float32"):
        router(torch.randn(4, D), token_ids_T=torch.zeros(4))


@pytest.mark.parametrize("k", [0, 9])
def test_bad_k_raises(k):
    with pytest.raises(ValueError, match=f"top_k={k} and num_experts=8"):
        HashRouter(D, E, num_experts_per_token=k)


def test_moe_layer_passes_token_ids():
    layer = MoELayer(HashRouter(D, E, 2), GroupedExperts(E, D, 32))
    x, ids = torch.randn(2, 5, D), torch.randint(0, 1000, (2, 5))
    y, routing = layer(x, token_ids=ids)
    assert y.shape == x.shape
    assert _experts_by_token(routing, 10)[3] == _reference_experts(int(ids[0, 3]), 0, E, 2)
    with pytest.raises(ValueError, match="token_ids="):
        layer(x)

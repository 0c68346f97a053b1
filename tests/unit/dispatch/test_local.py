"""LocalDispatcher: the sort-free fixed-K path against the general gather / index_add path, forward and backward."""

import pytest
import torch

from moe_lightning.dispatch import LocalDispatcher
from moe_lightning.routing import TopKRouter


def dispatch_combine(dispatcher, x_TD, routing, expert_fn):
    x_ND, tokens_per_expert_E, state = dispatcher.dispatch(x_TD, routing)
    return dispatcher.combine(expert_fn(x_ND, tokens_per_expert_E), state)


def per_expert_scale(x_ND, tokens_per_expert_E):
    # A stand-in expert that depends on which expert a row reached, so a mis-sorted row changes the result.
    expert_of_row = torch.repeat_interleave(torch.arange(len(tokens_per_expert_E)), tokens_per_expert_E)
    return x_ND * (1.0 + expert_of_row.unsqueeze(-1)) + x_ND.pow(2)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_fixed_k_path_matches_general_path_forward_and_backward(k):
    router = TopKRouter(8, 5, num_experts_per_token=k)
    x_TD = torch.randn(11, 8)
    grad_TD = torch.randn(11, 8)
    results = []
    for allow_fixed_k in (True, False):
        x = x_TD.clone().requires_grad_()
        router.zero_grad()
        routing = router(x)
        assert routing.rows_per_token == k
        y = dispatch_combine(LocalDispatcher(allow_fixed_k), x, routing, per_expert_scale)
        (y * grad_TD).sum().backward()
        results.append((y.detach(), x.grad, router.gate.weight.grad.clone()))
    for fast, general in zip(*results):
        torch.testing.assert_close(fast, general, rtol=1e-5, atol=1e-6)


def test_hand_computed_combine():
    # Two tokens, top-2 over 3 experts, identity experts: y_t = (w_t0 + w_t1) * x_t.
    router = TopKRouter(2, 3, num_experts_per_token=2, normalize_weights=False)
    x_TD = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    routing = router(x_TD)
    expected = routing.weight_N.view(2, 2).sum(1, keepdim=True) * x_TD
    y = dispatch_combine(LocalDispatcher(), x_TD, routing, lambda x_ND, counts: x_ND)
    torch.testing.assert_close(y, expected)


def test_dropped_rows_take_the_general_path():
    routing = TopKRouter(8, 4, num_experts_per_token=2, capacity_factor=0.5)(torch.randn(16, 8))
    assert routing.rows_per_token is None and routing.num_dropped > 0

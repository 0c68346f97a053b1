"""MoELayer against a per-row reference for every router, forward and backward, and its invariants."""

import pytest
import torch
import torch.nn.functional as F

from moe_lightning import FeedForward, GroupedExperts, MoELayer, SharedExperts
from moe_lightning.routing import AttentionRouter, ExpertChoiceRouter, HashRouter, SinkhornRouter, TopKRouter

DIM, HIDDEN, EXPERTS = 16, 24, 4

ROUTERS = {
    "topk": lambda: TopKRouter(DIM, EXPERTS, num_experts_per_token=2),
    "topk_sigmoid_groups": lambda: TopKRouter(
        DIM, EXPERTS, num_experts_per_token=2, score_func="sigmoid", num_expert_groups=2, num_groups_per_token=1
    ),
    "topk_capacity": lambda: TopKRouter(DIM, EXPERTS, num_experts_per_token=2, capacity_factor=0.5),
    "expert_choice": lambda: ExpertChoiceRouter(DIM, EXPERTS, capacity_factor=1.0),
    "hash": lambda: HashRouter(DIM, EXPERTS, num_experts_per_token=2),
    "sinkhorn": lambda: SinkhornRouter(DIM, EXPERTS, num_experts_per_token=2),
    "attention": lambda: AttentionRouter(DIM, EXPERTS, num_experts_per_token=2),
}


def expert_mlp(experts: GroupedExperts, e: int, x_D):
    gate_D_F, up_D_F = experts.w_in_EDH[e, :, :HIDDEN], experts.w_in_EDH[e, :, HIDDEN:]
    return (F.silu(x_D @ gate_D_F) * (x_D @ up_D_F)) @ experts.w_down_EFD[e]


def reference_forward(layer: MoELayer, x_BLD, token_ids_BL):
    """Route, then add each routed row's weighted expert output to its token, one row at a time."""
    x_TD = x_BLD.reshape(-1, DIM)
    routing = layer.router(x_TD, token_ids_T=token_ids_BL.reshape(-1), sequence_length=x_BLD.shape[1])
    rows = [torch.zeros(DIM) for _ in range(x_TD.shape[0])]
    for t, e, w in zip(routing.token_idx_N.tolist(), routing.expert_idx_N.tolist(), routing.weight_N):
        rows[t] = rows[t] + w * expert_mlp(layer.experts, e, x_TD[t])
    y_TD = torch.stack(rows)
    if layer.shared_experts is not None:
        y_TD = y_TD + layer.shared_experts(x_TD)
    return y_TD.view_as(x_BLD)


def make_layer(router_name, implementation, shared=False):
    torch.manual_seed(1)
    return MoELayer(
        ROUTERS[router_name](),
        GroupedExperts(EXPERTS, DIM, HIDDEN, implementation=implementation),
        SharedExperts(DIM, HIDDEN, gated=True) if shared else None,
    )


def output_and_grads(layer, forward, x_BLD, grad_BLD):
    x = x_BLD.clone().requires_grad_()
    y = forward(layer, x)
    params = [p for p in layer.parameters()]
    grads = torch.autograd.grad((y * grad_BLD).sum(), [x] + params, allow_unused=True)
    return y.detach(), [torch.zeros_like(p) if g is None else g for p, g in zip([x] + params, grads)]


@pytest.mark.parametrize("router_name", sorted(ROUTERS))
@pytest.mark.parametrize("implementation", ["grouped_mm", "loop"])
def test_layer_matches_per_row_reference_forward_and_backward(router_name, implementation):
    layer = make_layer(router_name, implementation, shared=router_name == "topk")
    x_BLD, grad_BLD = torch.randn(2, 6, DIM), torch.randn(2, 6, DIM)
    token_ids_BL = torch.randint(0, 100, (2, 6))

    y, grads = output_and_grads(layer, lambda m, x: m(x, token_ids=token_ids_BL)[0], x_BLD, grad_BLD)
    y_ref, grads_ref = output_and_grads(layer, lambda m, x: reference_forward(m, x, token_ids_BL), x_BLD, grad_BLD)

    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)


def test_one_expert_top1_equals_dense_feedforward():
    layer = MoELayer(TopKRouter(DIM, 1, num_experts_per_token=1), GroupedExperts(1, DIM, HIDDEN))
    dense = FeedForward(DIM, HIDDEN)
    with torch.no_grad():
        dense.in_proj.weight.copy_(layer.experts.w_in_EDH[0].T)
        dense.down_proj.weight.copy_(layer.experts.w_down_EFD[0].T)
    x = torch.randn(3, 5, DIM)
    y, routing = layer(x)
    torch.testing.assert_close(y, dense(x))
    assert torch.equal(routing.weight_N, torch.ones(15))


@pytest.mark.parametrize("shape", [(DIM,), (7, DIM), (2, 3, DIM), (2, 2, 2, DIM)])
def test_any_leading_shape(shape):
    layer = make_layer("topk", "grouped_mm")
    x = torch.randn(*shape)
    y, routing = layer(x)
    assert y.shape == x.shape
    assert routing.num_tokens == x.numel() // DIM


def test_padding_is_left_out_of_the_balance_loss():
    layer = make_layer("topk", "grouped_mm")
    x = torch.randn(1, 8, DIM)
    mask = torch.tensor([[True] * 5 + [False] * 3])
    _, masked = layer(x, padding_mask=mask)
    _, trimmed = layer(x[:, :5])
    torch.testing.assert_close(masked.aux_losses["load_balance"], trimmed.aux_losses["load_balance"])


def test_bad_inputs_name_the_values():
    layer = make_layer("topk", "grouped_mm")
    with pytest.raises(ValueError, match=r"last dimension 16, got input shape \(2, 8\)"):
        layer(torch.randn(2, 8))
    with pytest.raises(ValueError, match=r"token_ids must have shape \(2, 3\), got \(3,\)"):
        layer(torch.randn(2, 3, DIM), token_ids=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="router.num_experts=4, experts.num_experts=3"):
        MoELayer(TopKRouter(DIM, 4), GroupedExperts(3, DIM, HIDDEN))
    with pytest.raises(ValueError, match="token ids"):
        make_layer("hash", "grouped_mm")(torch.randn(2, 3, DIM))

"""GroupedExperts: the grouped-GEMM path and the loop path against a per-row reference, forward and backward."""

import pytest
import torch
import torch.nn.functional as F

from moe_lightning.experts import FeedForward, GroupedExperts

HIDDEN = 24


def per_row_reference(experts: GroupedExperts, x_ND, tokens_per_expert_E):
    """Each row through its own expert, one row at a time, written from the formulas."""
    expert_of_row = torch.repeat_interleave(torch.arange(experts.num_experts), tokens_per_expert_E)
    rows = []
    for x_D, e in zip(x_ND, expert_of_row.tolist()):
        h = x_D @ experts.w_in_EDH[e]
        hidden = F.silu(h[:HIDDEN]) * h[HIDDEN:] if experts.activation == "swiglu" else F.gelu(h)
        rows.append(hidden @ experts.w_down_EFD[e])
    return torch.stack(rows)


def twin_experts(activation, dtype=torch.float32):
    grouped = GroupedExperts(4, 16, HIDDEN, activation=activation, implementation="grouped_mm").to(dtype)
    loop = GroupedExperts(4, 16, HIDDEN, activation=activation, implementation="loop").to(dtype)
    loop.load_state_dict(grouped.state_dict())
    return grouped, loop


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_grouped_and_loop_match_per_row_reference_forward_and_backward(activation):
    grouped, loop = twin_experts(activation)
    tokens_per_expert_E = torch.tensor([3, 0, 5, 2])  # an empty expert included
    x_ND = torch.randn(10, 16)
    grad_ND = torch.randn(10, 16)

    outputs, grads = [], []
    for module in (grouped, loop):
        x = x_ND.clone().requires_grad_()
        y = module(x, tokens_per_expert_E)
        (y * grad_ND).sum().backward()
        outputs.append(y.detach())
        grads.append([x.grad] + [p.grad for p in module.parameters()])

    reference = per_row_reference(grouped, x_ND, tokens_per_expert_E)
    torch.testing.assert_close(outputs[0], reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outputs[1], reference, rtol=1e-5, atol=1e-6)
    for g_grouped, g_loop in zip(*grads):
        torch.testing.assert_close(g_grouped, g_loop, rtol=1e-5, atol=1e-6)
    assert grouped.w_in_EDH.grad[1].abs().sum() == 0  # the idle expert gets no gradient


def test_grouped_matches_loop_in_bf16():
    grouped, loop = twin_experts("swiglu", torch.bfloat16)
    tokens_per_expert_E = torch.tensor([8, 16, 0, 8])
    x_ND = torch.randn(32, 16, dtype=torch.bfloat16)
    torch.testing.assert_close(grouped(x_ND, tokens_per_expert_E), loop(x_ND, tokens_per_expert_E), rtol=2e-2, atol=2e-2)


def test_single_expert_equals_feedforward_with_same_weights():
    experts = GroupedExperts(1, 16, 24)
    dense = FeedForward(16, 24)
    with torch.no_grad():
        dense.in_proj.weight.copy_(experts.w_in_EDH[0].T)
        dense.down_proj.weight.copy_(experts.w_down_EFD[0].T)
    x_ND = torch.randn(7, 16)
    torch.testing.assert_close(experts(x_ND, torch.tensor([7])), dense(x_ND))


def test_invalid_arguments_name_the_values():
    with pytest.raises(ValueError, match="activation=.relu6"):
        GroupedExperts(2, 8, 8, activation="relu6")
    with pytest.raises(ValueError, match="implementation=.fast"):
        GroupedExperts(2, 8, 8, implementation="fast")
    with pytest.raises(ValueError, match="num_experts=0"):
        GroupedExperts(0, 8, 8)


def test_triton_implementation_on_operands_it_cannot_take_names_them():
    experts = GroupedExperts(2, 8, 8, implementation="triton")
    with pytest.raises(ValueError, match=r"torch.float32 \(6, 8\) on cpu"):
        experts(torch.randn(6, 8), torch.tensor([4, 2]))

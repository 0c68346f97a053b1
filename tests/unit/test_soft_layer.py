"""SoftMoELayer against a loop over positions, slots and tokens (fwd and bwd, fp64); causality, padding, misuse."""

from __future__ import annotations

import pytest
import torch

from moe_lightning.experts import GroupedExperts
from moe_lightning.layer import MoELayer
from moe_lightning.routing import RouterNumerics, TopKRouter
from moe_lightning.routing.soft import NORM_EPS, SoftMoERouter
from moe_lightning.soft_layer import SoftMoELayer

B, L, D, E, S, F = 3, 4, 8, 3, 2, 4


def soft_moe_loop(x_BLD, phi_ESD, scale, w_in_EDH, w_down_EFD, valid_BL=None) -> torch.Tensor:
    """Soft MoE one token and one slot at a time: at each position, every slot averages the batch's tokens by the
    softmax over tokens of ``scale * cos(token, phi)``, its expert's SwiGLU MLP runs on it, and every token averages
    the slot outputs by the softmax over slots of the same logits."""
    batch, length, _ = x_BLD.shape
    slots = [(e, s) for e in range(phi_ESD.shape[0]) for s in range(phi_ESD.shape[1])]

    def cos(u, v):
        return (u @ v) * torch.rsqrt(u @ u + NORM_EPS) * torch.rsqrt(v @ v + NORM_EPS)

    def expert(e, v):
        h = v @ w_in_EDH[e]
        gate, up = h[:F], h[F:]
        return (gate * torch.sigmoid(gate) * up) @ w_down_EFD[e]

    rows = [[None] * length for _ in range(batch)]
    for l in range(length):
        real = [b for b in range(batch) if valid_BL is None or valid_BL[b, l]]
        exp_logits = [[torch.exp(scale * cos(x_BLD[b, l], phi_ESD[e, s])) for e, s in slots] for b in range(batch)]
        slot_outputs = []
        for j, (e, _) in enumerate(slots):
            total = sum(exp_logits[b][j] for b in real)
            slot_input = sum((exp_logits[b][j] / total * x_BLD[b, l] for b in real), torch.zeros_like(x_BLD[0, 0]))
            slot_outputs.append(expert(e, slot_input))
        for b in range(batch):
            total = sum(exp_logits[b])
            rows[b][l] = sum(exp_logits[b][j] / total * slot_outputs[j] for j in range(len(slots)))
    return torch.stack([torch.stack(row) for row in rows])


def _layer(implementation: str = "auto", dtype: torch.dtype = torch.float32) -> SoftMoELayer:
    torch.manual_seed(0)
    numerics = RouterNumerics(dtype="float64") if dtype == torch.float64 else None
    router = SoftMoERouter(D, E, slots_per_expert=S, numerics=numerics)
    experts = GroupedExperts(E, D, F, implementation=implementation, init_std=0.5)
    with torch.no_grad():
        router.scale.fill_(3.0)
    return SoftMoELayer(router, experts).to(dtype)


# torch's grouped_mm has no fp64 kernel, so fp64 runs the experts' own loop (tested against grouped_mm in
# tests/unit/experts); the grouped GEMM is checked in fp32.
@pytest.mark.parametrize(
    ("implementation", "dtype", "tolerance"),
    [("loop", torch.float64, 1e-10), ("grouped_mm", torch.float32, 1e-5)],
)
@pytest.mark.parametrize("padded", [False, True])
def test_matches_the_loop_reference_forward_and_backward(implementation, dtype, tolerance, padded):
    layer = _layer(implementation, dtype)
    x_BLD = torch.randn(B, L, D, dtype=dtype, requires_grad=True)
    valid_BL = torch.tensor([[True, False, True, True], [True, True, False, True], [False, True, True, True]])
    valid_BL = valid_BL if padded else None
    grad_BLD = torch.randn(B, L, D, dtype=dtype)
    inputs = [x_BLD, layer.router.phi_ESD, layer.router.scale, layer.experts.w_in_EDH, layer.experts.w_down_EFD]

    y_BLD, routing = layer(x_BLD, padding_mask=valid_BL)
    want_BLD = soft_moe_loop(*inputs, valid_BL)
    torch.testing.assert_close(y_BLD, want_BLD, rtol=tolerance, atol=tolerance)
    assert routing.tokens_per_expert_E.tolist() == [B * L] * E
    for got, want in zip(torch.autograd.grad((y_BLD * grad_BLD).sum(), inputs),
                         torch.autograd.grad((want_BLD * grad_BLD).sum(), inputs)):
        torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)


def test_experts_see_s_slots_per_position_as_one_block():
    layer = _layer()
    seen = {}
    layer.experts.register_forward_pre_hook(lambda _, args: seen.update(rows=args[0].shape, counts=args[1].tolist()))
    layer(torch.randn(B, L, D))
    assert seen == {"rows": (E * L * S, D), "counts": [L * S] * E}


def test_no_position_sees_a_later_one():
    layer = _layer()
    x_BLD = torch.randn(B, L, D, requires_grad=True)
    y_BLD, _ = layer(x_BLD)
    (grad_BLD,) = torch.autograd.grad((y_BLD[:, :2] * torch.randn(B, 2, D)).sum(), x_BLD)
    assert bool((grad_BLD[:, 2:] == 0).all()), "an output at position < 2 depends on a later position"
    assert bool((grad_BLD[:, :2] != 0).any())
    changed_BLD = x_BLD.detach().clone()
    changed_BLD[:, 2:] = torch.randn(B, L - 2, D)
    torch.testing.assert_close(layer(changed_BLD)[0][:, :2], y_BLD[:, :2])


def test_sequences_mix_at_a_position_and_padding_feeds_nothing():
    layer = _layer()
    x_BLD = torch.randn(B, L, D)
    valid_BL = torch.ones(B, L, dtype=torch.bool)
    valid_BL[1, 1] = False
    y_BLD, _ = layer(x_BLD, padding_mask=valid_BL)
    other_BLD = x_BLD.clone()
    other_BLD[1, 1] = 100.0 * torch.randn(D)  # a padded token: nobody else's output moves
    other_BLD[2, 3] = torch.randn(D)  # a real token: the other sequences' outputs at its position move
    y_other_BLD, _ = layer(other_BLD, padding_mask=valid_BL)
    keep_BL = valid_BL.clone()
    keep_BL[:, 3] = False
    torch.testing.assert_close(y_other_BLD[keep_BL], y_BLD[keep_BL])
    assert not torch.allclose(y_other_BLD[0, 3], y_BLD[0, 3])


def test_shared_experts_are_added():
    layer = _layer()
    shared = torch.nn.Linear(D, D)
    with_shared = SoftMoELayer(layer.router, layer.experts, shared)
    x_BLD = torch.randn(B, L, D)
    torch.testing.assert_close(with_shared(x_BLD)[0], layer(x_BLD)[0] + shared(x_BLD))


def test_misuse_is_named():
    layer = _layer()
    with pytest.raises(TypeError, match="SoftMoELayer runs a SoftMoERouter, got router=TopKRouter"):
        SoftMoELayer(TopKRouter(D, E), layer.experts)
    with pytest.raises(ValueError, match=r"\[batch, length, 8\] input, got shape \(12, 8\)"):
        layer(torch.randn(B * L, D))
    with pytest.raises(ValueError, match=r"padding_mask must have shape \(3, 4\), got \(4, 3\)"):
        layer(torch.randn(B, L, D), padding_mask=torch.ones(L, B, dtype=torch.bool))
    with pytest.raises(TypeError, match="runs inside a SoftMoELayer"):
        MoELayer(layer.router, layer.experts)(torch.randn(B, L, D))

"""DeepSpeed-MoE's layer as an experts backend: on the same weights and input it gives our MoELayer's outputs and
gradients (the MoELayer with GroupedExperts is the reference), and a Routing analytics can read."""

import pytest
import torch

pytest.importorskip("moe_lightning_deepspeed")

from moe_lightning import GroupedExperts, MoELayer  # noqa: E402
from moe_lightning.routing import HashRouter, TopKRouter  # noqa: E402
from moe_lightning_deepspeed.experts import DeepSpeedMoELayer  # noqa: E402

DIM, EXPERTS, HIDDEN = 16, 8, 24
# Measured maxima (fp32: 7e-7 on gradients; bf16: one or two bf16 ulps of values ~1) with room for other machines.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def layers(k, dtype, activation="swiglu"):
    torch.manual_seed(0)
    router = TopKRouter(DIM, EXPERTS, num_experts_per_token=k, normalize_weights=k > 1, load_balance_coef=0.0)
    ours = MoELayer(router, GroupedExperts(EXPERTS, DIM, HIDDEN, activation=activation, init_std=0.2)).to(dtype)
    return ours, DeepSpeedMoELayer.from_moe_layer(ours).to(dtype)


def run(layer, x, grad_out):
    x = x.detach().requires_grad_()
    y, routing = layer(x)
    (y * grad_out).sum().backward()
    return y, x.grad, routing


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k,activation", [(1, "swiglu"), (2, "swiglu"), (3, "gelu")])
def test_outputs_and_gradients_match_our_layer(k, activation, dtype):
    ours, ds = layers(k, dtype, activation)
    g = torch.Generator().manual_seed(1)
    x, grad_out = (torch.randn(3, 5, DIM, generator=g).to(dtype) for _ in range(2))
    y, gx, routing = run(ours, x, grad_out)
    ds_y, ds_gx, ds_routing = run(ds, x, grad_out)
    torch.testing.assert_close(ds_y, y, **TOL[dtype])
    torch.testing.assert_close(ds_gx, gx, **TOL[dtype])
    torch.testing.assert_close(ds.gate_weight_ED.grad, ours.router.gate.weight.grad, **TOL[dtype])
    for e, expert in enumerate(ds.experts):
        torch.testing.assert_close(expert.w_in_DH.grad, ours.experts.w_in_EDH.grad[e], **TOL[dtype])
        torch.testing.assert_close(expert.w_down_FD.grad, ours.experts.w_down_EFD.grad[e], **TOL[dtype])
    assert torch.equal(ds_routing.tokens_per_expert_E, routing.tokens_per_expert_E)
    assert ds_routing.rows_per_token == k and int(ds_routing.num_dropped) == 0


def test_routing_rows_are_ours():
    ours, ds = layers(2, torch.float32)
    x = torch.randn(4, DIM, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _, routing = ours(x)
        _, ds_routing = ds(x)
    def rows(r):
        return sorted(zip(r.token_idx_N.tolist(), r.expert_idx_N.tolist(), r.weight_N.tolist()))
    for (t, e, w), (dt, de, dw) in zip(rows(routing), rows(ds_routing), strict=True):
        assert (t, e) == (dt, de) and w == pytest.approx(dw, abs=1e-6)
    torch.testing.assert_close(ds_routing.logits_TE, routing.logits_TE)


def test_capacity_drops_are_counted_and_the_loss_is_weighted():
    torch.manual_seed(0)
    ds = DeepSpeedMoELayer(DIM, EXPERTS, HIDDEN, num_experts_per_token=2, capacity_factor=0.25, load_balance_coef=0.5)
    with torch.no_grad():
        ds.gate_weight_ED[:, 0] = torch.arange(EXPERTS, dtype=torch.float32) * 5  # every token prefers the last two
        _, routing = ds(torch.ones(16, DIM))
    assert int(routing.num_dropped) > 0 and routing.rows_per_token is None
    assert routing.token_idx_N.numel() == 32 - int(routing.num_dropped) == int(routing.tokens_per_expert_E.sum())
    assert set(routing.aux_losses) == {"load_balance"} and routing.aux_losses["load_balance"] > 0


def test_misuse_is_named():
    with pytest.raises(ValueError, match="num_experts_per_token must be in .*num_experts_per_token=9"):
        DeepSpeedMoELayer(DIM, EXPERTS, HIDDEN, num_experts_per_token=9)
    with pytest.raises(ValueError, match="capacity_factor must be > 0 or None .*capacity_factor=0"):
        DeepSpeedMoELayer(DIM, EXPERTS, HIDDEN, capacity_factor=0)
    _, ds = layers(2, torch.float32)
    with pytest.raises(ValueError, match=r"expects last dimension 16, got input shape \(2, 5\)"):
        ds(torch.ones(2, 5))
    with pytest.raises(ValueError, match="takes neither token_ids nor padding_mask"):
        ds(torch.ones(2, DIM), padding_mask=torch.ones(2, dtype=torch.bool))
    hashed = MoELayer(HashRouter(DIM, EXPERTS), GroupedExperts(EXPERTS, DIM, HIDDEN))
    with pytest.raises(TypeError, match="top-k softmax gate, got HashRouter"):
        DeepSpeedMoELayer.from_moe_layer(hashed)

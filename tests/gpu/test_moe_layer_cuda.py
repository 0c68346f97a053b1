"""On the GPU: MoELayer's fast path (grouped_mm, fused SwiGLU, fixed-K dispatch) against the loop reference."""

import copy

import pytest
import torch

from moe_lightning import GroupedExperts, MoELayer, TopKRouter
from moe_lightning.routing import ExpertChoiceRouter

pytestmark = pytest.mark.gpu


def relative_error(got, want):
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


@pytest.mark.parametrize("router_cls", [TopKRouter, ExpertChoiceRouter])
def test_fast_path_matches_loop_reference_in_bf16(router_cls):
    torch.manual_seed(0)
    fast = MoELayer(router_cls(256, 16), GroupedExperts(16, 256, 512, implementation="grouped_mm"))
    fast = fast.cuda().bfloat16()
    slow = copy.deepcopy(fast)
    slow.experts.implementation = "loop"
    x = torch.randn(4, 512, 256, device="cuda", dtype=torch.bfloat16)
    grad = torch.randn_like(x)
    outs = []
    for layer in (fast, slow):
        inp = x.clone().requires_grad_()
        y, _ = layer(inp)
        y.backward(grad)
        outs.append([y.detach(), inp.grad] + [p.grad for p in layer.parameters()])
    for got, want in zip(*outs):
        assert torch.isfinite(got).all()
        assert relative_error(got, want) < 1e-2

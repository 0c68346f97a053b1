"""MoELayer compiles as one graph (no graph breaks) and the compiled layer computes what the eager one does.

On CUDA the graph holds the Triton kernels of the fast path.
"""

import copy

import pytest
import torch

from moe_lightning import GroupedExperts, MoELayer, TopKRouter


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_moe_layer_compiles_without_graph_breaks_forward_and_backward(device):
    torch._dynamo.reset()
    layer = MoELayer(TopKRouter(64, 8, 2), GroupedExperts(8, 64, 128, implementation="grouped_mm"))
    layer = layer.to(device=device, dtype=torch.bfloat16)
    twin = copy.deepcopy(layer)
    compiled = torch.compile(twin, fullgraph=True)  # fullgraph: any graph break raises
    x = torch.randn(4, 32, 64, dtype=torch.bfloat16, device=device)
    grad = torch.randn_like(x)

    y, _ = layer(x)
    y.backward(grad)
    y_compiled, _ = compiled(x)
    y_compiled.backward(grad)
    torch.testing.assert_close(y_compiled, y, rtol=2e-2, atol=2e-2)
    for p, p_compiled in zip(layer.parameters(), twin.parameters()):
        torch.testing.assert_close(p_compiled.grad, p.grad, rtol=5e-2, atol=5e-2)

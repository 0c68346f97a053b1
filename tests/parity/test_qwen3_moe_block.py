"""Our MoELayer against transformers' own Qwen3-MoE sparse block with the same weights (tiny sizes, CPU, fp32)."""

import pytest
import torch

qwen3_moe = pytest.importorskip("transformers.models.qwen3_moe.modeling_qwen3_moe")

from moe_lightning.models.hf import moe_layer_from_qwen3_moe_block  # noqa: E402


@pytest.mark.parametrize("norm_topk_prob", [True, False])
@pytest.mark.parametrize("implementation", ["grouped_mm", "loop"])
def test_matches_qwen3_moe_sparse_block_forward_and_backward(norm_topk_prob, implementation):
    config = qwen3_moe.Qwen3MoeConfig(
        hidden_size=32, moe_intermediate_size=48, num_experts=8, num_experts_per_tok=2, norm_topk_prob=norm_topk_prob
    )
    block = qwen3_moe.Qwen3MoeSparseMoeBlock(config)
    for param in block.parameters():
        torch.nn.init.normal_(param, std=0.1)
    layer = moe_layer_from_qwen3_moe_block(block, config)
    layer.experts.implementation = implementation

    x = torch.randn(2, 7, 32)
    grad = torch.randn(2, 7, 32)
    x_hf, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_hf = block(x_hf)
    y_ours, _ = layer(x_ours)
    torch.testing.assert_close(y_ours, y_hf, rtol=1e-5, atol=1e-6)

    (y_hf * grad).sum().backward()
    (y_ours * grad).sum().backward()
    torch.testing.assert_close(x_ours.grad, x_hf.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.router.gate.weight.grad, block.gate.weight.grad, rtol=1e-4, atol=1e-6)
    hf_down_grad = block.experts.down_proj.grad.transpose(1, 2)
    torch.testing.assert_close(layer.experts.w_down_EFD.grad, hf_down_grad, rtol=1e-5, atol=1e-6)

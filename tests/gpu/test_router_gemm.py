"""The half-input router GEMM against the fp32 reference and float64, forward and backward."""

import pytest
import torch

from moe_lightning.kernels.router_gemm import router_logits, router_logits_reference

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens, dim, experts", [(1, 8, 2), (4096, 2048, 64), (333, 1000, 7)])
def test_half_input_router_logits(tokens, dim, experts, dtype):
    x = torch.randn(tokens, dim, device="cuda", dtype=dtype, requires_grad=True)
    weight = (torch.randn(experts, dim, device="cuda") / dim**0.5).to(dtype).requires_grad_()
    grad = torch.randn(tokens, experts, device="cuda")
    logits = router_logits(x, weight)
    logits.backward(grad)
    assert logits.dtype == torch.float32 and x.grad.dtype == dtype and weight.grad.dtype == dtype
    # The same fp32-accumulated products as the reference, up to summation order.
    reference = router_logits_reference(x.detach(), weight.detach())
    assert (logits.detach() - reference).abs().max() <= 1e-5 * reference.abs().max()

    x64, w64 = x.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    (x64 @ w64.t()).backward(grad.double())
    for got, want in ((x.grad, x64.grad), (weight.grad, w64.grad)):
        assert (got.double() - want).norm() / want.norm() < 1e-2


def test_fp32_weight_under_autocast_takes_the_fp32_path():
    x = torch.randn(16, 32, device="cuda")
    weight = torch.randn(4, 32, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = router_logits(x, weight)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, x.double().mm(weight.double().t()).float(), rtol=1e-5, atol=1e-5)

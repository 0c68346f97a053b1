"""The fused RMSNorm kernels against float64 torch on fresh random inputs, forward and backward."""

import pytest
import torch
from torch import nn

from moe_lightning.kernels import HAS_TRITON
from moe_lightning.kernels.rms_norm import MAX_FUSED_DIM, RMSNorm

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_TRITON, reason="needs triton")]


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("shape", [(1, 2), (4, 2048, 2048), (3, 7, 1000), (2, 5000)])
def test_fused_rms_norm_matches_float64(shape, dtype, tol):
    norm = RMSNorm(shape[-1], eps=1e-5).cuda().to(dtype)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3)
    x = torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True)
    grad = torch.randn(shape, device="cuda", dtype=dtype)
    out = norm(x)
    out.backward(grad)

    x64 = x.detach().double().requires_grad_()
    weight64 = norm.weight.detach().double().requires_grad_()
    want = x64 * torch.rsqrt(x64.square().mean(-1, keepdim=True) + 1e-5) * weight64
    want.backward(grad.double())
    assert out.dtype == x.grad.dtype == norm.weight.grad.dtype == dtype
    for got, ref in ((out.detach(), want.detach()), (x.grad, x64.grad), (norm.weight.grad, weight64.grad)):
        assert (got.double() - ref).norm() / ref.norm() < tol


def test_same_state_dict_as_torch_and_torch_path_elsewhere():
    ours, torchs = RMSNorm(64, eps=1e-6).cuda(), nn.RMSNorm(64, eps=1e-6).cuda()
    assert ours.state_dict().keys() == torchs.state_dict().keys()
    x = torch.randn(8, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):  # autocast decides dtypes: torch's path
        assert ours(x).dtype == torchs(x).dtype
    wide = torch.randn(2, MAX_FUSED_DIM + 1, device="cuda")
    torch.testing.assert_close(RMSNorm(MAX_FUSED_DIM + 1).cuda()(wide), nn.RMSNorm(MAX_FUSED_DIM + 1).cuda()(wide))

"""The fused SwiGLU kernel against the torch reference on fresh random inputs, forward and backward."""

import pytest
import torch

from moe_lightning.kernels import HAS_TRITON
from moe_lightning.kernels.swiglu import swiglu, swiglu_reference

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("shape", [(1, 1), (1000, 1408), (3, 5, 7001)])
def test_fused_swiglu_matches_reference(shape, dtype, tol):
    h = torch.randn(*shape[:-1], 2 * shape[-1], device="cuda", dtype=dtype, requires_grad=True)
    grad = torch.randn(shape, device="cuda", dtype=dtype)
    out = swiglu(h)
    out.backward(grad)
    fused = (out.detach(), h.grad)

    h64 = h.detach().double().requires_grad_()
    ref = swiglu_reference(h64)
    ref.backward(grad.double())
    for got, want in zip(fused, (ref.detach(), h64.grad)):
        assert torch.isfinite(got).all()
        error = (got.double() - want).norm() / want.norm().clamp_min(1e-30)
        assert error < tol

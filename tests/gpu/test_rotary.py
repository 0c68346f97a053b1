"""The fused rotary-embedding kernels against complex multiplication in float64, forward and backward."""

import pytest
import torch

from moe_lightning.kernels import HAS_TRITON
from moe_lightning.kernels.rotary import apply_rotary

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_TRITON, reason="needs triton")]


def _tables(max_len, head_dim, dtype):
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    return angles, angles.cos().to(dtype).cuda(), angles.sin().to(dtype).cuda()


def _rotate_as_complex(x, angles, positions):
    """Rotate-half layout: the pairs (x[i], x[i + Dh/2]) are complex numbers turned by e^{i angle}."""
    half = x.shape[-1] // 2
    z = torch.complex(x[..., :half], x[..., half:])
    theta = angles.to(x.device)[positions]
    if positions.dim() == 2:
        theta = theta.unsqueeze(1)
    z = z * torch.polar(torch.ones_like(theta), theta)
    return torch.cat((z.real, z.imag), dim=-1)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("per_row_positions", [False, True])
@pytest.mark.parametrize("batch, heads, length, head_dim", [(1, 1, 1, 2), (2, 16, 300, 128), (3, 5, 7, 96)])
def test_fused_rotary_matches_complex_rotation(batch, heads, length, head_dim, per_row_positions, dtype, tol):
    max_len = 512
    angles, cos, sin = _tables(max_len, head_dim, torch.float32)
    # As the attention produces them: a transposed view of a [B, L, H, Dh] projection.
    x = torch.randn(batch, length, heads, head_dim, device="cuda", dtype=dtype).transpose(1, 2).requires_grad_()
    shape = (batch, length) if per_row_positions else (length,)
    positions = torch.randint(0, max_len, shape, device="cuda")
    grad = torch.randn(batch, heads, length, head_dim, device="cuda", dtype=dtype)
    out = apply_rotary(x, cos, sin, positions)
    out.backward(grad)

    x64 = x.detach().double().requires_grad_()
    want = _rotate_as_complex(x64, angles, positions)
    want.backward(grad.double())
    assert out.dtype == dtype and x.grad.dtype == dtype
    for got, ref in ((out.detach(), want.detach()), (x.grad, x64.grad)):
        assert (got.double() - ref).norm() / ref.norm() < tol


def test_position_past_the_tables_gives_nan():
    _, cos, sin = _tables(8, 4, torch.float32)
    x = torch.randn(1, 1, 2, 4, device="cuda")
    out = apply_rotary(x, cos, sin, torch.tensor([3, 8], device="cuda"))
    assert out[0, 0, 0].isfinite().all() and out[0, 0, 1].isnan().all()

"""The fused cross-entropy kernels against float64 torch on fresh random inputs, forward and backward."""

import pytest
import torch
import torch.nn.functional as F

from moe_lightning.kernels import HAS_TRITON
from moe_lightning.kernels.cross_entropy import cross_entropy

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_TRITON, reason="needs triton")]


def _float64_loss_and_grad(logits, labels, grad_loss):
    logits64 = logits.detach().double().requires_grad_()
    loss = F.cross_entropy(logits64, labels)
    loss.backward(grad_loss.double())
    return loss.detach(), logits64.grad


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("rows, vocab", [(1, 1), (300, 32000), (17, 5003)])
def test_fused_cross_entropy_matches_float64(rows, vocab, dtype, tol):
    logits = (4 * torch.randn(rows, vocab, device="cuda")).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (rows,), device="cuda")
    if rows > 1:
        labels[::3] = -100
    grad_loss = torch.rand((), device="cuda") + 0.5
    loss = cross_entropy(logits, labels)
    loss.backward(grad_loss)
    want_loss, want_grad = _float64_loss_and_grad(logits, labels, grad_loss)
    assert loss.dtype == torch.float32 and logits.grad.dtype == dtype
    assert abs(loss.double() - want_loss) <= 1e-5 * want_loss.abs().clamp_min(1)
    error = (logits.grad.double() - want_grad).norm() / want_grad.norm().clamp_min(1e-30)
    assert error < tol


def test_strided_rows_and_untouched_logits():
    wide = torch.randn(64, 1200, device="cuda", dtype=torch.bfloat16)
    logits = wide[:, :1000].requires_grad_()  # rows 1200 apart in memory
    before = logits.detach().clone()
    labels = torch.randint(0, 1000, (64,), device="cuda")
    loss = cross_entropy(logits, labels)
    loss.backward()
    assert torch.equal(logits.detach(), before)  # the gradient did not overwrite the logits
    want_loss, want_grad = _float64_loss_and_grad(logits, labels, torch.ones((), device="cuda"))
    assert abs(loss.double() - want_loss) < 1e-5 * want_loss
    assert (logits.grad.double() - want_grad).abs().max() < 1e-2 * want_grad.abs().max()


def test_every_row_ignored_gives_nan_as_torch_does():
    logits = torch.randn(4, 10, device="cuda", requires_grad=True)
    labels = torch.full((4,), -100, device="cuda")
    assert cross_entropy(logits, labels).isnan() and F.cross_entropy(logits, labels).isnan()


def test_label_outside_the_vocabulary_gives_nan():
    logits = torch.randn(4, 10, device="cuda")
    labels = torch.tensor([1, 2, 10, 3], device="cuda")
    assert cross_entropy(logits, labels).isnan()

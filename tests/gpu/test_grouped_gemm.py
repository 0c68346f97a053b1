"""The Triton grouped GEMM against a float64 loop over groups, forward and backward, on fresh random splits."""

import pytest
import torch

from moe_lightning.experts import GroupedExperts
from moe_lightning.kernels import HAS_TRITON
from moe_lightning.kernels.grouped_gemm import grouped_gemm

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_TRITON, reason="needs triton")]


def loop_reference(x_MK, w_GKN, counts):
    outputs, start = [], 0
    for g, count in enumerate(counts):
        outputs.append(x_MK[start : start + count] @ w_GKN[g])
        start += count
    return torch.cat(outputs)


def relative_error(got, want):
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize(
    "counts, k, n",
    [
        ([300, 0, 5, 129, 1], 192, 136),  # empty and one-row groups, N off the tile sizes
        ([0, 0, 7], 64, 64),
        ([1000] * 3 + [17], 1024, 2816),
        (None, 2048, 1408),  # 64 groups drawn from a random routing
    ],
)
def test_grouped_gemm_matches_a_float64_loop(counts, k, n):
    if counts is None:
        counts = torch.bincount(torch.randint(0, 64, (6000,)), minlength=64).tolist()
    rows = sum(counts)
    spare = 5  # rows past the last group stay out of every result
    x = torch.randn(rows + spare, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(len(counts), k, n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(rows + spare, n, device="cuda", dtype=torch.bfloat16)
    out = grouped_gemm(x, w, torch.tensor(counts, device="cuda").cumsum(0))
    out.backward(grad)

    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    ref = loop_reference(x64[:rows], w64, counts)
    ref.backward(grad[:rows].double())
    assert relative_error(out[:rows].detach(), ref.detach()) < 1e-2
    assert relative_error(x.grad[:rows], x64.grad[:rows]) < 1e-2
    assert relative_error(w.grad, w64.grad) < 1e-2
    assert (x.grad[rows:] == 0).all()
    empty = [g for g, count in enumerate(counts) if count == 0]
    assert (w.grad[empty] == 0).all()


def test_experts_triton_implementation_matches_the_loop():
    experts = GroupedExperts(16, 256, 384, implementation="triton").cuda().bfloat16()
    counts = torch.bincount(torch.randint(0, 16, (3000,)), minlength=16).cuda()
    x = torch.randn(3000, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(3000, 256, device="cuda", dtype=torch.bfloat16)
    results = []
    for implementation in ("triton", "loop"):
        experts.implementation = implementation
        out = experts(x, counts)
        out.backward(grad)
        results.append((out.detach(), x.grad, experts.w_in_EDH.grad, experts.w_down_EFD.grad))
        x.grad = None
        experts.zero_grad(set_to_none=True)
    for got, want in zip(*results):
        assert relative_error(got, want.double()) < 2e-2


def test_triton_implementation_names_the_operands_it_cannot_take():
    experts = GroupedExperts(4, 64, 96, implementation="triton").cuda()
    with pytest.raises(ValueError, match="float32"):
        experts(torch.randn(10, 64, device="cuda"), torch.tensor([4, 3, 2, 1], device="cuda"))

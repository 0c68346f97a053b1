"""The Triton grouped GEMM against a float64 loop over groups, forward and backward, on random splits."""

import pytest
import torch

from moe_lightning.experts import GroupedExperts
from moe_lightning.inference.offload.cached_experts import CachedExperts
from moe_lightning.kernels import HAS_TRITON

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_TRITON, reason="needs triton")]

if HAS_TRITON:
    from moe_lightning.kernels import grouped_gemm as kernels


def loop_reference(x_MK, w_GKN, counts):
    outputs, start = [], 0
    for g, count in enumerate(counts):
        outputs.append(x_MK[start : start + count] @ w_GKN[g])
        start += count
    return torch.cat(outputs)


def relative_error(got, want):
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()


def poison_free_memory():
    # Outputs come from new_empty: let them reuse NaN-filled blocks, so a missing write cannot pass as zeros.
    torch.full((1 << 28,), float("nan"), device="cuda", dtype=torch.bfloat16)


def check_against_loop(counts, k, n, spare):
    """``spare`` rows past the last group must come out zero, in the output and in the input gradient."""
    rows = sum(counts)
    x = torch.randn(rows + spare, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(len(counts), k, n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(rows + spare, n, device="cuda", dtype=torch.bfloat16)
    assert kernels.grouped_gemm_supported(x, w)  # the kernels run, not torch's fallback
    poison_free_memory()
    out = kernels.grouped_gemm(x, w, torch.tensor(counts, device="cuda").cumsum(0))
    poison_free_memory()
    out.backward(grad)

    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    ref = loop_reference(x64[:rows], w64, counts)
    ref.backward(grad[:rows].double())
    start = 0
    for g, count in enumerate(counts):  # group by group, so one wrong group cannot hide in a global norm
        group = slice(start, start + count)
        if count:
            assert relative_error(out[group].detach(), ref[group].detach()) < 1e-2, f"output of group {g}"
            assert relative_error(x.grad[group], x64.grad[group]) < 1e-2, f"input gradient of group {g}"
            assert relative_error(w.grad[g], w64.grad[g]) < 1e-2, f"weight gradient of group {g}"
        else:
            assert (w.grad[g] == 0).all(), f"weight gradient of empty group {g}"
        start += count
    assert (out[rows:] == 0).all() and (x.grad[rows:] == 0).all()


@pytest.mark.parametrize(
    "counts, k, n, spare",
    [
        ([300, 0, 5, 129, 1], 192, 136, 5),  # empty and one-row groups, N off the tile sizes
        ([0, 0, 7], 64, 64, 600),  # a tail of several tiles
        ([0, 0, 0], 128, 64, 200),  # every group empty
        ([777], 256, 200, 0),  # one group
        ([1000] * 3 + [17], 1024, 2816, 0),
        (None, 2048, 1408, 0),  # 64 groups from a random routing
    ],
)
def test_grouped_gemm_matches_a_float64_loop(counts, k, n, spare):
    if counts is None:
        counts = torch.bincount(torch.randint(0, 64, (6000,)), minlength=64).tolist()
    check_against_loop(counts, k, n, spare)


def pinned_configs():
    if not HAS_TRITON:
        return []
    return [(kernel, index) for kernel in ("_grouped_rows_kernel", "_grouped_weight_grad_kernel")
            for index in range(len(getattr(kernels, kernel).configs))]


@pytest.mark.parametrize("kernel_name, index", pinned_configs())
def test_every_autotuner_config_matches_the_loop(kernel_name, index):
    # The autotuner picks per card and shape; each config it may pick must be right, not only today's winner.
    kernel = getattr(kernels, kernel_name)
    configs, cache = kernel.configs, dict(kernel.cache)
    kernel.configs, kernel.cache = [configs[index]], {}
    try:
        check_against_loop([300, 0, 129, 1, 520], 256, 264, 130)
    finally:
        kernel.configs, kernel.cache = configs, cache


def test_no_rows():
    x = torch.randn(0, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(3, 64, 32, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = kernels.grouped_gemm(x, w, torch.zeros(3, device="cuda", dtype=torch.int32))
    out.sum().backward()
    assert out.shape == (0, 32) and x.grad.shape == (0, 64)
    assert (w.grad == 0).all()


def test_experts_and_cached_experts_on_triton_match_the_loop():
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
    experts.implementation = "triton"
    cached = CachedExperts.from_grouped(experts, capacity=16)
    with torch.no_grad():
        assert relative_error(cached(x, counts), results[1][0].double()) < 2e-2


def test_triton_experts_refuse_a_hidden_dim_off_the_tiles():
    experts = GroupedExperts(4, 64, 96, implementation="triton").cuda().bfloat16()
    x = torch.randn(10, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"w_down torch.bfloat16 \(4, 96, 64\)"):
        experts(x, torch.tensor([4, 3, 2, 1], device="cuda"))

"""The Triton un-permutation kernels against their torch references on fresh random inputs."""

import pytest
import torch

from moe_lightning.kernels import HAS_TRITON
from moe_lightning.kernels.unpermute import (
    weighted_gather_sum,
    weighted_gather_sum_backward,
    weighted_gather_sum_backward_reference,
    weighted_gather_sum_reference,
)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_TRITON, reason="needs triton")]


def relative_error(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def random_case(tokens, k, dim, dtype):
    x_ND = torch.randn(tokens * k, dim, device="cuda", dtype=dtype)
    inverse_N = torch.randperm(tokens * k, device="cuda")
    weight_TK = torch.rand(tokens, k, device="cuda")
    return x_ND, inverse_N, weight_TK


@pytest.mark.parametrize("tokens, k, dim", [(1, 1, 8), (37, 2, 1000), (513, 6, 2048), (64, 8, 4096)])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_gather_sum_and_its_backward_match_the_references(tokens, k, dim, dtype, tol):
    x_ND, inverse_N, weight_TK = random_case(tokens, k, dim, dtype)
    for weight in (weight_TK, None):
        got = weighted_gather_sum(x_ND, inverse_N, weight, k)
        want = weighted_gather_sum_reference(x_ND.double(), inverse_N, None if weight is None else weight.double(), k)
        assert relative_error(got, want) < tol

    grad_TD = torch.randn(tokens, dim, device="cuda", dtype=dtype)
    grad_x, grad_w = weighted_gather_sum_backward(grad_TD, x_ND, inverse_N, weight_TK)
    want_x, want_w = weighted_gather_sum_backward_reference(grad_TD.double(), x_ND.double(), inverse_N, weight_TK.double())
    assert relative_error(grad_x, want_x) < tol
    assert relative_error(grad_w, want_w) < tol

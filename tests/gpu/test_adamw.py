"""TritonAdamW's CUDA step against torch's AdamW and against float64 arithmetic, on fresh random tensors."""

import pytest
import torch

from moe_lightning.kernels import HAS_TRITON
from moe_lightning.kernels.adamw import TritonAdamW

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_TRITON, reason="needs triton")]


def _params(dtype):
    shapes = [(64, 2048, 33), (1,), (4099,), (300, 7)]
    return [torch.randn(shape, device="cuda", dtype=dtype) for shape in shapes]


def _groups(params):
    # Two groups with their own learning rate and decay; the last parameter never gets a gradient.
    return [{"params": params[:2], "lr": 3e-3, "weight_decay": 0.1}, {"params": params[2:], "lr": 1e-2, "weight_decay": 0.0}]


def _run(optimizer_class, dtype, steps=5, **kwargs):
    torch.manual_seed(0)
    params = [p.requires_grad_() for p in _params(dtype)]
    optimizer = optimizer_class(_groups(params), betas=(0.9, 0.95), eps=1e-8, **kwargs)
    generator = torch.Generator(device="cuda").manual_seed(1)
    for _ in range(steps):
        for p in params[:-1]:
            p.grad = torch.randn(p.shape, device="cuda", dtype=dtype, generator=generator)
        optimizer.step()
    return params, optimizer


def test_fp32_steps_match_torch_fused_adamw():
    ours, ours_optimizer = _run(TritonAdamW, torch.float32)
    assert ours_optimizer._kernel_applies()
    theirs, theirs_optimizer = _run(torch.optim.AdamW, torch.float32, fused=True)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    # Moments near zero are differences of O(1) terms: a few fp32 roundings of those terms, not of the result.
    for p, q in zip(ours, theirs):
        for key in ("exp_avg", "exp_avg_sq"):
            if p in ours_optimizer.state:
                ours_state, their_state = ours_optimizer.state[p][key], theirs_optimizer.state[q][key]
                torch.testing.assert_close(ours_state, their_state, rtol=1e-5, atol=1e-6)
    assert ours[-1].grad is None and ours[-1] not in ours_optimizer.state


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_step_is_the_float64_update_rounded(dtype):
    lr, beta1, beta2, eps, decay = 1e-2, 0.9, 0.95, 1e-8, 0.1
    param = torch.randn(5000, device="cuda", dtype=dtype, requires_grad=True)
    optimizer = TritonAdamW([param], lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=decay)
    param.grad = torch.randn(5000, device="cuda", dtype=dtype)
    optimizer.step()  # the second step starts from non-zero moments
    state = optimizer.state[param]
    p0, m0, v0 = (t.detach().double() for t in (param, state["exp_avg"], state["exp_avg_sq"]))
    grad = torch.randn(5000, device="cuda", dtype=dtype)
    param.grad = grad
    optimizer.step()

    g = grad.double()
    m_want = beta1 * m0 + (1 - beta1) * g
    v_want = beta2 * v0 + (1 - beta2) * g * g
    denom = v_want.sqrt() / (1 - beta2**2) ** 0.5 + eps
    p_want = p0 * (1 - lr * decay) - lr / (1 - beta1**2) * m_want / denom
    ulp = torch.finfo(dtype).eps
    for got, want in ((param.detach(), p_want), (state["exp_avg"], m_want), (state["exp_avg_sq"], v_want)):
        assert ((got.double() - want).abs() <= ulp * want.abs() + 1e-6).all()


def test_checkpoints_interchange_with_torch_adamw():
    ours, ours_optimizer = _run(TritonAdamW, torch.bfloat16, steps=2)
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    torch_optimizer = torch.optim.AdamW(_groups(theirs), betas=(0.9, 0.95), eps=1e-8)
    torch_optimizer.load_state_dict(ours_optimizer.state_dict())
    back = TritonAdamW(_groups([p.detach().clone().requires_grad_() for p in ours]), betas=(0.9, 0.95), eps=1e-8)
    back.load_state_dict(torch_optimizer.state_dict())
    assert back.state_dict()["state"].keys() == ours_optimizer.state_dict()["state"].keys()
    for index, state in ours_optimizer.state_dict()["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(back.state_dict()["state"][index][key], value)

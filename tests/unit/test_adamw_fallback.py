"""Where its kernel does not run (here: CPU tensors), TritonAdamW is torch's AdamW, step for step."""

import torch

from moe_lightning.kernels.adamw import TritonAdamW


def test_cpu_steps_are_torch_adamw():
    torch.manual_seed(0)
    ours = [torch.randn(7, 3, requires_grad=True), torch.randn(5, requires_grad=True)]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    ours_optimizer = TritonAdamW(ours, lr=1e-2, weight_decay=0.1)
    torch_optimizer = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        for p, q in zip(ours, theirs):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        ours_optimizer.step()
        torch_optimizer.step()
    assert not ours_optimizer._kernel_applies()
    for p, q in zip(ours, theirs):
        assert torch.equal(p, q)


def test_a_closure_runs_once_and_its_loss_is_returned():
    param = torch.randn(3, requires_grad=True)
    optimizer = TritonAdamW([param], lr=1e-2)
    calls = []

    def closure():
        calls.append(1)
        loss = (param**2).sum()
        loss.backward()
        return loss

    expected = float((param.detach() ** 2).sum())
    assert float(optimizer.step(closure)) == expected and len(calls) == 1

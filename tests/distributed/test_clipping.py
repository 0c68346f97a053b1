"""Gradient-norm clipping over expert-parallel ranks equals clipping the one-process model's gradients."""

import torch
import torch.distributed as dist
from torch import nn

from moe_lightning.strategies.clipping import clip_grad_norm_over_experts
from tests.distributed.launch import run_workers

MAX_NORM = 1.0


def _gradients():
    """One process's model: a dense parameter and an expert weight of 4 experts, with gradients far above MAX_NORM."""
    generator = torch.Generator().manual_seed(0)
    dense = nn.Parameter(torch.zeros(3, 5))
    experts = nn.Parameter(torch.zeros(4, 2, 3))
    dense.grad = torch.randn(3, 5, generator=generator)
    experts.grad = 4 * torch.randn(4, 2, 3, generator=generator)  # the experts dominate the norm
    return dense, experts


def _clip_on_rank(rank, world_size, tmp):
    dist.init_process_group("gloo")
    dense, experts = _gradients()
    share = experts.shape[0] // world_size
    local = nn.Parameter(experts.detach()[rank * share : (rank + 1) * share].clone())
    local.grad = experts.grad[rank * share : (rank + 1) * share].clone()
    norm = clip_grad_norm_over_experts([dense], [local], dist.group.WORLD, MAX_NORM)
    torch.save({"norm": norm, "dense": dense.grad, "experts": local.grad}, f"{tmp}/rank{rank}.pt")
    dist.destroy_process_group()


def test_each_rank_clips_by_the_whole_models_norm(tmp_path):
    dense, experts = _gradients()
    expected_norm = torch.nn.utils.clip_grad_norm_([dense, experts], MAX_NORM)
    local_norm = torch.cat([dense.grad.flatten(), experts.grad[:2].flatten()]).norm()
    assert expected_norm > 1.2 * local_norm  # a rank's own norm would clip its dense gradients differently
    run_workers(_clip_on_rank, 2, str(tmp_path))
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(got["norm"], expected_norm)
        torch.testing.assert_close(got["dense"], dense.grad)
        torch.testing.assert_close(got["experts"], experts.grad[2 * rank : 2 * rank + 2])

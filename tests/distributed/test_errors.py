"""Layout mistakes raise ValueError naming the values, before any training step."""

import pytest
import torch.distributed as dist

from moe_lightning import GroupedExperts, MoELayer
from moe_lightning.dispatch import AllToAllDispatcher
from moe_lightning.routing import TopKRouter
from moe_lightning.strategies import ExpertParallelStrategy
from moe_lightning.strategies.expert_parallel import resolve_parallel_sizes
from moe_lightning.strategies.sharding import check_same_layout
from tests.distributed.launch import run_workers


@pytest.mark.parametrize(
    ("ep", "dp", "world", "message"),
    [
        (4, "auto", 6, "world_size=6 and expert_parallel_size=4"),
        (2, 2, 6, "data_parallel_size=2, expert_parallel_size=2 and world_size=6"),
    ],
)
def test_sizes_that_do_not_tile_the_world_are_refused(ep, dp, world, message):
    with pytest.raises(ValueError, match=message):
        resolve_parallel_sizes(ep, dp, world)


def test_sizes_resolve():
    assert resolve_parallel_sizes("auto", "auto", 4) == (1, 4)
    assert resolve_parallel_sizes(2, "auto", 4) == (2, 2)
    assert resolve_parallel_sizes("auto", 2, 4) == (2, 2)


def test_bad_size_argument_is_refused():
    with pytest.raises(ValueError, match="expert_parallel_size=0"):
        ExpertParallelStrategy(expert_parallel_size=0)


def _worker(rank, world_size):
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        with pytest.raises(ValueError, match="num_experts=3 and expert_parallel_size=2"):
            AllToAllDispatcher(dist.group.WORLD, num_experts=3)
        experts = 4 + 4 * rank  # rank 1 builds a different model
        layer = MoELayer(TopKRouter(8, experts), GroupedExperts(experts, 8, 8))
        with pytest.raises(ValueError, match=r"rank 0 has \[\('', 'TopKRouter', 4, 4\)\], rank 1 has \[\('', 'TopKRouter', 8, 8\)\]"):
            check_same_layout(layer)
    finally:
        dist.destroy_process_group()


def test_experts_not_divisible_and_layouts_differing_across_ranks_are_refused():
    run_workers(_worker, 2)

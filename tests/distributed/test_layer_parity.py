"""An MoELayer sharded over 2 and 4 gloo processes matches the one-process run: outputs, losses, gradients, steps."""

import pytest
import torch

from tests.distributed.launch import run_workers
from tests.distributed.layer_cases import ROUTERS, build_layer, check_parity, global_batch, parity_worker


@pytest.fixture(scope="module", params=[(2, (2,)), (4, (4, 2))], ids=["world2", "world4"])
def distributed_run(request, tmp_path_factory):
    world_size, ep_sizes = request.param
    out_dir = tmp_path_factory.mktemp(f"layer{world_size}")
    run_workers(parity_worker, world_size, ep_sizes, str(out_dir), "gloo")
    return world_size, ep_sizes, [torch.load(out_dir / f"rank{r}.pt") for r in range(world_size)]


@pytest.mark.parametrize("case", list(ROUTERS))
def test_expert_parallel_layer_matches_one_process(distributed_run, case):
    world_size, ep_sizes, results = distributed_run
    check_parity(results, world_size, ep_sizes, case)


def test_uneven_load_reaches_an_idle_rank():
    """The cases above include a rank whose experts get no row at all (experts 0 and 1 are never chosen)."""
    layer = build_layer("topk_dropless")
    x, ids, _ = global_batch(4, 0)
    routing = layer.router(x.flatten(0, 2))
    assert routing.tokens_per_expert_E[:2].sum() == 0 and routing.tokens_per_expert_E[2:].sum() > 0

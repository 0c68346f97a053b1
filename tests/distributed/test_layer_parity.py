"""An MoELayer sharded over 2 and 4 gloo processes matches the one-process run: outputs, losses, gradients, steps."""

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from moe_lightning.strategies.replicas import GradientReducer
from moe_lightning.strategies.sharding import shard_experts
from tests.distributed.launch import run_workers
from tests.distributed.layer_cases import ROUTE_PER_TOKEN, ROUTERS, STEPS, build_layer, global_batch, optimizer, rank_loss

TOL = dict(rtol=1e-4, atol=1e-6)


def _worker(rank, world_size, ep_sizes, out_dir):
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    results = {}
    for ep in ep_sizes:
        mesh = init_device_mesh("cpu", (world_size // ep, ep), mesh_dim_names=("data_parallel", "expert_parallel"))
        for case in ROUTERS:
            layer = build_layer(case)
            names = shard_experts(layer, mesh["expert_parallel"].get_group())
            reducer = GradientReducer(layer, names, mesh["data_parallel"].get_group())
            opt = optimizer(layer)
            for step in range(STEPS):
                x, ids, target = global_batch(world_size, step)
                loss, y = rank_loss(layer, x[rank], ids[rank], target[rank])
                opt.zero_grad()
                loss.backward()
                reducer.reduce()
                if step == 0:
                    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
                    results[ep, case] = {"y": y.detach(), "loss": loss.detach(), "grads": grads}
                opt.step()
            results[ep, case]["params"] = {n: p.detach().clone() for n, p in layer.named_parameters()}
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def _reference(case, world_size):
    """One process, all experts. Per-token routers see the unsplit global batch; routers whose choice depends
    on the other tokens (capacity, expert choice) route each rank's chunk on its own, as the ranks do."""
    layer = build_layer(case)
    opt = optimizer(layer)
    for step in range(STEPS):
        x, ids, target = global_batch(world_size, step)
        if case in ROUTE_PER_TOKEN:
            loss, y = rank_loss(layer, x.flatten(0, 1), ids.flatten(0, 1), target.flatten(0, 1))
            y = y.unflatten(0, (world_size, -1))
        else:
            losses, ys = zip(*(rank_loss(layer, x[r], ids[r], target[r]) for r in range(world_size)))
            loss, y = torch.stack(losses).mean(), torch.stack(ys)
        opt.zero_grad()
        loss.backward()
        if step == 0:
            first = {"y": y.detach(), "loss": loss.detach(), "grads": {n: p.grad.clone() for n, p in layer.named_parameters()}}
        opt.step()
    return first, {n: p.detach().clone() for n, p in layer.named_parameters()}


def _full(per_rank, ep, name):
    """Expert tensors concatenated over the EP ranks of data-parallel replica 0 (ranks 0..ep-1); dense: rank 0's."""
    if "experts." not in name:
        return per_rank[0][name]
    return torch.cat([per_rank[r][name] for r in range(ep)])


@pytest.fixture(scope="module", params=[(2, (2,)), (4, (4, 2))], ids=["world2", "world4"])
def distributed_run(request, tmp_path_factory):
    world_size, ep_sizes = request.param
    out_dir = tmp_path_factory.mktemp(f"layer{world_size}")
    run_workers(_worker, world_size, ep_sizes, str(out_dir))
    return world_size, ep_sizes, [torch.load(out_dir / f"rank{r}.pt") for r in range(world_size)]


@pytest.mark.parametrize("case", list(ROUTERS))
def test_expert_parallel_layer_matches_one_process(distributed_run, case):
    world_size, ep_sizes, results = distributed_run
    first, final_params = _reference(case, world_size)
    for ep in ep_sizes:
        runs = [results[r][ep, case] for r in range(world_size)]
        for rank, run in enumerate(runs):
            torch.testing.assert_close(run["y"], first["y"][rank], **TOL)
        torch.testing.assert_close(torch.stack([run["loss"] for run in runs]).mean(), first["loss"], **TOL)
        for name, grad in first["grads"].items():
            torch.testing.assert_close(_full([run["grads"] for run in runs], ep, name), grad, **TOL, msg=f"{ep=} {name}")
        for name, param in final_params.items():
            torch.testing.assert_close(_full([run["params"] for run in runs], ep, name), param, **TOL, msg=f"{ep=} {name}")
        # Data-parallel replicas of the same experts (EP=2 on 4 ranks) end identical too.
        for rank in range(ep, world_size):
            for name, param in runs[rank]["params"].items():
                torch.testing.assert_close(param, runs[rank % ep]["params"][name], rtol=0, atol=0)


def test_uneven_load_reaches_an_idle_rank():
    """The cases above include a rank whose experts get no row at all (experts 0 and 1 are never chosen)."""
    layer = build_layer("topk_dropless")
    x, ids, _ = global_batch(4, 0)
    routing = layer.router(x.flatten(0, 2))
    assert routing.tokens_per_expert_E[:2].sum() == 0 and routing.tokens_per_expert_E[2:].sum() > 0

"""SoftMoELayer with its experts split over 2 gloo ranks (the all-to-all dispatcher moves slot rows) equals one
process running each rank's batch: outputs, loss and reduced gradients."""

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from moe_lightning.experts import GroupedExperts
from moe_lightning.routing.soft import SoftMoERouter
from moe_lightning.soft_layer import SoftMoELayer
from moe_lightning.strategies.replicas import GradientReducer
from moe_lightning.strategies.sharding import shard_experts
from tests.distributed.launch import run_workers

WORLD, DIM, EXPERTS, SLOTS, HIDDEN, BATCH, LENGTH = 2, 16, 4, 2, 24, 3, 5
TOL = dict(rtol=1e-4, atol=1e-6)


def build_layer() -> SoftMoELayer:
    torch.manual_seed(1)
    return SoftMoELayer(SoftMoERouter(DIM, EXPERTS, slots_per_expert=SLOTS), GroupedExperts(EXPERTS, DIM, HIDDEN))


def rank_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10 + rank)
    return torch.randn(BATCH, LENGTH, DIM, generator=g), torch.randn(BATCH, LENGTH, DIM, generator=g)


def rank_loss(layer: SoftMoELayer, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    x_BLD, target_BLD = rank_batch(rank)
    y_BLD, _ = layer(x_BLD)
    return (y_BLD - target_BLD).pow(2).mean(), y_BLD


def worker(rank: int, world_size: int, out_dir: str) -> None:
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    mesh = init_device_mesh("cpu", (1, world_size), mesh_dim_names=("data_parallel", "expert_parallel"))
    layer = build_layer()
    names = shard_experts(layer, mesh["expert_parallel"].get_group())
    loss, y_BLD = rank_loss(layer, rank)
    loss.backward()
    GradientReducer(layer, names, mesh["data_parallel"].get_group()).reduce()
    grads = {name: p.grad for name, p in layer.named_parameters()}
    torch.save({"y": y_BLD.detach(), "loss": loss.detach(), "grads": grads}, f"{out_dir}/rank{rank}.pt")


def test_expert_parallel_soft_layer_matches_one_process(tmp_path):
    run_workers(worker, WORLD, str(tmp_path))
    runs = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]

    layer = build_layer()
    losses, ys = zip(*(rank_loss(layer, rank) for rank in range(WORLD)))
    torch.stack(losses).mean().backward()
    for rank, run in enumerate(runs):
        torch.testing.assert_close(run["y"], ys[rank], **TOL)
        torch.testing.assert_close(run["loss"], losses[rank].detach(), **TOL)
    for name, param in layer.named_parameters():
        # Rank r holds experts [r * E / W, (r + 1) * E / W); the router is whole on every rank.
        got = torch.cat([run["grads"][name] for run in runs]) if "experts." in name else runs[0]["grads"][name]
        torch.testing.assert_close(got, param.grad, **TOL, msg=lambda m: f"grad {name}: {m}")

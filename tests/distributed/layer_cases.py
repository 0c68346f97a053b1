"""MoE layers and per-rank data shared by the spawned workers and the one-process reference, and the parity run.

Everything here is deterministic in the seed, so every process builds the same full layer and batch. The
parity run (``parity_worker``, ``reference``, ``check_parity``) takes a backend: gloo on CPUs
(tests/distributed) and NCCL with one GPU per process (tests/gpu).
Shape legend: W ranks, B sequences per rank, L length, D model dim, E experts.
"""

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from moe_lightning import GroupedExperts, MoELayer
from moe_lightning.routing import ExpertChoiceRouter, HashRouter, TopKRouter
from moe_lightning.strategies.replicas import GradientReducer
from moe_lightning.strategies.sharding import shard_experts

DIM, NUM_EXPERTS, HIDDEN, BATCH, LENGTH, STEPS = 16, 8, 24, 2, 5, 3

ROUTERS = {
    "topk_dropless": lambda: TopKRouter(DIM, NUM_EXPERTS, num_experts_per_token=2, load_balance_coef=0.0),
    "topk_capacity": lambda: TopKRouter(
        DIM, NUM_EXPERTS, num_experts_per_token=2, capacity_factor=1.0, load_balance_coef=0.01, z_loss_coef=1e-3
    ),
    "expert_choice": lambda: ExpertChoiceRouter(DIM, NUM_EXPERTS, capacity_factor=1.5, z_loss_coef=1e-3),
    "hash": lambda: HashRouter(DIM, NUM_EXPERTS, num_experts_per_token=2),
}
ROUTE_PER_TOKEN = {"topk_dropless", "hash"}
"""Routers whose decision for a token ignores the other tokens: the unsplit global batch is the reference."""


def build_layer(case: str) -> MoELayer:
    torch.manual_seed(1)
    layer = MoELayer(ROUTERS[case](), GroupedExperts(NUM_EXPERTS, DIM, HIDDEN, init_std=0.2))
    if hasattr(layer.router, "gate"):
        # Uneven load: every token has feature 0 = 1 (see global_batch), which experts 0 and 1 strongly dislike,
        # so top-k never picks them and at EP=4 rank 0's experts receive no row at all.
        with torch.no_grad():
            layer.router.gate.weight[:2, 0] = -20.0
    return layer


def global_batch(world_size: int, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x_WBLD``, token ids ``[W, B, L]`` (rank 0 sees only ids 0-1, so hashing leaves experts idle there), target."""
    g = torch.Generator().manual_seed(100 + step)
    x_WBLD = torch.randn(world_size, BATCH, LENGTH, DIM, generator=g)
    x_WBLD[..., 0] = 1.0
    ids_WBL = torch.randint(0, 50, (world_size, BATCH, LENGTH), generator=g)
    ids_WBL[0] %= 2
    return x_WBLD, ids_WBL, torch.randn(world_size, BATCH, LENGTH, DIM, generator=g)


def rank_loss(layer: MoELayer, x_BLD, ids_BL, target_BLD):
    """One rank's loss: a mean over its own tokens plus its routers' aux losses."""
    y_BLD, routing = layer(x_BLD, token_ids=ids_BL)
    return (y_BLD - target_BLD).pow(2).mean() + sum(routing.aux_losses.values()), y_BLD


def optimizer(layer: MoELayer) -> torch.optim.Optimizer:
    return torch.optim.AdamW(layer.parameters(), lr=1e-2, weight_decay=0.1)


TOL = dict(rtol=1e-4, atol=1e-6)
# After AdamW steps: Adam divides by sqrt(v), so a near-zero gradient turns fp32 summation-order noise into ~1e-5
# weight differences (as in test_strategy_trainer); outputs, losses and gradients keep TOL.
STEP_TOL = dict(rtol=1e-4, atol=2e-5)


def parity_worker(rank, world_size, ep_sizes, out_dir, backend="gloo"):
    """One spawned rank: every EP size and router case for STEPS AdamW steps; saves (on the CPU) the first step's
    outputs, loss and reduced gradients and the final parameters to ``out_dir/rank{rank}.pt``."""
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    device_id = device if device.type == "cuda" else None  # NCCL: bind the communicator to this rank's GPU
    dist.init_process_group(backend, rank=rank, world_size=world_size, device_id=device_id)
    results = {}
    for ep in ep_sizes:
        dims = ("data_parallel", "expert_parallel")
        mesh = init_device_mesh(device.type, (world_size // ep, ep), mesh_dim_names=dims)
        for case in ROUTERS:
            layer = build_layer(case).to(device)
            names = shard_experts(layer, mesh["expert_parallel"].get_group())
            reducer = GradientReducer(layer, names, mesh["data_parallel"].get_group())
            opt = optimizer(layer)
            for step in range(STEPS):
                x, ids, target = (t[rank].to(device) for t in global_batch(world_size, step))
                loss, y = rank_loss(layer, x, ids, target)
                opt.zero_grad()
                loss.backward()
                reducer.reduce()
                if step == 0:
                    grads = {n: p.grad.cpu() for n, p in layer.named_parameters()}
                    results[ep, case] = {"y": y.detach().cpu(), "loss": loss.detach().cpu(), "grads": grads}
                opt.step()
            results[ep, case]["params"] = {n: p.detach().cpu() for n, p in layer.named_parameters()}
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def reference(case, world_size, device="cpu"):
    """One process, all experts, on ``device``; returns (first step's y, loss, grads) and the final params, on the CPU.

    Per-token routers see the unsplit global batch; routers whose choice depends on the other tokens (capacity,
    expert choice) route each rank's chunk on its own, as the ranks do."""
    layer = build_layer(case).to(device)
    opt = optimizer(layer)
    for step in range(STEPS):
        x, ids, target = (t.to(device) for t in global_batch(world_size, step))
        if case in ROUTE_PER_TOKEN:
            loss, y = rank_loss(layer, x.flatten(0, 1), ids.flatten(0, 1), target.flatten(0, 1))
            y = y.unflatten(0, (world_size, -1))
        else:
            losses, ys = zip(*(rank_loss(layer, x[r], ids[r], target[r]) for r in range(world_size)))
            loss, y = torch.stack(losses).mean(), torch.stack(ys)
        opt.zero_grad()
        loss.backward()
        if step == 0:
            grads = {n: p.grad.cpu() for n, p in layer.named_parameters()}
            first = {"y": y.detach().cpu(), "loss": loss.detach().cpu(), "grads": grads}
        opt.step()
    return first, {n: p.detach().cpu() for n, p in layer.named_parameters()}


def _full(per_rank, ep, name):
    """Expert tensors concatenated over the EP ranks of data-parallel replica 0 (ranks 0..ep-1); dense: rank 0's."""
    if "experts." not in name:
        return per_rank[0][name]
    return torch.cat([per_rank[r][name] for r in range(ep)])


def check_parity(results, world_size, ep_sizes, case, device="cpu"):
    """Assert that the saved per-rank ``results`` of ``parity_worker`` match ``reference(case)`` run on ``device``."""
    first, final_params = reference(case, world_size, device)
    for ep in ep_sizes:
        runs = [results[r][ep, case] for r in range(world_size)]
        for rank, run in enumerate(runs):
            torch.testing.assert_close(run["y"], first["y"][rank], **TOL)
        torch.testing.assert_close(torch.stack([run["loss"] for run in runs]).mean(), first["loss"], **TOL)
        for name, grad in first["grads"].items():
            got = _full([run["grads"] for run in runs], ep, name)
            torch.testing.assert_close(got, grad, **TOL, msg=lambda m: f"{ep=} grad {name}: {m}")
        for name, param in final_params.items():
            got = _full([run["params"] for run in runs], ep, name)
            torch.testing.assert_close(got, param, **STEP_TOL, msg=lambda m: f"{ep=} param {name}: {m}")
        # Data-parallel replicas of the same experts (EP=2 on 4 ranks) end identical too.
        for rank in range(ep, world_size):
            for name, param in runs[rank]["params"].items():
                torch.testing.assert_close(param, runs[rank % ep]["params"][name], rtol=0, atol=0)

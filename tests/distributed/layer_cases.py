"""MoE layers and per-rank data shared by the spawned workers and the one-process reference.

Everything here is deterministic in the seed, so every process builds the same full layer and batch.
Shape legend: W ranks, B sequences per rank, L length, D model dim, E experts.
"""

import torch

from moe_lightning import GroupedExperts, MoELayer
from moe_lightning.routing import ExpertChoiceRouter, HashRouter, TopKRouter

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

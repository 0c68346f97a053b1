"""Turn a replicated model into an expert-parallel one: each rank keeps its slice of every MoE layer's experts."""

from __future__ import annotations

import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from moe_lightning.dispatch.all_to_all import AllToAllDispatcher
from moe_lightning.experts.grouped import GroupedExperts
from moe_lightning.layer import MoELayer
from moe_lightning.strategies.replicas import broadcast_module_states


def moe_layers(module: nn.Module) -> list[tuple[str, MoELayer]]:
    return [(name, m) for name, m in module.named_modules() if isinstance(m, MoELayer)]


def layer_layout(module: nn.Module) -> list[tuple[str, str, int, int]]:
    """What must agree across ranks: per MoE layer its name, router class, router and expert counts."""
    return [
        (name, type(layer.router).__name__, layer.num_experts, getattr(layer.experts, "num_experts", -1))
        for name, layer in moe_layers(module)
    ]


def check_same_layout(module: nn.Module) -> None:
    """Raise ``ValueError`` naming the first rank whose MoE layers differ from rank 0's (a collective call)."""
    layouts: list = [None] * dist.get_world_size()
    dist.all_gather_object(layouts, layer_layout(module))
    for rank, layout in enumerate(layouts):
        if layout != layouts[0]:
            raise ValueError(
                f"MoE layers differ across ranks (name, router, router experts, experts): rank 0 has {layouts[0]}, "
                f"rank {rank} has {layout}"
            )


def holds_local_experts(module: nn.Module) -> bool:
    """Whether some MoE layer already holds fewer experts than it routes to (this rank's slice)."""
    return any(getattr(layer.experts, "num_experts", layer.num_experts) < layer.num_experts for _, layer in moe_layers(module))


def place_experts(module: nn.Module, mesh: DeviceMesh) -> list[str]:
    """Shard the experts over ``mesh["expert_parallel"]`` (:func:`shard_experts`) and make the replicas equal: dense
    tensors from global rank 0, each slice of experts from the first rank of its ``data_parallel`` group.

    A model materialised per rank (each rank already holds only its slice) broadcasts the slices; a whole model is
    broadcast whole first, so every rank slices the same experts. Returns the expert parameter names.
    """
    check_same_layout(module)
    if not holds_local_experts(module):
        broadcast_module_states(module)
        return shard_experts(module, mesh["expert_parallel"].get_group())
    names = shard_experts(module, mesh["expert_parallel"].get_group())
    broadcast_module_states(module, skip=set(names))
    broadcast_module_states(module, only=set(names), group=mesh["data_parallel"].get_group())
    return names


def shard_experts(module: nn.Module, ep_group: dist.ProcessGroup) -> list[str]:
    """Give this rank experts ``[p * E / P, (p + 1) * E / P)`` of every MoE layer and an all-to-all dispatcher.

    Routers stay whole (every rank routes its own tokens over all E experts). Layers whose experts already are
    this rank's slice (materialised per rank, see :func:`moe_lightning.models.materialize.materialize`) keep them.
    Returns the names of the sliced parameters, relative to ``module``.
    """
    names = []
    for layer_name, layer in moe_layers(module):
        if not isinstance(layer.experts, GroupedExperts):
            raise TypeError(
                f"expert parallelism needs GroupedExperts in every MoELayer, got {type(layer.experts).__name__} "
                f"in {layer_name!r}"
            )
        dispatcher = AllToAllDispatcher(ep_group, layer.num_experts)
        held = layer.experts.num_experts
        if held == layer.num_experts:
            start = dispatcher.ep_rank * dispatcher.num_local_experts
            layer.experts.keep_experts(start, start + dispatcher.num_local_experts)
        elif held != dispatcher.num_local_experts:
            raise ValueError(
                f"{layer_name!r} holds {held} experts: neither all {layer.num_experts} nor this rank's "
                f"{dispatcher.num_local_experts} of expert_parallel_size={dispatcher.ep_size}"
            )
        layer.dispatcher = dispatcher
        prefix = f"{layer_name}.experts." if layer_name else "experts."
        names += [prefix + name for name, _ in layer.experts.named_parameters(recurse=False)]
    return names

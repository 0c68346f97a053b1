"""Choose what a fine-tuning run trains: routers, the non-expert weights, and which routed experts of which layer.

Layers are counted as the model's :class:`MoELayer` s in depth order (the order of its routings, and of
``router/layer{l}`` in :class:`RouterStatsMonitor`), not as transformer blocks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn

from moe_lightning.experts.grouped import GroupedExperts
from moe_lightning.finetune.expert_rows import check_expert_indices, train_only_experts_of
from moe_lightning.layer import MoELayer
from moe_lightning.routing.base import Router
from moe_lightning.strategies.sharding import moe_layers as named_moe_layers

ExpertSelection = Mapping[int, Sequence[int]]
"""MoE layer index -> the expert indices to train there; layers left out train no expert."""


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """Every :class:`MoELayer` of ``model`` in depth order."""
    return [layer for _, layer in named_moe_layers(model)]


def freeze(module: nn.Module) -> None:
    """Stop gradients to every parameter of ``module``."""
    module.requires_grad_(False)


def freeze_routers(model: nn.Module) -> None:
    """Freeze every router: its parameters, and the aux-loss-free expert bias (its update rate set to 0), so that
    the routing decisions stay those of the base model."""
    for module in model.modules():
        if isinstance(module, Router):
            freeze(module)
            if getattr(module, "expert_bias_E", None) is not None:
                module.bias_update_rate = 0.0


def freeze_all_but_experts(model: nn.Module) -> None:
    """Freeze every parameter outside the routed experts (attention, norms, embeddings, head, shared experts, dense
    feed-forwards, and the routers as :func:`freeze_routers` does); the routed experts keep their ``requires_grad``."""
    experts = {id(p) for layer in moe_layers(model) for p in layer.experts.parameters()}
    for param in model.parameters():
        if id(param) not in experts:
            param.requires_grad_(False)
    freeze_routers(model)


def check_expert_selection(model: nn.Module, selection: ExpertSelection) -> list[MoELayer]:
    """The model's MoE layers, after checking that ``selection`` names existing layers and experts and that those
    layers hold :class:`GroupedExperts` (ValueError / TypeError naming the offending values)."""
    layers = moe_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no MoELayer whose experts could be selected")
    unknown = sorted(layer for layer in selection if not 0 <= layer < len(layers))
    if unknown:
        raise ValueError(f"MoE layers {unknown} do not exist: the model has {len(layers)} (0 to {len(layers) - 1})")
    for index, layer in enumerate(layers):
        if not isinstance(layer.experts, GroupedExperts):
            raise TypeError(f"MoE layer {index} holds {type(layer.experts).__name__}, not GroupedExperts")
        check_expert_indices(selection.get(index, ()), layer.experts.num_experts, f" of MoE layer {index}")
    return layers


def train_only_experts(model: nn.Module, selection: ExpertSelection) -> None:
    """Of the routed experts, train exactly those ``selection`` names (see :func:`train_only_experts_of`); other
    parameters are left as they are. Checks the whole selection before changing anything."""
    layers = check_expert_selection(model, selection)
    for index, layer in enumerate(layers):
        train_only_experts_of(layer.experts, list(selection.get(index, ())))

"""Routers: each turns tokens into the one :class:`Routing` contract."""

from moe_lightning.routing.attention import AttentionRouter
from moe_lightning.routing.balanced import SinkhornRouter
from moe_lightning.routing.base import Router, Routing
from moe_lightning.routing.expert_choice import ExpertChoiceRouter
from moe_lightning.routing.hash import HashRouter
from moe_lightning.routing.numerics import RouterNumerics, topk_indices
from moe_lightning.routing.topk import TopKRouter

__all__ = [
    "AttentionRouter", "ExpertChoiceRouter", "HashRouter", "Router", "RouterNumerics", "Routing", "SinkhornRouter",
    "TopKRouter", "topk_indices",
]

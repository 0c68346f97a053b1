"""Routers: each turns tokens into the one :class:`Routing` contract."""

from moe_lightning.routing.base import Router, Routing
from moe_lightning.routing.topk import TopKRouter

__all__ = ["Router", "Routing", "TopKRouter"]

"""moe_lightning: a Mixture-of-Experts lab on PyTorch Lightning."""

from moe_lightning.experts import FeedForward, GroupedExperts, SharedExperts
from moe_lightning.layer import MoELayer
from moe_lightning.module import MoELightningModule
from moe_lightning.routing import Router, Routing, TopKRouter
from moe_lightning.strategies import ExpertParallelStrategy

__version__ = "0.1.0"

__all__ = [
    "ExpertParallelStrategy", "FeedForward", "GroupedExperts", "MoELayer", "MoELightningModule", "Router", "Routing",
    "SharedExperts", "TopKRouter",
]

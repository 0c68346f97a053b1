"""moe_lightning: a Mixture-of-Experts lab on PyTorch Lightning.

The model layers (routing, experts, dispatch, layer, models) are plain PyTorch, so importing this package does not
import Lightning: the Lightning glue among the names below is loaded on first access (PEP 562).
"""

import importlib
from typing import TYPE_CHECKING

from moe_lightning.experts import FeedForward, GroupedExperts, SharedExperts
from moe_lightning.layer import MoELayer
from moe_lightning.routing import Router, RouterNumerics, Routing, TopKRouter

if TYPE_CHECKING:  # what the lazy names are, for type checkers and editors
    from moe_lightning.module import MoELightningModule
    from moe_lightning.strategies import ExpertParallelStrategy

__version__ = "0.1.0"

_LIGHTNING_NAMES = {
    "ExpertParallelStrategy": "moe_lightning.strategies",
    "MoELightningModule": "moe_lightning.module",
}
"""Public names that need Lightning, and the module each is loaded from when first asked for."""

__all__ = [
    "ExpertParallelStrategy", "FeedForward", "GroupedExperts", "MoELayer", "MoELightningModule", "Router",
    "RouterNumerics", "Routing", "SharedExperts", "TopKRouter",
]


def __getattr__(name: str):
    if name not in _LIGHTNING_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LIGHTNING_NAMES[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LIGHTNING_NAMES))

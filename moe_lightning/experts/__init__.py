"""Expert computations: grouped routed experts, shared experts and the dense feed-forward."""

from moe_lightning.experts.feedforward import FeedForward
from moe_lightning.experts.grouped import GroupedExperts
from moe_lightning.experts.shared import SharedExperts

__all__ = ["FeedForward", "GroupedExperts", "SharedExperts"]

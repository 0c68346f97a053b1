"""Expert offload: experts kept in host memory or on disk, with a per-layer device cache of a few of them."""

from moe_lightning.inference.offload.cache import CacheStats, ExpertCache
from moe_lightning.inference.offload.cached_experts import CachedExperts
from moe_lightning.inference.offload.offload import ExpertOffload, OffloadStats, hot_experts_from_stats, offload_experts
from moe_lightning.inference.offload.store import (
    DiskExpertStore,
    HostExpertStore,
    load_expert_stores,
    save_expert_stores,
)

__all__ = [
    "CacheStats", "CachedExperts", "DiskExpertStore", "ExpertCache", "ExpertOffload", "HostExpertStore",
    "OffloadStats", "hot_experts_from_stats", "load_expert_stores", "offload_experts", "save_expert_stores",
]

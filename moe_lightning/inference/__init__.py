"""Inference: KV-cache generation, checkpoint loading without pickle, the engine that serves a trained model."""

from moe_lightning.inference.cached_experts import CachedExperts
from moe_lightning.inference.compiled_decode import CompiledDecoder
from moe_lightning.inference.decoding import EagerDecoder
from moe_lightning.inference.engine import InferenceEngine
from moe_lightning.inference.expert_cache import CacheStats, ExpertCache
from moe_lightning.inference.expert_store import DiskExpertStore, HostExpertStore, load_expert_stores, save_expert_stores
from moe_lightning.inference.export import export_safetensors, load_safetensors
from moe_lightning.inference.generate import check_per_token_routing, generate, stream_generate
from moe_lightning.inference.lightning_checkpoint import load_lightning_checkpoint
from moe_lightning.inference.offload import ExpertOffload, OffloadStats, hot_experts_from_stats, offload_experts
from moe_lightning.inference.sampling import next_tokens

__all__ = [
    "CacheStats", "CachedExperts", "CompiledDecoder", "DiskExpertStore", "EagerDecoder", "ExpertCache", "ExpertOffload",
    "HostExpertStore", "InferenceEngine", "OffloadStats", "check_per_token_routing", "export_safetensors", "generate",
    "hot_experts_from_stats", "load_expert_stores", "load_lightning_checkpoint", "load_safetensors", "next_tokens",
    "offload_experts", "save_expert_stores", "stream_generate",
]

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
from moe_lightning.inference.quantization_config import QuantizationConfig
from moe_lightning.inference.quantize import expert_weight_bytes, quantize_model, weight_bytes
from moe_lightning.inference.quantized_experts import QuantizedExperts
from moe_lightning.inference.quantized_export import is_quantized_file, load_quantized, save_quantized
from moe_lightning.inference.quantized_linear import QuantizedLinear
from moe_lightning.inference.sampling import next_tokens

__all__ = [
    "CacheStats", "CachedExperts", "CompiledDecoder", "DiskExpertStore", "EagerDecoder", "ExpertCache", "ExpertOffload",
    "HostExpertStore", "InferenceEngine", "OffloadStats", "QuantizationConfig", "QuantizedExperts", "QuantizedLinear",
    "check_per_token_routing", "expert_weight_bytes", "export_safetensors", "generate", "hot_experts_from_stats",
    "is_quantized_file", "load_expert_stores", "load_lightning_checkpoint", "load_quantized", "load_safetensors",
    "next_tokens", "offload_experts", "quantize_model", "save_expert_stores", "save_quantized", "stream_generate",
    "weight_bytes",
]

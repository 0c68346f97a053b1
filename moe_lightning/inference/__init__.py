"""Inference: KV-cache generation, checkpoint loading without pickle, the engine that serves a trained model."""

from moe_lightning.inference.compiled_decode import CompiledDecoder
from moe_lightning.inference.decoding import EagerDecoder
from moe_lightning.inference.engine import InferenceEngine
from moe_lightning.inference.export import export_safetensors, load_safetensors
from moe_lightning.inference.generate import check_per_token_routing, generate, stream_generate
from moe_lightning.inference.lightning_checkpoint import load_lightning_checkpoint
from moe_lightning.inference.offload import (
    CachedExperts,
    CacheStats,
    DiskExpertStore,
    ExpertCache,
    ExpertOffload,
    HostExpertStore,
    OffloadStats,
    hot_experts_from_stats,
    load_expert_stores,
    offload_experts,
    save_expert_stores,
)
from moe_lightning.inference.quantization import (
    QuantizationConfig,
    QuantizedExperts,
    QuantizedLinear,
    expert_weight_bytes,
    is_quantized_file,
    load_quantized,
    quantize_model,
    save_quantized,
    weight_bytes,
)
from moe_lightning.inference.sampling import next_tokens

__all__ = [
    "CacheStats", "CachedExperts", "CompiledDecoder", "DiskExpertStore", "EagerDecoder", "ExpertCache", "ExpertOffload",
    "HostExpertStore", "InferenceEngine", "OffloadStats", "QuantizationConfig", "QuantizedExperts", "QuantizedLinear",
    "check_per_token_routing", "expert_weight_bytes", "export_safetensors", "generate", "hot_experts_from_stats",
    "is_quantized_file", "load_expert_stores", "load_lightning_checkpoint", "load_quantized", "load_safetensors",
    "next_tokens", "offload_experts", "quantize_model", "save_expert_stores", "save_quantized", "stream_generate",
    "weight_bytes",
]

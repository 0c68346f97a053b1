"""Inference: KV-cache generation, checkpoint loading without pickle, the engine that serves a trained model."""

from moe_lightning.inference.compiled_decode import CompiledDecoder
from moe_lightning.inference.decoding import EagerDecoder
from moe_lightning.inference.engine import InferenceEngine
from moe_lightning.inference.export import export_safetensors, load_safetensors
from moe_lightning.inference.generate import check_per_token_routing, generate, stream_generate
from moe_lightning.inference.lightning_checkpoint import load_lightning_checkpoint
from moe_lightning.inference.sampling import next_tokens

__all__ = [
    "CompiledDecoder", "EagerDecoder", "InferenceEngine", "check_per_token_routing", "export_safetensors", "generate", "load_lightning_checkpoint",
    "load_safetensors", "next_tokens", "stream_generate",
]

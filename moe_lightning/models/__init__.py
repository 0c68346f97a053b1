"""Plain-PyTorch MoE models."""

from moe_lightning.models.config import PRESETS, LayerOverride, MoETransformerConfig
from moe_lightning.models.kv_cache import KVCache
from moe_lightning.models.static_kv_cache import StaticKVCache
from moe_lightning.models.transformer import MoEModelOutput, MoETransformer, RouterFactory

__all__ = ["PRESETS", "KVCache", "LayerOverride", "MoEModelOutput", "MoETransformer", "MoETransformerConfig",
           "RouterFactory", "StaticKVCache"]

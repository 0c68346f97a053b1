"""Plain-PyTorch MoE models."""

from moe_lightning.models.config import PRESETS, MoETransformerConfig
from moe_lightning.models.transformer import MoEModelOutput, MoETransformer, RouterFactory

__all__ = ["PRESETS", "MoEModelOutput", "MoETransformer", "MoETransformerConfig", "RouterFactory"]

"""Conversion between transformers' MoE models and ours, one module per model family.

HF spellings (num_experts_per_tok, ...) live only in this package.
"""

from moe_lightning.models.hf.mixtral import mixtral_from_moe_transformer
from moe_lightning.models.hf.qwen3_moe import moe_layer_from_qwen3_moe_block

__all__ = ["mixtral_from_moe_transformer", "moe_layer_from_qwen3_moe_block"]

"""Import and export of transformers checkpoints, one module per model family.

HF spellings (num_experts_per_tok, ...) live only in this package. Importing it registers every family in
:data:`FAMILIES`.
"""

from moe_lightning.models.hf import (  # noqa: F401  (each registers its family)
    deepseek_v3, llama, mistral, mixtral, olmoe, qwen2, qwen2_moe, qwen3_moe,
)
from moe_lightning.models.hf.checkpoint import HFCheckpoint, load_hf_model
from moe_lightning.models.hf.export import export_hf, hf_model_from_moe_transformer
from moe_lightning.models.hf.family import FAMILIES, HFFamily
from moe_lightning.models.hf.mixtral import mixtral_from_moe_transformer
from moe_lightning.models.hf.qwen3_moe import moe_layer_from_qwen3_moe_block

__all__ = ["FAMILIES", "HFCheckpoint", "HFFamily", "export_hf", "hf_model_from_moe_transformer", "load_hf_model",
           "mixtral_from_moe_transformer", "moe_layer_from_qwen3_moe_block"]

"""Llama (``model_type="llama"``), and the dense-model config translation Mistral and Qwen2 share: every block a
dense SwiGLU MLP (``moe_layers=[]``), for upcycling or as a baseline."""

from __future__ import annotations

from typing import Any

from moe_lightning.models.config import MoETransformerConfig
from moe_lightning.models.hf.config_mapping import base_config, base_hf_config
from moe_lightning.models.hf.family import Architecture, HFFamily, register_family
from moe_lightning.models.hf.tensor_map import llama_tensor_map
from moe_lightning.models.transformer import MoETransformer


def dense_config(hf: Any, **fields: Any) -> tuple[MoETransformerConfig, None]:
    """Our config of a dense checkpoint (no router), plus ``fields``."""
    return MoETransformerConfig(**base_config(hf), moe_layers=[], dense_hidden_dim=hf.intermediate_size, **fields), None


def dense_hf_config(model: MoETransformer) -> dict[str, Any]:
    return dict(**base_hf_config(model), intermediate_size=model.config.ffn_hidden_dim)


def to_hf_config(model: MoETransformer) -> dict[str, Any]:
    return dict(**dense_hf_config(model), attention_bias=False, mlp_bias=False)


LLAMA = register_family(HFFamily(
    model_type="llama", architecture_class="LlamaForCausalLM", architecture=Architecture(moe_blocks="none"),
    to_config=dense_config, to_hf_config=to_hf_config, tensor_map=llama_tensor_map,
))

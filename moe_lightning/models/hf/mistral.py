"""Mistral (``model_type="mistral"``): Llama's architecture; a sliding window shorter than the context is refused."""

from __future__ import annotations

from typing import Any

from moe_lightning.models.hf.family import Architecture, HFFamily, register_family
from moe_lightning.models.hf.llama import dense_config, dense_hf_config
from moe_lightning.models.hf.tensor_map import llama_tensor_map
from moe_lightning.models.transformer import MoETransformer


def to_hf_config(model: MoETransformer) -> dict[str, Any]:
    return dict(**dense_hf_config(model), sliding_window=None)


MISTRAL = register_family(HFFamily(
    model_type="mistral", architecture_class="MistralForCausalLM", architecture=Architecture(moe_blocks="none"),
    to_config=dense_config, to_hf_config=to_hf_config, tensor_map=llama_tensor_map,
))

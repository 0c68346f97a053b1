"""Qwen2 (``model_type="qwen2"``): a dense model whose query, key and value projections always have biases."""

from __future__ import annotations

import functools
from typing import Any

from moe_lightning.models.hf.family import Architecture, HFFamily, register_family
from moe_lightning.models.hf.llama import dense_config, dense_hf_config
from moe_lightning.models.hf.tensor_map import llama_tensor_map
from moe_lightning.models.transformer import MoETransformer


def to_hf_config(model: MoETransformer) -> dict[str, Any]:
    return dict(**dense_hf_config(model), use_sliding_window=False)


QWEN2 = register_family(HFFamily(
    model_type="qwen2", architecture_class="Qwen2ForCausalLM",
    architecture=Architecture(moe_blocks="none", qkv_bias=True),
    to_config=functools.partial(dense_config, qkv_bias=True), to_hf_config=to_hf_config, tensor_map=llama_tensor_map,
))

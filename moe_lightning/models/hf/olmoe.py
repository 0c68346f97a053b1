"""OLMoE (``model_type="olmoe"``): every block MoE, RMSNorm over the whole query and key projections."""

from __future__ import annotations

from typing import Any

from moe_lightning.models.config import MoETransformerConfig
from moe_lightning.models.hf.config_mapping import base_config, base_hf_config, router_hf_config, topk_router_spec
from moe_lightning.models.hf.family import Architecture, HFFamily, register_family
from moe_lightning.models.hf.tensor_map import llama_tensor_map
from moe_lightning.models.transformer import MoETransformer


def to_config(hf: Any) -> tuple[MoETransformerConfig, dict[str, Any]]:
    if hf.clip_qkv is not None:
        raise ValueError(f"olmoe config: clip_qkv={hf.clip_qkv} is not supported (only None)")
    config = MoETransformerConfig(
        **base_config(hf), num_experts=hf.num_experts, expert_hidden_dim=hf.intermediate_size, qk_norm="projection",
    )
    return config, topk_router_spec(hf, hf.norm_topk_prob)


def to_hf_config(model: MoETransformer) -> dict[str, Any]:
    return dict(
        **base_hf_config(model), **router_hf_config(model), num_experts=model.config.num_experts,
        intermediate_size=model.config.expert_hidden_dim, attention_bias=False, clip_qkv=None,
    )


OLMOE = register_family(HFFamily(
    model_type="olmoe", architecture_class="OlmoeForCausalLM",
    architecture=Architecture(moe_blocks="all", qk_norm="projection", free_head_dim=False),
    to_config=to_config, to_hf_config=to_hf_config, tensor_map=llama_tensor_map,
))

"""Qwen2-MoE (``model_type="qwen2_moe"``): optional q/k/v biases, one sigmoid-gated shared expert per MoE block whose
width (``shared_expert_intermediate_size``) need not be a multiple of the routed experts'."""

from __future__ import annotations

import functools
from typing import Any

from moe_lightning.models.config import MoETransformerConfig
from moe_lightning.models.hf.config_mapping import topk_router_spec
from moe_lightning.models.hf.family import Architecture, HFFamily, register_family
from moe_lightning.models.hf.qwen3_moe import qwen_moe_config, qwen_moe_hf_config
from moe_lightning.models.hf.tensor_map import llama_tensor_map
from moe_lightning.models.transformer import MoETransformer


def to_config(hf: Any) -> tuple[MoETransformerConfig, dict[str, Any]]:
    config = qwen_moe_config(
        hf, qkv_bias=bool(hf.qkv_bias), num_shared_experts=1, shared_expert_gate=True,
        shared_expert_hidden_dim=hf.shared_expert_intermediate_size,
    )
    return config, topk_router_spec(hf, hf.norm_topk_prob)


def to_hf_config(model: MoETransformer) -> dict[str, Any]:
    config = model.config
    return dict(
        **qwen_moe_hf_config(model), qkv_bias=config.qkv_bias,
        shared_expert_intermediate_size=config.num_shared_experts * config.shared_hidden_dim,
    )


QWEN2_MOE = register_family(HFFamily(
    model_type="qwen2_moe", architecture_class="Qwen2MoeForCausalLM",
    architecture=Architecture(moe_blocks="any", qkv_bias=None, gated_shared_expert=True),
    to_config=to_config, to_hf_config=to_hf_config,
    tensor_map=functools.partial(llama_tensor_map, shared_expert="shared_expert", shared_expert_gate="shared_expert_gate"),
))

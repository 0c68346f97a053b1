"""Qwen3-MoE (``model_type="qwen3_moe"``): RMSNorm per query/key head, an explicit head dim, MoE blocks placed by
``decoder_sparse_step`` and ``mlp_only_layers``; plus the conversion of one ``Qwen3MoeSparseMoeBlock``.

Shape legend: E experts, D model dim, F expert hidden dim.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moe_lightning.experts import GroupedExperts
from moe_lightning.layer import MoELayer
from moe_lightning.models.config import MoETransformerConfig
from moe_lightning.models.hf.config_mapping import (
    base_config,
    base_hf_config,
    qwen_moe_layers,
    router_hf_config,
    topk_router_spec,
)
from moe_lightning.models.hf.family import Architecture, HFFamily, register_family
from moe_lightning.models.hf.tensor_map import llama_tensor_map
from moe_lightning.models.transformer import MoETransformer
from moe_lightning.routing import TopKRouter


def qwen_moe_config(hf: Any, **fields: Any) -> MoETransformerConfig:
    """Our config of a Qwen-MoE family checkpoint (Qwen2-MoE, Qwen3-MoE): the shared fields, routed and dense widths,
    the MoE block placement, plus ``fields``."""
    moe_layers = qwen_moe_layers(hf)
    return MoETransformerConfig(
        **base_config(hf), num_experts=hf.num_experts, expert_hidden_dim=hf.moe_intermediate_size,
        dense_hidden_dim=hf.intermediate_size,
        moe_layers=None if len(moe_layers) == hf.num_hidden_layers else moe_layers, **fields,
    )


def qwen_moe_hf_config(model: MoETransformer) -> dict[str, Any]:
    """The Qwen-MoE config fields of ``model``: every block a candidate (step 1), the dense ones listed."""
    config = model.config
    hf = dict(
        **base_hf_config(model), num_experts=config.num_experts, moe_intermediate_size=config.expert_hidden_dim,
        intermediate_size=config.ffn_hidden_dim, decoder_sparse_step=1, use_sliding_window=False,
        mlp_only_layers=[i for i in range(config.num_layers) if not config.is_moe_layer(i)],
    )
    if model.moe_layers:
        hf.update(router_hf_config(model))
    return hf


def to_config(hf: Any) -> tuple[MoETransformerConfig, dict[str, Any]]:
    return qwen_moe_config(hf, qk_norm="head"), topk_router_spec(hf, hf.norm_topk_prob)


def to_hf_config(model: MoETransformer) -> dict[str, Any]:
    return dict(**qwen_moe_hf_config(model), attention_bias=False)


QWEN3_MOE = register_family(HFFamily(
    model_type="qwen3_moe", architecture_class="Qwen3MoeForCausalLM",
    architecture=Architecture(moe_blocks="any", qk_norm="head"),
    to_config=to_config, to_hf_config=to_hf_config, tensor_map=llama_tensor_map,
))


@torch.no_grad()
def moe_layer_from_qwen3_moe_block(block: nn.Module, config) -> MoELayer:
    """An :class:`MoELayer` computing what transformers' ``Qwen3MoeSparseMoeBlock`` (v5 layout) computes.

    ``config`` is the block's ``Qwen3MoeConfig``. HF stores ``gate_up_proj`` as ``[E, 2F, D]`` (gate rows
    first) and ``down_proj`` as ``[E, D, F]``; ours are their transposes ``[E, D, 2F]`` and ``[E, F, D]``.
    """
    num_experts = config.num_experts
    router = TopKRouter(
        config.hidden_size, num_experts, config.num_experts_per_tok,
        normalize_weights=config.norm_topk_prob, load_balance_coef=0.0,
    )
    experts = GroupedExperts(num_experts, config.hidden_size, config.moe_intermediate_size)
    router.gate.weight.copy_(block.gate.weight)
    experts.w_in_EDH.copy_(block.experts.gate_up_proj.transpose(1, 2))
    experts.w_down_EFD.copy_(block.experts.down_proj.transpose(1, 2))
    return MoELayer(router, experts).to(device=block.gate.weight.device)

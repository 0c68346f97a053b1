"""Mixtral (``model_type="mixtral"``): every block MoE, softmax top-k routing that always renormalises.

Checkpoints name the MoE block ``block_sparse_moe`` with per-expert ``w1`` (gate), ``w3`` (up) and ``w2`` (down);
transformers v5 modules hold ``mlp.experts.gate_up_proj``/``down_proj``. Both are read; export writes the first.
"""

from __future__ import annotations

import functools
from typing import Any

from torch import nn

from moe_lightning.models.config import MoETransformerConfig
from moe_lightning.models.hf.config_mapping import base_config, base_hf_config, router_hf_config, topk_router_spec
from moe_lightning.models.hf.export import hf_model_from_moe_transformer
from moe_lightning.models.hf.family import Architecture, HFFamily, register_family
from moe_lightning.models.hf.tensor_map import llama_tensor_map
from moe_lightning.models.transformer import MoETransformer


def to_config(hf: Any) -> tuple[MoETransformerConfig, dict[str, Any]]:
    config = MoETransformerConfig(
        **base_config(hf), num_experts=hf.num_local_experts, expert_hidden_dim=hf.intermediate_size,
    )
    router = topk_router_spec(hf, normalize_weights=True)
    router["init_args"]["jitter_eps"] = float(hf.router_jitter_noise or 0.0)
    return config, router


def to_hf_config(model: MoETransformer) -> dict[str, Any]:
    router = router_hf_config(model)
    del router["norm_topk_prob"]  # Mixtral always renormalises
    return dict(
        **base_hf_config(model), **router, num_local_experts=model.config.num_experts,
        intermediate_size=model.config.expert_hidden_dim, sliding_window=None,
        router_jitter_noise=model.moe_layers[0].router.jitter_eps,
    )


MIXTRAL = register_family(HFFamily(
    model_type="mixtral", architecture_class="MixtralForCausalLM",
    architecture=Architecture(moe_blocks="all", always_normalizes=True),
    to_config=to_config, to_hf_config=to_hf_config,
    tensor_map=functools.partial(llama_tensor_map, moe_prefix="block_sparse_moe", expert_projections=("w1", "w3", "w2")),
))


def mixtral_from_moe_transformer(model: MoETransformer, experts_implementation: str = "grouped_mm") -> nn.Module:
    """transformers' ``MixtralForCausalLM`` with ``model``'s weights: the same function, for comparisons.

    Mixtral's architecture is ours restricted to: every block MoE, no shared experts, SwiGLU experts, and a
    softmax top-k router that renormalises its weights, without expert bias, groups or scaling. Anything else
    is refused, naming the setting.
    """
    return hf_model_from_moe_transformer(model, "mixtral", experts_implementation)

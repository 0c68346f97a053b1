"""Export of an :class:`MoETransformer` as transformers' ``MixtralForCausalLM``.

Shape legend: E experts, D model dim, F expert hidden dim.
"""

from __future__ import annotations

import torch
from torch import nn

from moe_lightning.models.transformer import MoETransformer
from moe_lightning.routing import TopKRouter


@torch.no_grad()
def mixtral_from_moe_transformer(model: MoETransformer, experts_implementation: str = "grouped_mm") -> nn.Module:
    """transformers' ``MixtralForCausalLM`` with ``model``'s weights: the same function, for comparisons and export.

    Mixtral's architecture is ours restricted to: every block MoE, no shared experts, SwiGLU experts, and a
    softmax top-k router that renormalises its weights, without expert bias, groups or scaling. Anything else
    is refused, naming the setting.
    """
    from transformers import MixtralConfig, MixtralForCausalLM

    config = model.config
    _check_mixtral_compatible(model)
    router = model.moe_layers[0].router
    hf_config = MixtralConfig(
        vocab_size=config.vocab_size, hidden_size=config.dim, intermediate_size=config.expert_hidden_dim,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.kv_heads, head_dim=config.head_dim, max_position_embeddings=config.max_seq_len,
        rms_norm_eps=config.norm_eps, rope_theta=config.rope_theta, num_local_experts=config.num_experts,
        num_experts_per_tok=router.num_experts_per_token, tie_word_embeddings=config.tie_embeddings,
        router_aux_loss_coef=0.0, output_router_logits=False, experts_implementation=experts_implementation,
        attn_implementation="sdpa",
    )
    hf_config.rope_parameters = {"rope_type": "default", "rope_theta": config.rope_theta}
    hf = MixtralForCausalLM(hf_config)
    hf.model.embed_tokens.weight.copy_(model.embed.weight)
    hf.model.norm.weight.copy_(model.norm.weight)
    hf.lm_head.weight.copy_(model.head.weight)
    for block, layer in zip(model.blocks, hf.model.layers):
        layer.input_layernorm.weight.copy_(block.attn_norm.weight)
        layer.post_attention_layernorm.weight.copy_(block.ffn_norm.weight)
        attn, hf_attn = block.attn, layer.self_attn
        hf_attn.q_proj.weight.copy_(attn.q_proj.weight)
        hf_attn.o_proj.weight.copy_(attn.o_proj.weight)
        k_weight, v_weight = attn.kv_proj.weight.chunk(2, dim=0)
        hf_attn.k_proj.weight.copy_(k_weight)
        hf_attn.v_proj.weight.copy_(v_weight)
        moe, hf_moe = block.ffn, layer.mlp
        hf_moe.gate.weight.copy_(moe.router.gate.weight)
        hf_moe.experts.gate_up_proj.copy_(moe.experts.w_in_EDH.transpose(1, 2))
        hf_moe.experts.down_proj.copy_(moe.experts.w_down_EFD.transpose(1, 2))
    return hf.to(device=model.embed.weight.device, dtype=model.embed.weight.dtype)


def _check_mixtral_compatible(model: MoETransformer) -> None:
    config = model.config
    problems = []
    if len(model.moe_layers) != config.num_layers:
        problems.append(f"only {len(model.moe_layers)} of {config.num_layers} blocks are MoE")
    if config.num_shared_experts:
        problems.append(f"num_shared_experts={config.num_shared_experts}")
    if config.activation != "swiglu":
        problems.append(f"activation={config.activation!r}")
    for i, layer in enumerate(model.moe_layers):
        router = layer.router
        if not isinstance(router, TopKRouter):
            problems.append(f"layer {i} router is {type(router).__name__}")
            continue
        settings = dict(
            score_func=router.score_func, normalize_weights=router.normalize_weights,
            routed_scaling_factor=router.routed_scaling_factor, expert_bias=router.expert_bias_E is not None,
            num_expert_groups=router.num_expert_groups,
            eval_capacity_factor=router.eval_capacity_factor,
        )
        expected = dict(score_func="softmax", normalize_weights=True, routed_scaling_factor=1.0, expert_bias=False,
                        num_expert_groups=1, eval_capacity_factor=None)
        problems += [f"layer {i} router {key}={value!r}" for key, value in settings.items() if value != expected[key]]
    if problems:
        raise ValueError(f"the model does not fit Mixtral's architecture: {problems}")

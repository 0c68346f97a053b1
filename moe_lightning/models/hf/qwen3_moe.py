"""Conversion of transformers' ``Qwen3MoeSparseMoeBlock`` into an :class:`MoELayer`.

Shape legend: E experts, D model dim, F expert hidden dim.
"""

from __future__ import annotations

import torch
from torch import nn

from moe_lightning.experts import GroupedExperts
from moe_lightning.layer import MoELayer
from moe_lightning.routing import TopKRouter


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

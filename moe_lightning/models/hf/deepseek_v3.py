"""Conversion between transformers' ``DeepseekV3ForCausalLM`` and an :class:`MoETransformer` with latent attention.

DeepSeek-V3 lays each rotary query/key part out in interleaved pairs ``(x0, x1), (x2, x3), ...`` (its config's
``rope_interleave``, on by default); our rotary embedding rotates half against half. Rotating pair ``i`` of the
interleaved layout is rotating channels ``i`` and ``i + R/2`` after the permutation ``[0, 2, 4, ..., 1, 3, 5, ...]``,
and transformers' interleaved rotary even returns its output in that permuted order, so permuting the rotary
output rows of the query and key projections at import gives the same attention scores with no second rotary
implementation. Export undoes the permutation.

Shape legend: H heads, N position-free query/key head dim, R rotary head dim, C key/value latent rank, I inputs of a
projection.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from moe_lightning.models.latent_attention import LatentAttention

ATTENTION_NAMES = {
    "q_proj": "q_proj",
    "q_a_proj": "q_down_proj",
    "q_a_layernorm": "q_norm",
    "q_b_proj": "q_up_proj",
    "kv_a_proj_with_mqa": "kv_down_proj",
    "kv_a_layernorm": "kv_norm",
    "kv_b_proj": "kv_up_proj",
    "o_proj": "o_proj",
}
"""transformers' ``DeepseekV3Attention`` submodule names -> :class:`LatentAttention`'s."""


def half_from_interleaved(rope_dim: int) -> Tensor:
    """The row order that takes an interleaved rotary layout to the rotate-half one: evens, then odds."""
    return torch.cat((torch.arange(0, rope_dim, 2), torch.arange(1, rope_dim, 2)))


def permute_rotary_rows(rows: Tensor, rope_dim: int, group: int, order: Tensor) -> Tensor:
    """``rows`` (a weight ``[X, I]``) in groups of ``group`` rows whose last ``rope_dim`` are rotary, with those
    reordered by ``order``: the query projections have one group per head, ``kv_down_proj`` one."""
    grouped = rows.reshape(-1, group, *rows.shape[1:])
    rotary = grouped[:, group - rope_dim :][:, order.to(rows.device)]
    return torch.cat((grouped[:, : group - rope_dim], rotary), dim=1).reshape(rows.shape)


def _rotary_groups(attention: LatentAttention) -> dict[str, int]:
    """Our projections with rotary output rows, and the size of each group of rows ending in ``R`` rotary ones."""
    query = "q_proj" if attention.q_proj is not None else "q_up_proj"
    return {f"{query}.": attention.qk_head_dim, "kv_down_proj.": attention.kv_lora_rank + attention.qk_rope_head_dim}


def latent_attention_state(
    hf_tensors: Mapping[str, Tensor], attention: LatentAttention, rope_interleave: bool
) -> dict[str, Tensor]:
    """``attention``'s state dict from one ``DeepseekV3Attention``'s tensors (names relative to ``self_attn.``)."""
    state = {}
    for hf_name, tensor in hf_tensors.items():
        module, _, leaf = hf_name.partition(".")
        state[f"{ATTENTION_NAMES[module]}.{leaf}"] = tensor
    if rope_interleave:
        state = _permute_rotary(state, attention, half_from_interleaved(attention.qk_rope_head_dim))
    return state


def hf_latent_attention_state(attention: LatentAttention, rope_interleave: bool) -> dict[str, Tensor]:
    """The tensors of a ``DeepseekV3Attention`` (names relative to ``self_attn.``) computing what ``attention`` does."""
    state = attention.state_dict()
    if rope_interleave:
        state = _permute_rotary(state, attention, half_from_interleaved(attention.qk_rope_head_dim).argsort())
    to_hf = {ours: hf for hf, ours in ATTENTION_NAMES.items()}
    renamed = {}
    for name, tensor in state.items():
        module, _, leaf = name.partition(".")
        renamed[f"{to_hf[module]}.{leaf}"] = tensor
    return renamed


def _permute_rotary(state: dict[str, Tensor], attention: LatentAttention, order: Tensor) -> dict[str, Tensor]:
    groups = _rotary_groups(attention)
    permuted = dict(state)
    for name, tensor in state.items():
        for prefix, group in groups.items():
            if name.startswith(prefix):
                permuted[name] = permute_rotary_rows(tensor, attention.qk_rope_head_dim, group, order)
    return permuted

"""DeepSeek-V3 (transformers' ``DeepseekV3ForCausalLM``) in our terms: config both ways, where each tensor lives.

Our :class:`MoETransformer` expresses it with latent attention (:class:`LatentAttention`), the first
``first_k_dense_replace`` blocks dense, and MoE blocks of ``n_shared_experts`` ungated shared experts beside a
:class:`TopKRouter` with sigmoid scores, the ``e_score_correction_bias`` as its selection-only ``expert_bias_E``,
group-limited selection (``n_group`` groups ranked by the sum of their two best biased scores, ``topk_group`` kept),
``norm_topk_prob`` and ``routed_scaling_factor``: the same arithmetic as transformers' ``DeepseekV3TopkRouter``.
Multi-token-prediction layers (``model.layers.{num_hidden_layers}`` and up) are not read.

DeepSeek-V3 lays each rotary query/key part out in interleaved pairs ``(x0, x1), (x2, x3), ...`` (its config's
``rope_interleave``, on by default); our rotary embedding rotates half against half. Rotating pair ``i`` of the
interleaved layout is rotating channels ``i`` and ``i + R/2`` after the permutation ``[0, 2, 4, ..., 1, 3, 5, ...]``,
and transformers' interleaved rotary returns its output in that permuted order, so permuting the rotary output rows
of the query and ``kv_down`` projections at import gives the same attention scores with no second rotary
implementation. Export undoes the permutation.

Shape legend: R rotary head dim, I inputs of a projection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from moe_lightning.models.config import MoETransformerConfig
from moe_lightning.models.hf.config_mapping import TOPK_ROUTER, base_config, base_hf_config
from moe_lightning.models.hf.family import Architecture, HFFamily, register_family
from moe_lightning.models.hf.tensor_map import Reader, Rows, TensorMap, embedding_map, llama_layer_map
from moe_lightning.models.transformer import MoETransformer
from moe_lightning.routing import TopKRouter

MODEL_TYPE = "deepseek_v3"
ARCHITECTURE_CLASS = "DeepseekV3ForCausalLM"

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


@dataclass(frozen=True)
class InterleavedRotaryRows:
    """Our tensor = HF tensor ``name`` with the rotary rows of each group of ``group`` rows (its last ``rope_dim``)
    turned from the interleaved layout to rotate-half (a :mod:`.tensor_map` source)."""

    name: str
    group: int
    rope_dim: int

    def hf_names(self, experts: range | None = None) -> list[str]:
        return [self.name]

    def hf_shapes(self, shape: tuple[int, ...], num_experts: int | None = None) -> dict[str, tuple[int, ...]]:
        return {self.name: shape}

    def read(self, read: Reader, experts: range | None = None) -> Tensor:
        order = half_from_interleaved(self.rope_dim)
        return permute_rotary_rows(read(self.name, None), self.rope_dim, self.group, order)

    def split(self, tensor: Tensor) -> dict[str, Tensor]:
        order = half_from_interleaved(self.rope_dim).argsort()
        return {self.name: permute_rotary_rows(tensor, self.rope_dim, self.group, order)}


def latent_attention_map(ours: str, hf: str, config: MoETransformerConfig, rope_interleave: bool) -> TensorMap:
    """Our :class:`LatentAttention` ``ours`` from a ``DeepseekV3Attention`` ``hf``."""
    rotary = {  # our projections with rotary output rows -> the size of each group of rows ending in them
        "q_proj" if config.q_lora_rank is None else "q_up_proj": config.qk_nope_head_dim + config.qk_rope_head_dim,
        "kv_down_proj": config.kv_lora_rank + config.qk_rope_head_dim,
    }
    hf_names = {ours_name: hf_name for hf_name, ours_name in ATTENTION_NAMES.items()}
    modules = ["q_proj"] if config.q_lora_rank is None else ["q_down_proj", "q_norm", "q_up_proj"]
    out: TensorMap = {}
    for module in [*modules, "kv_down_proj", "kv_norm", "kv_up_proj", "o_proj"]:
        name = f"{hf}.{hf_names[module]}.weight"
        if rope_interleave and module in rotary:
            out[f"{ours}.{module}.weight"] = (InterleavedRotaryRows(name, rotary[module], config.qk_rope_head_dim),)
        else:
            out[f"{ours}.{module}.weight"] = (Rows((name,)),)
    return out


def deepseek_v3_tensor_map(config: MoETransformerConfig, rope_interleave: bool = True) -> TensorMap:
    """Where each of our tensors lives in a DeepSeek-V3 checkpoint (``rope_interleave``: its rotary layout)."""
    out = embedding_map(config.tie_embeddings)
    for i in range(config.num_layers):
        moe = config.is_moe_layer(i)
        layer = llama_layer_map(i, moe=moe, qkv_bias=False, qk_norm=False, shared_expert="shared_experts")
        out.update({name: sources for name, sources in layer.items() if not name.startswith(f"blocks.{i}.attn.")})
        out.update(latent_attention_map(f"blocks.{i}.attn", f"model.layers.{i}.self_attn", config, rope_interleave))
        if moe:
            bias = f"model.layers.{i}.mlp.gate.e_score_correction_bias"
            out[f"blocks.{i}.ffn.router.expert_bias_E"] = (Rows((bias,)),)
    return out


def to_config(hf: Any) -> tuple[MoETransformerConfig, dict[str, Any]]:
    """Our config and router spec from a ``DeepseekV3Config``; refuses what we do not compute, naming the setting
    and its value."""
    refuse_unsupported(hf)
    base = base_config(hf)  # also refuses rope scaling, attention biases, dropout, activations other than SiLU
    config = MoETransformerConfig(
        **{**base, "num_kv_heads": None, "attention_head_dim": None}, attention="latent", q_lora_rank=hf.q_lora_rank,
        kv_lora_rank=hf.kv_lora_rank, qk_nope_head_dim=hf.qk_nope_head_dim, qk_rope_head_dim=hf.qk_rope_head_dim,
        v_head_dim=hf.v_head_dim, num_experts=hf.n_routed_experts, expert_hidden_dim=hf.moe_intermediate_size,
        num_shared_experts=hf.n_shared_experts, dense_hidden_dim=hf.intermediate_size,
        first_k_dense=min(hf.first_k_dense_replace, hf.num_hidden_layers),  # more dense layers than layers: all
        init_std=hf.initializer_range,
    )
    router = {"class_path": TOPK_ROUTER, "init_args": dict(
        num_experts_per_token=hf.num_experts_per_tok, score_func="sigmoid", normalize_weights=bool(hf.norm_topk_prob),
        routed_scaling_factor=float(hf.routed_scaling_factor), expert_bias=True, num_expert_groups=hf.n_group,
        num_groups_per_token=hf.topk_group,
        load_balance_coef=0.0,  # DeepSeek-V3 balances by the expert bias, not by an auxiliary loss
    )}
    return config, router


def refuse_unsupported(hf: Any) -> None:
    """ValueError naming every setting of a ``DeepseekV3Config`` we do not compute (beyond the shared ones)."""
    problems = []
    if hf.num_key_value_heads != hf.num_attention_heads:
        problems.append(f"num_key_value_heads={hf.num_key_value_heads} != num_attention_heads={hf.num_attention_heads}")
    if not hf.rope_interleave:
        problems.append("rope_interleave=False (the family's tensor map assumes DeepSeek's interleaved layout)")
    if getattr(hf, "quantization_config", None):
        problems.append(f"quantization_config={hf.quantization_config!r} (load dequantised weights)")
    for name in ("n_shared_experts", "n_group", "topk_group"):
        if not isinstance(getattr(hf, name), int) or getattr(hf, name) < 1:
            problems.append(f"{name}={getattr(hf, name)!r} (must be an int >= 1)")
    if not isinstance(hf.first_k_dense_replace, int) or hf.first_k_dense_replace < 0:
        problems.append(f"first_k_dense_replace={hf.first_k_dense_replace!r} (must be an int >= 0)")
    if problems:
        raise ValueError(f"{hf.model_type} config: not supported: {problems}")


def to_hf_config(model: MoETransformer) -> dict[str, Any]:
    """Keyword arguments of ``DeepseekV3Config`` for a model that fits (see :func:`fit_problems`)."""
    config = model.config
    routers = model.moe_layers
    routed = router_settings(routers[0].router) if routers else dict(num_experts_per_tok=1, n_group=1, topk_group=1)
    base = base_hf_config(model)
    del base["head_dim"]  # DeepseekV3Config sets it to qk_rope_head_dim itself
    return dict(
        **{**base, "num_key_value_heads": config.num_heads}, q_lora_rank=config.q_lora_rank,
        kv_lora_rank=config.kv_lora_rank, qk_nope_head_dim=config.qk_nope_head_dim,
        qk_rope_head_dim=config.qk_rope_head_dim, v_head_dim=config.v_head_dim, n_routed_experts=config.num_experts,
        moe_intermediate_size=config.expert_hidden_dim, n_shared_experts=max(config.num_shared_experts, 1),
        intermediate_size=config.ffn_hidden_dim,
        first_k_dense_replace=sum(not config.is_moe_layer(i) for i in range(config.num_layers)),
        initializer_range=config.init_std, attention_bias=False, rope_interleave=True, num_nextn_predict_layers=0,
        **routed,
    )


def fit_problems(model: MoETransformer) -> list[str]:
    """Every setting of ``model`` that DeepSeek-V3 cannot express, one readable line each (empty: it fits)."""
    config = model.config
    problems = []
    if config.attention != "latent":
        problems.append(f"attention={config.attention!r} (DeepSeek-V3 has 'latent')")
    if config.activation != "swiglu":
        problems.append(f"activation={config.activation!r}")
    moe_blocks = [config.is_moe_layer(i) for i in range(config.num_layers)]
    first_moe = moe_blocks.index(True) if True in moe_blocks else config.num_layers
    if moe_blocks != [i >= first_moe for i in range(config.num_layers)]:
        problems.append(f"MoE blocks {[i for i, moe in enumerate(moe_blocks) if moe]} do not all follow the dense ones")
    if first_moe < config.num_layers:
        if config.num_shared_experts < 1 or config.shared_expert_gate:
            problems.append(f"num_shared_experts={config.num_shared_experts}, shared_expert_gate="
                            f"{config.shared_expert_gate} (DeepSeek-V3 has ungated shared experts)")
        if config.shared_hidden_dim != config.expert_hidden_dim:
            problems.append(f"shared_expert_hidden_dim={config.shared_expert_hidden_dim} != "
                            f"expert_hidden_dim={config.expert_hidden_dim}")
        problems += router_problems(model)
    return problems


def router_problems(model: MoETransformer) -> list[str]:
    """What keeps the routers from being one DeepSeek-V3 router config shared by every MoE block."""
    problems, shared = [], set()
    for i, layer in enumerate(model.moe_layers):
        router = layer.router
        if not isinstance(router, TopKRouter):
            problems.append(f"layer {i} router is {type(router).__name__}")
            continue
        settings = dict(score_func=router.score_func, expert_bias=router.expert_bias_E is not None,
                        eval_capacity_factor=router.eval_capacity_factor)
        expected = dict(score_func="sigmoid", expert_bias=True, eval_capacity_factor=None)
        problems += [f"layer {i} router {key}={value!r}" for key, value in settings.items() if value != expected[key]]
        shared.add(tuple(router_settings(router).items()))
    if len(shared) > 1:
        problems.append(f"the MoE blocks' routers differ: {sorted(shared)}")
    return problems


def router_settings(router: TopKRouter) -> dict[str, Any]:
    """The router's settings in ``DeepseekV3Config``'s spelling."""
    return dict(
        num_experts_per_tok=router.num_experts_per_token, norm_topk_prob=router.normalize_weights,
        routed_scaling_factor=router.routed_scaling_factor, n_group=router.num_expert_groups,
        topk_group=router.num_groups_per_token if router.num_expert_groups > 1 else 1,
    )


FAMILY = register_family(HFFamily(
    model_type=MODEL_TYPE, architecture_class=ARCHITECTURE_CLASS, architecture=Architecture(moe_blocks="any"),
    to_config=to_config, to_hf_config=to_hf_config, tensor_map=deepseek_v3_tensor_map, fit_check=fit_problems,
))

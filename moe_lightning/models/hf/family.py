"""HFFamily: what one transformers model family is in our terms, and the registry of supported families.

A family module (``mixtral.py``, ``qwen2_moe.py``, ...) describes its architecture as an :class:`Architecture`,
translates configs both ways, and names its tensors (:mod:`.tensor_map`); it registers itself with
:func:`register_family`. :func:`fit_problems` checks any :class:`MoETransformer` against an architecture, so every
export refuses the same way, naming each setting that does not fit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from moe_lightning.models.config import MoETransformerConfig, QKNorm
from moe_lightning.models.hf.tensor_map import TensorMap
from moe_lightning.models.transformer import MoETransformer
from moe_lightning.routing import TopKRouter


@dataclass(frozen=True)
class Architecture:
    """The subset of :class:`MoETransformer` a family can express."""

    moe_blocks: Literal["all", "any", "none"]
    """Which blocks may be MoE: every one, any pattern (the rest dense), or none (a dense model)."""
    qk_norm: QKNorm = "none"
    """The query/key norm the family always has."""
    qkv_bias: bool | None = False
    """Whether q/k/v biases are required (True), forbidden (False) or a setting of the family (None)."""
    gated_shared_expert: bool = False
    """Every MoE block has a sigmoid-gated shared expert (Qwen2-MoE); otherwise none."""
    always_normalizes: bool = False
    """The router always renormalises its top-k weights (Mixtral); otherwise that is a setting."""
    free_head_dim: bool = True
    """``head_dim`` may differ from ``dim / num_heads`` (OLMoE's query norm spans ``dim``, so it may not)."""


@dataclass(frozen=True)
class HFFamily:
    """One transformers model family (``model_type``), importable and exportable."""

    model_type: str
    """transformers' ``model_type``, the key of the registry."""
    architecture_class: str
    """The ``*ForCausalLM`` class written into an exported ``config.json``."""
    architecture: Architecture
    to_config: Callable[[Any], tuple[MoETransformerConfig, dict[str, Any] | None]]
    """transformers config -> our config and router spec (None for a dense model); refuses what we lack."""
    to_hf_config: Callable[[MoETransformer], dict[str, Any]]
    """A model that fits the architecture -> keyword arguments of the family's transformers config class."""
    tensor_map: Callable[[MoETransformerConfig], TensorMap]
    """Our config -> where each of our tensors lives in the family's checkpoints."""
    ignored_tensors: tuple[str, ...] = ()
    """Regular expressions of checkpoint tensors that are legitimately not read (e.g. multi-token-prediction heads)."""
    fit_check: Callable[[MoETransformer], list[str]] | None = None
    """The family's own :func:`fit_problems` (for what an :class:`Architecture` cannot say); None: the generic one."""


FAMILIES: dict[str, HFFamily] = {}


def register_family(family: HFFamily) -> HFFamily:
    FAMILIES[family.model_type] = family
    return family


def family_for(model_type: Any, source: str) -> HFFamily:
    """The registered family of ``model_type``; ``source`` names where it was read, for the error."""
    if model_type not in FAMILIES:
        raise ValueError(f"{source}: model_type={model_type!r} is not supported; supported: {sorted(FAMILIES)}")
    return FAMILIES[model_type]


def fit_problems(model: MoETransformer, architecture: Architecture) -> list[str]:
    """Every setting of ``model`` that ``architecture`` cannot express, one readable line each (empty: it fits)."""
    config = model.config
    problems = []
    num_moe = len(model.moe_layers)
    if architecture.moe_blocks == "all" and num_moe != config.num_layers:
        problems.append(f"only {num_moe} of {config.num_layers} blocks are MoE")
    if architecture.moe_blocks == "none" and num_moe:
        problems.append(f"{num_moe} of {config.num_layers} blocks are MoE (the family is dense)")
    if config.activation != "swiglu":
        problems.append(f"activation={config.activation!r}")
    if config.attention != "softmax":
        return problems + [f"attention={config.attention!r} (the family has softmax attention)"]
    if config.qk_norm != architecture.qk_norm:
        problems.append(f"qk_norm={config.qk_norm!r} (the family has {architecture.qk_norm!r})")
    if architecture.qkv_bias is not None and config.qkv_bias != architecture.qkv_bias:
        problems.append(f"qkv_bias={config.qkv_bias}")
    if not architecture.free_head_dim and config.head_dim * config.num_heads != config.dim:
        problems.append(f"head_dim={config.head_dim} * num_heads={config.num_heads} != dim={config.dim}")
    if num_moe:
        if architecture.gated_shared_expert and not (config.num_shared_experts and config.shared_expert_gate):
            problems.append(f"num_shared_experts={config.num_shared_experts}, shared_expert_gate="
                            f"{config.shared_expert_gate} (the family has one gated shared expert)")
        if not architecture.gated_shared_expert and config.num_shared_experts:
            problems.append(f"num_shared_experts={config.num_shared_experts}")
        problems += router_problems(model, architecture)
    return problems


def router_problems(model: MoETransformer, architecture: Architecture) -> list[str]:
    """What keeps the routers from being one softmax top-k router config shared by every MoE block."""
    expected = dict(score_func="softmax", routed_scaling_factor=1.0, expert_bias=False, num_expert_groups=1,
                    eval_capacity_factor=None)
    if architecture.always_normalizes:
        expected["normalize_weights"] = True
    problems = []
    shared = set()
    for i, layer in enumerate(model.moe_layers):
        router = layer.router
        if not isinstance(router, TopKRouter):
            problems.append(f"layer {i} router is {type(router).__name__}")
            continue
        settings = dict(
            score_func=router.score_func, normalize_weights=router.normalize_weights,
            routed_scaling_factor=router.routed_scaling_factor, expert_bias=router.expert_bias_E is not None,
            num_expert_groups=router.num_expert_groups, eval_capacity_factor=router.eval_capacity_factor,
        )
        problems += [f"layer {i} router {key}={settings[key]!r}" for key in expected if settings[key] != expected[key]]
        shared.add((router.num_experts_per_token, router.normalize_weights))
    if len(shared) > 1:
        problems.append(f"the MoE blocks' routers differ in (top-k, normalize_weights): {sorted(shared)}")
    return problems


def check_fits(model: MoETransformer, family: HFFamily) -> None:
    """Raise a ValueError listing every setting of ``model`` that ``family`` cannot express."""
    problems = family.fit_check(model) if family.fit_check else fit_problems(model, family.architecture)
    if model.config.layer_overrides:
        problems.append(f"layer_overrides of blocks {[o.layer for o in model.config.layer_overrides]} (a transformers "
                        "config has one router and expert count for every MoE block)")
    if problems:
        raise ValueError(f"the model does not fit {family.model_type}'s architecture: {problems}")

"""Quantise a model's experts (and optionally its dense linear layers) with bitsandbytes, and count the bytes saved.

``quantize_model(model, "nf4")`` swaps every :class:`MoELayer`'s :class:`GroupedExperts` for
:class:`QuantizedExperts`; with ``dense=True`` also every dense ``nn.Linear`` (attention projections, dense
feed-forwards, shared experts) for :class:`QuantizedLinear`. Routers, norms, embeddings and the LM head are kept
as they are: routing decisions are sensitive and cheap, and the head is tied to or as large as the embedding.
``quantize_experts_by_format(model, formats)`` gives each expert a format of its own (:class:`MixedPrecisionExperts`),
as a serving plan asks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from moe_lightning.experts.grouped import GroupedExperts
from moe_lightning.experts.shared import SharedExperts
from moe_lightning.inference.quantization.config import QuantizationConfig, as_config
from moe_lightning.inference.quantization.experts import QuantizedExperts
from moe_lightning.inference.quantization.linear import QuantizedLinear
from moe_lightning.inference.quantization.mixed import MixedPrecisionExperts
from moe_lightning.layer import MoELayer
from moe_lightning.routing.base import Router

LM_HEAD_NAMES = ("head", "lm_head")
"""Attribute names of output heads, never quantised (nor is any linear layer sharing an embedding's weight)."""


def quantize_model(
    model: nn.Module, mode: str | QuantizationConfig = "nf4", dense: bool = False, **options: Any
) -> nn.Module:
    """Quantise ``model`` in place (on its device) and return it.

    Args:
        model: any module holding :class:`MoELayer` s, e.g. a :class:`MoETransformer` or a ``MoELightningModule``.
        mode: ``"int8"``, ``"nf4"``, ``"fp4"``, or a :class:`QuantizationConfig`.
        dense: also quantise the dense ``nn.Linear`` layers :func:`dense_linear_names` lists.
        options: the other :class:`QuantizationConfig` fields: ``blocksize``, ``double_quant``, ``compute_dtype``
            (4-bit), ``threshold`` (int8).
    """
    config = as_config(mode, options)
    linears = dense_linear_names(model) if dense else []
    layers = _layers_to_quantize(model, require=not linears, what=" and no dense nn.Linear" if dense else "")
    for _, layer in layers:
        layer.experts = QuantizedExperts.from_experts(layer.experts, config)
    for name in linears:
        model.set_submodule(name, QuantizedLinear.from_linear(model.get_submodule(name), config))
    return model


def quantize_experts_by_format(model: nn.Module, expert_formats: Sequence[Sequence[str]]) -> nn.Module:
    """Quantise ``model``'s experts in place, expert ``e`` of the ``l``-th :class:`MoELayer` (model order) to
    ``expert_formats[l][e]`` (``"bf16"``, ``"int8"``, ``"nf4-b32-dq"``, ...: see
    :mod:`moe_lightning.inference.quantization.formats`); return ``model``."""
    layers = _layers_to_quantize(model)
    if len(expert_formats) != len(layers):
        raise ValueError(f"expert_formats has {len(expert_formats)} layers, {type(model).__name__} has {len(layers)} "
                         "MoE layers")
    for (name, layer), formats in zip(layers, expert_formats):
        if len(formats) != layer.experts.num_experts:
            raise ValueError(f"expert_formats names {len(formats)} formats for {name}, which has "
                             f"{layer.experts.num_experts} experts")
    for (_, layer), formats in zip(layers, expert_formats):
        layer.experts = MixedPrecisionExperts.from_experts(layer.experts, formats)
    return model


def _layers_to_quantize(model: nn.Module, require: bool = True, what: str = "") -> list[tuple[str, MoELayer]]:
    """The MoE layers, each checked to hold GroupedExperts before any is changed; ``require``: at least one."""
    layers = [(name, module) for name, module in model.named_modules() if isinstance(module, MoELayer)]
    if require and not layers:
        raise ValueError(f"{type(model).__name__} has no MoELayer{what} to quantise")
    for name, layer in layers:
        if isinstance(layer.experts, (QuantizedExperts, MixedPrecisionExperts)):
            raise ValueError(f"{name}.experts is already quantised ({type(layer.experts).__name__})")
        if not isinstance(layer.experts, GroupedExperts):
            raise TypeError(
                f"quantisation needs GroupedExperts, but {name}.experts is {type(layer.experts).__name__}"
            )
    return layers


def dense_linear_names(model: nn.Module) -> list[str]:
    """The ``nn.Linear`` layers ``quantize_model(dense=True)`` quantises: all but those inside a router, the shared
    experts' gate, the LM head (``head`` / ``lm_head``) and any layer whose weight is an embedding's."""
    kept_prefixes = []
    for name, module in model.named_modules():
        if isinstance(module, Router):
            kept_prefixes.append(name)
        elif isinstance(module, MoELayer):
            kept_prefixes.append(_join(name, "router"))
        elif isinstance(module, SharedExperts):
            kept_prefixes.append(_join(name, "gate"))
    embedding_weights = {id(module.weight) for module in model.modules() if isinstance(module, nn.Embedding)}
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or id(module.weight) in embedding_weights:
            continue
        if name.rpartition(".")[2] in LM_HEAD_NAMES:
            continue
        if any(name == prefix or name.startswith(prefix + ".") for prefix in kept_prefixes):
            continue
        names.append(name)
    return names


def quantized_modules(model: nn.Module) -> dict[str, QuantizedExperts | QuantizedLinear]:
    """Every :class:`QuantizedExperts`, :class:`MixedPrecisionExperts` and :class:`QuantizedLinear` of ``model`` by
    name."""
    kinds = (QuantizedExperts, MixedPrecisionExperts, QuantizedLinear)
    return {name: module for name, module in model.named_modules() if isinstance(module, kinds)}


def weight_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s weights as stored: its parameters and persistent buffers (for quantised modules the codes,
    scales and code tables), a tensor shared by two names (a tied head) counted once."""
    tensors = {id(t): t for t in module.state_dict(keep_vars=True).values()}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def expert_weight_bytes(model: nn.Module) -> int:
    """Bytes of the routed experts' weights of every :class:`MoELayer` in ``model`` (see :func:`weight_bytes`)."""
    return sum(weight_bytes(module.experts) for module in model.modules() if isinstance(module, MoELayer))


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name

"""A quantised :class:`MoETransformer` as one safetensors file, loaded back without pickle.

The file is :func:`export_safetensors`' layout with the quantised state in place of the float weights it replaced
(codes, scales and code tables as plain tensors) and one more JSON metadata entry: the
:class:`QuantizationConfig` and which modules it was applied to, and for :class:`MixedPrecisionExperts` (a serving
plan's layers) each expert's format name. Loading builds the model from its config, puts empty quantised modules of
the right shapes where the metadata says, and installs the tensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from moe_lightning.checkpoint.reading import load_safetensors_file, safetensors_metadata
from moe_lightning.experts.grouped import GroupedExperts
from moe_lightning.inference.export import (
    CONFIG_KEY,
    FORMAT,
    FORMAT_KEY,
    ROUTER_KEY,
    build_model,
    load_weights,
    transformer_of,
    write_model_file,
)
from moe_lightning.inference.quantization.config import QuantizationConfig
from moe_lightning.inference.quantization.experts import QuantizedExperts
from moe_lightning.inference.quantization.linear import QuantizedLinear
from moe_lightning.inference.quantization.matrices import import_bitsandbytes
from moe_lightning.inference.quantization.mixed import MixedPrecisionExperts
from moe_lightning.inference.quantization.quantize import quantized_modules
from moe_lightning.models import MoETransformer

QUANTIZED_FORMAT = "moe_lightning.QuantizedMoETransformer/1"
QUANTIZATION_KEY = "moe_lightning.quantization"
KINDS = {"experts": QuantizedExperts, "linear": QuantizedLinear, "mixed_experts": MixedPrecisionExperts}
"""How the metadata names each kind of quantised module."""


def save_quantized(module_or_model: nn.Module, path: str | Path, router: dict[str, Any] | None = None) -> None:
    """Write a model quantised by :func:`quantize_model` to one ``.safetensors`` file (tensors on the CPU).

    Args:
        module_or_model: a quantised :class:`MoETransformer`, or a module holding one as ``.model``.
        path: the file to write.
        router: the router spec, as for :func:`export_safetensors`.
    """
    model = transformer_of(module_or_model, "save_quantized")
    modules = quantized_modules(model)
    if not modules:
        raise ValueError("the model holds no quantised module: run quantize_model first (or export_safetensors it)")
    expert_formats = {name: module.expert_formats for name, module in modules.items()
                      if isinstance(module, MixedPrecisionExperts)}
    configs = {name: module.config for name, module in modules.items() if name not in expert_formats}
    config = next(iter(configs.values()), None)
    differing = sorted(name for name, other in configs.items() if other != config)
    if differing:
        raise ValueError(f"one file holds one QuantizationConfig; {differing} differ from {config}")
    quantization = {
        "config": None if config is None else config.as_dict(),
        "modules": {name: _kind(module) for name, module in modules.items()},
        "bitsandbytes": import_bitsandbytes().__version__,
    }
    if expert_formats:
        quantization["expert_formats"] = expert_formats
    write_model_file(model, path, router, QUANTIZED_FORMAT, "save_quantized",
                     {QUANTIZATION_KEY: json.dumps(quantization)})


def load_quantized(path: str | Path) -> MoETransformer:
    """The model :func:`save_quantized` wrote, on the CPU and in eval mode."""
    metadata = safetensors_metadata(path)
    if metadata.get(FORMAT_KEY) != QUANTIZED_FORMAT:
        hint = ": it is a plain export, load it with load_safetensors" if metadata.get(FORMAT_KEY) == FORMAT else ""
        raise ValueError(f"{path} is not a save_quantized file: its metadata has {FORMAT_KEY}="
                         f"{metadata.get(FORMAT_KEY)!r}, expected {QUANTIZED_FORMAT!r}{hint}")
    quantization = json.loads(metadata[QUANTIZATION_KEY])
    config = None if quantization["config"] is None else QuantizationConfig.from_dict(quantization["config"])
    expert_formats = quantization.get("expert_formats", {})
    model = build_model(json.loads(metadata[CONFIG_KEY]), json.loads(metadata[ROUTER_KEY]))
    for name, kind in quantization["modules"].items():
        if kind not in KINDS:
            raise ValueError(
                f"{path} names an unknown quantised module kind {kind!r} for {name}; known: {sorted(KINDS)}"
            )
        try:
            original = model.get_submodule(name)
        except AttributeError as error:
            raise ValueError(f"{path} quantises {name}, which the model built from its config lacks") from error
        expected = nn.Linear if kind == "linear" else GroupedExperts
        if not isinstance(original, expected):
            raise ValueError(f"{path} quantises {name} as {kind}, but the model's {name} is {type(original).__name__}")
        if kind == "mixed_experts":
            if name not in expert_formats:
                raise ValueError(f"{path} holds mixed-precision experts {name} but no expert_formats for them")
            model.set_submodule(name, MixedPrecisionExperts.empty_like(original, expert_formats[name]))
        else:
            model.set_submodule(name, KINDS[kind].empty_like(original, config))
    load_weights(model, load_safetensors_file(path), str(path))
    return model.eval()


def is_quantized_file(path: str | Path) -> bool:
    """Whether ``path`` is a :func:`save_quantized` file (reads only its metadata)."""
    return safetensors_metadata(path).get(FORMAT_KEY) == QUANTIZED_FORMAT


def _kind(module: nn.Module) -> str:
    return next(kind for kind, cls in KINDS.items() if isinstance(module, cls))

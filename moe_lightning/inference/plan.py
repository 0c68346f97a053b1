"""ServingPlan: per MoE layer and expert, the format to serve it in and whether to pin it, as a versioned JSON file.

``moe-lightning plan`` writes one from a training run's routing statistics (see
:mod:`moe_lightning.inference.plan_allocation` for the rule); ``moe-lightning quantize --plan`` and
``moe-lightning serve --plan`` read it. The file (``PLAN_FORMAT``, version 1)::

    {"format": "moe_lightning.serving_plan/1",
     "budget_bytes": 1048576,               # what the experts may take on the device, all layers together
     "source": {"stats": "runs/.../router_stats.jsonl", "last_n": null},
     "layers": [{"layer": 0, "name": "blocks.1.ffn", "num_experts": 8, "dim": 128, "hidden_dim": 256,
                 "activation": "swiglu", "bytes": 83968,
                 "experts": [{"expert": 0, "share": 0.31, "format": "bf16", "pinned": true, "error": 0.0}, ...]},
                ...]}

- ``format`` of an expert: ``bf16`` or a quantised format's name (``int8``, ``nf4``, ``nf4-b32-dq``, ...: see
  :mod:`moe_lightning.inference.quantization.formats`); ``quantize --plan`` stores each expert so
  (:class:`MixedPrecisionExperts`), and ``serve --plan`` does the same in memory.
- ``pinned``: one of the layer's hottest experts, kept in bf16 and, when serving offloaded
  (``serve --offload-capacity``), pinned in the expert cache (never evicted). The expert cache holds float experts
  only, so an offloaded server uses the plan's pins and serves every expert in its float dtype.
- ``share``: the expert's share of its layer's routed rows in the statistics; ``error``: the squared Frobenius error
  of its weights in its format; ``bytes``: the layer's expert bytes as stored (the real quantised layouts).

Loading checks the schema (unknown keys, types, expert and layer numbering, formats, pins only in bf16, the bytes
within the budget); :meth:`ServingPlan.check_model` checks it against a model before anything is applied.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from torch import nn

from moe_lightning.inference.quantization.formats import FLOAT_FORMAT, format_config
from moe_lightning.inference.quantization.quantize import quantize_experts_by_format
from moe_lightning.layer import MoELayer

PLAN_FORMAT = "moe_lightning.serving_plan/1"
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*")


@dataclass(frozen=True)
class ExpertPlan:
    """One expert's place in the plan."""

    expert: int
    """Its index in the layer."""
    share: float
    """Its share of the layer's routed rows in the statistics the plan was made from."""
    format: str
    """``bf16`` or a quantised format's name."""
    pinned: bool
    """Pinned in the expert cache when serving offloaded; always in bf16."""
    error: float
    """Squared Frobenius error of its two weight matrices in ``format``."""


@dataclass(frozen=True)
class LayerPlan:
    """One MoE layer's experts, with the shapes the plan was made for."""

    layer: int
    """The layer's index among the model's MoE layers (model order, as in ``router_stats.jsonl``)."""
    name: str
    """The MoE layer's module name in the model."""
    num_experts: int
    dim: int
    hidden_dim: int
    activation: str
    bytes: int
    """The layer's expert weights as stored in these formats."""
    experts: tuple[ExpertPlan, ...]

    @property
    def expert_formats(self) -> list[str]:
        return [expert.format for expert in self.experts]

    @property
    def pinned(self) -> list[int]:
        """The pinned experts, hottest first."""
        pinned = [expert for expert in self.experts if expert.pinned]
        return [expert.expert for expert in sorted(pinned, key=lambda x: (-x.share, x.expert))]


@dataclass(frozen=True)
class ServingPlan:
    """Which experts to pin and which format each expert is served in, within ``budget_bytes``."""

    budget_bytes: int
    layers: tuple[LayerPlan, ...]
    source: dict[str, Any]
    """Where the statistics came from: ``{"stats": path, "last_n": records summed or None for all}``."""

    def __post_init__(self) -> None:
        if self.total_bytes > self.budget_bytes:
            raise ValueError(f"the plan's experts take {self.total_bytes} bytes, over its "
                             f"budget_bytes={self.budget_bytes}")

    @property
    def total_bytes(self) -> int:
        return sum(layer.bytes for layer in self.layers)

    @property
    def expert_formats(self) -> list[list[str]]:
        """Per MoE layer, each expert's format (as :func:`quantize_experts_by_format` takes them)."""
        return [layer.expert_formats for layer in self.layers]

    @property
    def pins(self) -> list[list[int]]:
        """Per MoE layer, the pinned experts (as :func:`offload_experts` takes ``pin``)."""
        return [layer.pinned for layer in self.layers]

    def check_model(self, model: nn.Module) -> None:
        """Raise ``ValueError`` naming the difference unless ``model``'s MoE layers have the plan's shapes."""
        layers = [(name, module) for name, module in model.named_modules() if isinstance(module, MoELayer)]
        if len(layers) != len(self.layers):
            raise ValueError(f"the plan has {len(self.layers)} MoE layers, {type(model).__name__} has {len(layers)}")
        for planned, (name, layer) in zip(self.layers, layers):
            experts = layer.experts
            want = {key: getattr(planned, key) for key in ("num_experts", "dim", "hidden_dim", "activation")}
            got = {key: getattr(experts, key, None) for key in want}
            if got != want:
                differing = {key: (want[key], got[key]) for key in want if want[key] != got[key]}
                raise ValueError(f"the plan's MoE layer {planned.layer} ({planned.name}) does not match the model's "
                                 f"{name}: (plan, model) {differing}")

    def as_dict(self) -> dict[str, Any]:
        return {"format": PLAN_FORMAT, "budget_bytes": self.budget_bytes, "source": self.source,
                "layers": [asdict(layer) for layer in self.layers]}

    @classmethod
    def from_dict(cls, values: Any, origin: str = "the plan") -> ServingPlan:
        """The plan :meth:`as_dict` wrote, checked; errors name ``origin`` and the offending field."""
        if not isinstance(values, dict) or values.get("format") != PLAN_FORMAT:
            got = values.get("format") if isinstance(values, dict) else type(values).__name__
            raise ValueError(f"{origin} is not a serving plan: format={got!r}, expected {PLAN_FORMAT!r}")
        _check_keys(values, {"format", "budget_bytes", "source", "layers"}, origin)
        layers = values["layers"]
        if not isinstance(layers, list) or not layers:
            raise ValueError(f"{origin}: layers must be a non-empty list, got {layers!r}")
        try:
            return cls(_positive_int(values["budget_bytes"], "budget_bytes"),
                       tuple(_layer(entry, i) for i, entry in enumerate(layers)), dict(values["source"]))
        except (TypeError, ValueError) as error:
            raise ValueError(f"{origin}: {error}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.as_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ServingPlan:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no serving plan at {path}")
        try:
            values = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not a serving plan (not JSON: {error})") from None
        return cls.from_dict(values, str(path))


def apply_plan(model: nn.Module, plan: ServingPlan) -> nn.Module:
    """Quantise ``model``'s float experts in place to the plan's formats, after checking the plan fits the model."""
    plan.check_model(model)
    return quantize_experts_by_format(model, plan.expert_formats)


def parse_bytes(text: str | int) -> int:
    """A byte count from an int or ``"123"``, ``"1.5GiB"``, ``"512 MiB"``, ``"2GB"`` (kB/MB/GB/TB are powers of 1000,
    KiB/MiB/GiB/TiB of 1024; rounded down); it must come to at least one byte."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = _SIZE.fullmatch(text) if isinstance(text, str) else None
        if match is None or match[2].lower() not in _UNITS:
            raise ValueError(f"a memory size must be a number of bytes with an optional unit (B, kB, MB, GB, TB, KiB, "
                             f"MiB, GiB, TiB), got {text!r}")
        value = math.floor(float(match[1]) * _UNITS[match[2].lower()])
    if value < 1:
        raise ValueError(f"a memory size must be at least 1 byte, got {text!r}")
    return value


def count_or_fraction(text: str) -> int | float:
    """A command line's expert count: ``"2"`` is a count of experts, ``"0.25"`` a fraction of them (see
    :func:`moe_lightning.inference.offload.cache.resolve_count`)."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def _layer(values: Any, index: int) -> LayerPlan:
    where = f"layers[{index}]"
    if not isinstance(values, dict):
        raise TypeError(f"{where} must be an object, got {type(values).__name__}")
    _check_keys(values, {f.name for f in fields(LayerPlan)}, where)
    if values["layer"] != index:
        raise ValueError(f"{where} has layer={values['layer']!r}: layers must be numbered 0, 1, ... in order")
    num_experts = _positive_int(values["num_experts"], f"{where}.num_experts")
    experts = values["experts"]
    if not isinstance(experts, list) or len(experts) != num_experts:
        count = len(experts) if isinstance(experts, list) else type(experts).__name__
        raise ValueError(f"{where} has num_experts={num_experts} but {count} experts")
    return LayerPlan(
        index, str(values["name"]), num_experts, _positive_int(values["dim"], f"{where}.dim"),
        _positive_int(values["hidden_dim"], f"{where}.hidden_dim"), str(values["activation"]),
        _positive_int(values["bytes"], f"{where}.bytes"),
        tuple(_expert(entry, f"{where}.experts[{e}]", e) for e, entry in enumerate(experts)),
    )


def _expert(values: Any, where: str, index: int) -> ExpertPlan:
    if not isinstance(values, dict):
        raise TypeError(f"{where} must be an object, got {type(values).__name__}")
    _check_keys(values, {f.name for f in fields(ExpertPlan)}, where)
    if values["expert"] != index:
        raise ValueError(f"{where} has expert={values['expert']!r}: experts must be numbered 0, 1, ... in order")
    name = values["format"]
    try:
        format_config(name)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    if not isinstance(values["pinned"], bool):
        raise TypeError(f"{where}.pinned must be true or false, got {values['pinned']!r}")
    if values["pinned"] and name != FLOAT_FORMAT:
        raise ValueError(f"{where} is pinned in format {name!r}: pinned experts are kept in {FLOAT_FORMAT!r}")
    share, error = (values[key] for key in ("share", "error"))
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in (share, error)):
        raise ValueError(f"{where}: share and error must be numbers >= 0, got share={share!r}, error={error!r}")
    return ExpertPlan(index, float(share), name, values["pinned"], float(error))


def _check_keys(values: dict, expected: set[str], where: str) -> None:
    missing, unknown = sorted(expected - set(values)), sorted(set(values) - expected)
    if missing or unknown:
        raise ValueError(f"{where}: missing keys {missing}, unknown keys {unknown} (written by a newer moe_lightning?)")


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {name}={value!r}")
    return value

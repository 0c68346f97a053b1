"""propose_plan(): a :class:`ServingPlan` from a trained model and its routing statistics, under a memory budget.

The rule. Expert ``e`` of a layer receives a share ``s_e`` of the layer's routed rows (``load`` summed over the
records of ``router_stats.jsonl``). Stored in format ``f`` its weights are off by ``dW_ef``; for inputs of comparable
size and errors that do not correlate, the expected squared error a token picks up in that layer grows as
``sum_e s_e * |dW_ef|^2`` (Frobenius norm, both projections), and every layer sees every token once, so the model's
cost is that sum over layers. The allocation minimises it within the budget, greedily:

1. Pinned experts (the ``pin`` hottest of each layer) are kept in bf16; the layer's other experts start in the one
   candidate format that makes the layer smallest (a format's code tables count once per layer, so no mix is
   smaller). If that already exceeds the budget, the plan is impossible (a ``ValueError`` naming the budget, the
   pinned bytes and the minimum).
2. Repeatedly, among all moves of one unpinned expert to a format with a smaller error, take the one with the
   largest gain per extra byte, ``s_e * (|dW_e,now|^2 - |dW_e,f|^2) / (bytes_f - bytes_now)`` (an expert's bytes),
   if the plan's exact bytes (code tables included) still fit the budget; a move that does not fit is dropped,
   smaller ones may still fit. Stop when none is left. Experts no row reached gain nothing and stay where they
   started.

Bytes and errors are measured, not estimated: the bytes of a format are those of the real stored layout
(:class:`MixedPrecisionExperts` built on the meta device, code tables included, counted once per format and layer),
the errors those of each expert actually quantised and dequantised with bitsandbytes.

Shape legend: L MoE layers, E experts.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from moe_lightning.experts.grouped import GroupedExperts
from moe_lightning.inference.offload.cache import resolve_count
from moe_lightning.inference.offload.offload import _load_from_jsonl  # the reader hot_experts_from_stats uses
from moe_lightning.inference.plan import ExpertPlan, LayerPlan, ServingPlan, parse_bytes
from moe_lightning.inference.quantization.formats import FLOAT_FORMAT, format_config
from moe_lightning.inference.quantization.mixed import MixedPrecisionExperts
from moe_lightning.inference.quantization.quantize import weight_bytes
from moe_lightning.layer import MoELayer

DEFAULT_FORMATS = ("bf16", "int8", "nf4-b32-dq", "nf4", "nf4-dq", "nf4-b256-dq")
"""Candidates from 16 to about 4.03 bits per weight. ``nf4-dq`` errs as little as ``nf4`` (the same blocks, 8-bit
scales) at 4.13 bits instead of 4.5, but its absmax code table costs 1 KiB per matrix store, which only pays off
beyond a few thousand weights per expert: ``nf4`` stays a candidate for tiny layers."""


@dataclass(frozen=True)
class FormatCost:
    """Bytes of a format in one layer: ``fixed`` once if any expert uses it (code tables), ``per_expert`` each."""

    fixed: int
    per_expert: int


def propose_plan(
    model: nn.Module,
    stats: str | Path,
    budget: int | str,
    formats: Sequence[str] = DEFAULT_FORMATS,
    pin: int | float = 0,
    last_n: int | None = None,
) -> ServingPlan:
    """The plan for ``model``'s float experts.

    Args:
        model: a float model (its MoE layers hold :class:`GroupedExperts`).
        stats: a ``router_stats.jsonl`` of its training (:class:`RouterStatsMonitor`), one layer per MoE layer.
        budget: the experts' bytes on the device, all layers together: a byte count, a size such as ``"2GiB"``
            (see :func:`parse_bytes`), or a format name, meaning what every expert in that format takes (``"nf4"``:
            the memory of uniform NF4).
        formats: the candidate formats (names as in :mod:`moe_lightning.inference.quantization.formats`).
        pin: experts to pin per layer, hottest first: a count, or a fraction in ``(0, 1]`` of the layer's experts.
        last_n: use only the last ``last_n`` records of ``stats`` (None: all).
    """
    names, layers = _float_moe_layers(model)
    formats = list(dict.fromkeys(formats))
    if not formats:
        raise ValueError("formats must name at least one candidate format")
    for name in formats:
        format_config(name)
    load_LE = _load_from_jsonl(Path(stats), last_n)
    _check_stats(load_LE, names, layers, stats)
    shares_LE = [[load / sum(load_E) for load in load_E] for load_E in load_LE]
    pinned_L = [_hottest(load_E, resolve_count(pin, len(load_E), "pin", where=f"MoE layer {i}"))
                for i, load_E in enumerate(load_LE)]
    if any(pinned_L) and FLOAT_FORMAT not in formats:
        raise ValueError(f"pinned experts are kept in {FLOAT_FORMAT}: add {FLOAT_FORMAT!r} to formats={formats}, or "
                         f"pin none")
    budget_bytes = resolve_budget(budget, [layer.experts for layer in layers])
    costs_L = [format_costs(layer.experts, formats) for layer in layers]
    # A budget too small fails here, before any expert is quantised.
    smallest_plan(costs_L, formats, [len(load_E) for load_E in load_LE], pinned_L, budget_bytes)
    errors_LE = [expert_errors(layer.experts, formats) for layer in layers]
    chosen_LE = allocate(shares_LE, errors_LE, costs_L, pinned_L, budget_bytes)
    plan_layers = tuple(
        LayerPlan(
            i, name, layer.experts.num_experts, layer.experts.dim, layer.experts.hidden_dim, layer.experts.activation,
            layer_bytes(costs_L[i], chosen_LE[i]),
            tuple(ExpertPlan(e, shares_LE[i][e], f, e in pinned_L[i], errors_LE[i][e][f])
                  for e, f in enumerate(chosen_LE[i])),
        )
        for i, (name, layer) in enumerate(zip(names, layers))
    )
    return ServingPlan(budget_bytes, plan_layers, {"stats": str(stats), "last_n": last_n})


def allocate(
    shares_LE: Sequence[Sequence[float]],
    errors_LE: Sequence[Sequence[dict[str, float]]],
    costs_L: Sequence[dict[str, FormatCost]],
    pinned_L: Sequence[Sequence[int]],
    budget: int,
) -> list[list[str]]:
    """Each expert's format by the greedy rule of this module's docstring.

    Args:
        shares_LE: each expert's share of its layer's routed rows.
        errors_LE: each expert's error (squared Frobenius) in each candidate format (in the same order for all).
        costs_L: each layer's bytes of each candidate format (and of bf16 where experts are pinned).
        pinned_L: the experts kept in bf16 in each layer.
        budget: the most bytes all layers may take.
    """
    formats = list(errors_LE[0][0])
    chosen_LE, total = smallest_plan(costs_L, formats, [len(errors_E) for errors_E in errors_LE], pinned_L, budget)
    version_LE = [[0] * len(chosen_E) for chosen_E in chosen_LE]
    moves: list[tuple[float, int, int, str, int]] = []

    def push_moves(i: int, e: int) -> None:
        now, errors = chosen_LE[i][e], errors_LE[i][e]
        for f in errors:
            gain = shares_LE[i][e] * (errors[now] - errors[f])
            extra = costs_L[i][f].per_expert - costs_L[i][now].per_expert
            if gain > 0 and extra > 0:
                heapq.heappush(moves, (-gain / extra, i, e, f, version_LE[i][e]))

    for i, chosen_E in enumerate(chosen_LE):
        for e in range(len(chosen_E)):
            if e not in pinned_L[i]:
                push_moves(i, e)
    while moves:
        _, i, e, f, version = heapq.heappop(moves)
        if version != version_LE[i][e]:  # the expert moved since: this move starts from a format it left
            continue
        moved_E = [*chosen_LE[i][:e], f, *chosen_LE[i][e + 1:]]
        extra = layer_bytes(costs_L[i], moved_E) - layer_bytes(costs_L[i], chosen_LE[i])
        if total + extra > budget:
            continue
        chosen_LE[i], total = moved_E, total + extra
        version_LE[i][e] += 1
        push_moves(i, e)
    return chosen_LE


def smallest_plan(
    costs_L: Sequence[dict[str, FormatCost]], formats: Sequence[str], num_experts_L: Sequence[int],
    pinned_L: Sequence[Sequence[int]], budget: int,
) -> tuple[list[list[str]], int]:
    """The allocation's start and its bytes: per layer the pinned experts in bf16, the others in the one candidate
    format that makes the layer smallest (ties: the first in ``formats``). ``ValueError`` if it exceeds ``budget``."""
    chosen_LE = []
    for costs, num_experts, pinned in zip(costs_L, num_experts_L, pinned_L):
        start = min(formats, key=lambda f: layer_bytes(costs, [f] * (num_experts - len(pinned))))
        chosen_LE.append([FLOAT_FORMAT if e in pinned else start for e in range(num_experts)])
    total = sum(layer_bytes(costs, chosen_E) for costs, chosen_E in zip(costs_L, chosen_LE))
    if total > budget:
        pinned_bytes = sum(layer_bytes(costs, [FLOAT_FORMAT] * len(pinned)) for pinned, costs in zip(pinned_L, costs_L))
        raise ValueError(
            f"budget={budget} bytes ({_mib(budget)}) is below the smallest plan, {total} bytes ({_mib(total)}): the "
            f"{sum(map(len, pinned_L))} pinned experts take {pinned_bytes} bytes in {FLOAT_FORMAT}, the others in the "
            f"format that makes their layer smallest the rest; raise the budget, pin fewer experts or add a smaller "
            f"format"
        )
    return chosen_LE, total


def layer_bytes(costs: dict[str, FormatCost], expert_formats: Sequence[str]) -> int:
    """Bytes of a layer whose experts are in ``expert_formats``."""
    return sum(costs[f].fixed + count * costs[f].per_expert for f, count in Counter(expert_formats).items())


def format_costs(experts: GroupedExperts, formats: Sequence[str]) -> dict[str, FormatCost]:
    """Each format's bytes in a layer of ``experts``' shapes, from :class:`MixedPrecisionExperts` on the meta device
    (bf16 included, for pinned experts)."""
    def stored_bytes(name: str, count: int) -> int:
        empty = MixedPrecisionExperts(count, experts.dim, experts.hidden_dim, experts.activation, [name] * count,
                                      device="meta")
        return weight_bytes(empty)

    costs = {}
    for name in dict.fromkeys([*formats, FLOAT_FORMAT]):
        one, two = stored_bytes(name, 1), stored_bytes(name, 2)
        costs[name] = FormatCost(fixed=2 * one - two, per_expert=two - one)
    return costs


@torch.no_grad()
def expert_errors(experts: GroupedExperts, formats: Sequence[str]) -> list[dict[str, float]]:
    """Per expert, the squared Frobenius error of its two weight matrices stored in each format (quantised and
    dequantised as :class:`MixedPrecisionExperts` serves them)."""
    w_in_EDH, w_down_EFD = experts.w_in_EDH.float(), experts.w_down_EFD.float()
    per_format = {}
    for name in formats:
        stored = MixedPrecisionExperts.from_experts(experts, [name] * experts.num_experts)
        deq_in_EDH, deq_down_EFD = stored.dequantized_weights()
        per_format[name] = ((deq_in_EDH - w_in_EDH).square().sum((1, 2))
                            + (deq_down_EFD - w_down_EFD).square().sum((1, 2))).tolist()
    return [{name: per_format[name][e] for name in formats} for e in range(experts.num_experts)]


def resolve_budget(budget: int | str, experts_L: Sequence[GroupedExperts]) -> int:
    """``budget`` in bytes (see :func:`parse_bytes`); a format name means every expert of ``experts_L`` in it."""
    try:
        return parse_bytes(budget)
    except ValueError as size_error:
        try:
            format_config(budget)
        except ValueError:
            raise ValueError(f"budget: {size_error}, or a format name such as 'nf4' (the bytes of every expert in "
                             "that format)") from None
    return sum(layer_bytes(format_costs(experts, [budget]), [budget] * experts.num_experts) for experts in experts_L)


def _float_moe_layers(model: nn.Module) -> tuple[list[str], list[MoELayer]]:
    found = [(name, module) for name, module in model.named_modules() if isinstance(module, MoELayer)]
    if not found:
        raise ValueError(f"{type(model).__name__} holds no MoELayer: there are no experts to plan")
    for name, layer in found:
        if not isinstance(layer.experts, GroupedExperts):
            raise ValueError(f"a plan is made from the float model, but {name}.experts is "
                             f"{type(layer.experts).__name__}")
    return [name for name, _ in found], [layer for _, layer in found]


def _check_stats(load_LE: list[list[float]], names: list[str], layers: list[MoELayer], stats: str | Path) -> None:
    if len(load_LE) != len(layers):
        raise ValueError(f"{stats} has statistics for {len(load_LE)} MoE layers, the model has {len(layers)}")
    for i, (name, layer, load_E) in enumerate(zip(names, layers, load_LE)):
        if len(load_E) != layer.experts.num_experts:
            raise ValueError(f"{stats} has {len(load_E)} experts for MoE layer {i}, the model's {name} has "
                             f"{layer.experts.num_experts}")
        if not sum(load_E) > 0:
            raise ValueError(f"{stats} records no routed rows for MoE layer {i} ({name}): its experts cannot be ranked")


def _hottest(load_E: Sequence[float], count: int) -> list[int]:
    """The ``count`` experts with the most rows, ties to the lower index (as :func:`hot_experts_from_stats`)."""
    return sorted(range(len(load_E)), key=lambda e: (-load_E[e], e))[:count]


def _mib(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:.3f} MiB"

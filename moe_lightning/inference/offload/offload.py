"""offload_experts(): serve a model whose experts do not fit on the device, through a per-layer expert cache.

Every :class:`MoELayer`'s :class:`GroupedExperts` is replaced by :class:`CachedExperts`: the weights move to a store
(host memory, page-locked when CUDA is available, or one safetensors file per expert on disk) and at most
``capacity`` experts per layer sit on the device at once. The model's code is not touched: the layer calls its
experts as before.

- Hot experts: :func:`hot_experts_from_stats` picks, per MoE layer, the experts with the most routed rows in a
  training run's ``router_stats.jsonl`` (or a :class:`RoutingCounts`), to pass as ``pin``.
- Prefetch (pre-gating): a forward pre-hook on every MoE block but the last applies the *next* MoE block's
  ``ffn_norm`` and router to this block's input residual stream, and starts loading the experts that predicts
  (most-routed first) on the cache's side stream, overlapping the copies with this block's compute. The
  prediction skips the attention in between, so it can miss; misses are loaded on demand as usual and the
  stats report prefetch hits and unused prefetches separately. It needs blocks shaped like
  :class:`TransformerBlock` (``.ffn_norm`` then ``.ffn``); the first MoE layer is never prefetched.

Shape legend: T tokens, D model dim, L MoE layers, E experts.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from moe_lightning.analytics.counts import RoutingCounts
from moe_lightning.experts.grouped import GroupedExperts
from moe_lightning.inference.offload.cache import (
    CacheStats,
    EvictionPolicy,
    ExpertCache,
    check_pinned,
    check_policy,
    resolve_capacity,
    resolve_count,
)
from moe_lightning.inference.offload.cached_experts import CachedExperts
from moe_lightning.inference.offload.store import (
    ExpertStore,
    HostExpertStore,
    check_store_matches,
    save_expert_stores,
)
from moe_lightning.layer import MoELayer

StoreSpec = str | Path | Sequence[ExpertStore]
PinSpec = Sequence[Sequence[int]] | Mapping[int, Sequence[int]] | None


@dataclass
class OffloadStats:
    """The caches' counters, per MoE layer (model order) and summed."""

    layer_names: list[str]
    per_layer: list[CacheStats]

    @property
    def total(self) -> CacheStats:
        return sum(self.per_layer, CacheStats())

    @property
    def hit_rate(self) -> float:
        return self.total.hit_rate

    @property
    def bytes_loaded(self) -> int:
        return self.total.bytes_loaded

    @property
    def load_seconds(self) -> float:
        return self.total.load_seconds

    @property
    def prefetch_hits(self) -> int:
        return self.total.prefetch_hits

    def as_dict(self) -> dict[str, Any]:
        """``{"total": {...}, "layers": {name: {...}}}`` of every counter and hit rate, for loggers and JSON."""
        return {
            "total": self.total.as_dict(),
            "layers": {name: stats.as_dict() for name, stats in zip(self.layer_names, self.per_layer)},
        }


class ExpertOffload:
    """What :func:`offload_experts` installed: the cached experts of each MoE layer and the prefetch hooks."""

    def __init__(self, layer_names: list[str], experts: list[CachedExperts], hooks: list[RemovableHandle]) -> None:
        self.layer_names = layer_names
        self.experts = experts
        self._hooks = hooks

    @property
    def caches(self) -> list[ExpertCache]:
        return [experts.cache for experts in self.experts]

    def stats(self) -> OffloadStats:
        """Counters so far (on CUDA this waits for the loads issued so far, to time them)."""
        return OffloadStats(list(self.layer_names), [cache.stats for cache in self.caches])

    def reset_stats(self) -> None:
        for cache in self.caches:
            cache.reset_stats()

    def remove_prefetch(self) -> None:
        """Detach the prefetch hooks (the caches stay)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()


def offload_experts(
    model: nn.Module,
    capacity: int | float,
    policy: EvictionPolicy = "lru",
    store: StoreSpec = "cpu",
    pin: PinSpec = None,
    prefetch: bool = False,
    device: torch.device | str | None = None,
) -> ExpertOffload:
    """Replace the experts of every :class:`MoELayer` in ``model`` by :class:`CachedExperts`; return the handle.

    Cast and place the model before offloading: the store keeps the experts' dtype, and the slots are allocated on
    ``device`` (default: where each layer's experts are; the cache follows its input to another device on first use).
    The experts' parameters leave the model (``state_dict`` no longer has them).

    Args:
        model: any module holding :class:`MoELayer` s with :class:`GroupedExperts`, e.g. a :class:`MoETransformer`.
        capacity: device slots per layer: an int >= 1 (clamped to the layer's experts) or a fraction in ``(0, 1]``
            of them, rounded up. A forward needing more experts than fit is processed in chunks
            (see :mod:`moe_lightning.inference.offload.cached_experts`).
        policy: ``"lru"`` or ``"lfu"`` (see :class:`ExpertCache`).
        store: ``"cpu"`` (host memory, pinned when CUDA is available); a directory path, where the experts are
            written one safetensors file each (see :func:`save_expert_stores`) and read back on demand; or one
            :class:`ExpertStore` per MoE layer (e.g. :func:`load_expert_stores`), which must match the layers' sizes.
        pin: experts per MoE layer kept on the device and never evicted: a list with one list per MoE layer
            (as :func:`hot_experts_from_stats` returns) or ``{moe_layer_index: experts}``; None pins none.
        prefetch: install the pre-gating prefetch hooks (see the module docstring).
        device: where the slots live.
    """
    names, layers = _moe_layers(model)
    check_policy(policy)
    for name, layer in zip(names, layers):
        if isinstance(layer.experts, CachedExperts):
            raise ValueError(f"MoE layer {name!r} is already offloaded")
        if not isinstance(layer.experts, GroupedExperts):
            raise TypeError(f"MoE layer {name!r} has {type(layer.experts).__name__} experts; offloading needs GroupedExperts")
    pins = _pins_per_layer(pin, len(layers))
    for i, (name, layer) in enumerate(zip(names, layers)):
        label = _label(i, name)
        check_pinned(pins[i], layer.experts.num_experts, resolve_capacity(capacity, layer.experts.num_experts, label), label)
    blocks = _prefetch_blocks(model, names) if prefetch else []

    stores = _build_stores(store, model, layers)
    cached = [
        CachedExperts.from_grouped(layer.experts, capacity, policy, layer_store, pins[i], device, _label(i, name))
        for i, (name, layer, layer_store) in enumerate(zip(names, layers, stores))
    ]
    for layer, experts in zip(layers, cached):
        layer.experts = experts
    hooks = [
        block.register_forward_pre_hook(
            functools.partial(_prefetch_next_layer, inspect.signature(block.forward), next_block, cached[i + 1].cache),
            with_kwargs=True,
        )
        for i, (block, next_block) in enumerate(itertools.pairwise(blocks))
    ]
    return ExpertOffload(names, cached, hooks)


def hot_experts_from_stats(
    source: str | Path | RoutingCounts,
    fraction_or_count: int | float,
    model: nn.Module | None = None,
    last_n: int | None = None,
) -> list[list[int]]:
    """Per MoE layer, the experts that took the most routed rows in training, hottest first (ties: lower id first).

    Args:
        source: a ``router_stats.jsonl`` written by :class:`RouterStatsMonitor` (the ``"load"`` of every record is
            summed) or a :class:`RoutingCounts` (its ``load_LE``).
        fraction_or_count: how many per layer: an int count in ``[0, E]`` or a fraction in ``(0, 1]`` of E, rounded up.
        model: if given, the statistics must have one layer per :class:`MoELayer` of it, with as many experts.
        last_n: sum only the last ``last_n`` records of the file (None: all).
    """
    if isinstance(source, RoutingCounts):
        load_LE = source.load_LE.tolist()
        origin = "the RoutingCounts"
    else:
        load_LE = _load_from_jsonl(Path(source), last_n)
        origin = str(source)
    if model is not None:
        names, layers = _moe_layers(model)
        if len(layers) != len(load_LE):
            raise ValueError(
                f"{origin} has statistics for {len(load_LE)} MoE layers, the model has {len(layers)} MoE layers"
            )
        for i, (name, layer, load_E) in enumerate(zip(names, layers, load_LE)):
            if len(load_E) != layer.num_experts:
                raise ValueError(
                    f"{origin} has {len(load_E)} experts for MoE layer {i}, the model's {name!r} has {layer.num_experts}"
                )
    hot = []
    for load_E in load_LE:
        count = resolve_count(fraction_or_count, len(load_E), "fraction_or_count")
        hot.append(sorted(range(len(load_E)), key=lambda e: (-load_E[e], e))[:count])
    return hot


# ---- helpers ---------------------------------------------------------------------------------------------------


def _moe_layers(model: nn.Module) -> tuple[list[str], list[MoELayer]]:
    found = [(name, module) for name, module in model.named_modules() if isinstance(module, MoELayer)]
    if not found:
        raise ValueError(f"{type(model).__name__} holds no MoELayer")
    return [name for name, _ in found], [module for _, module in found]


def _label(index: int, name: str) -> str:
    return f"MoE layer {index} ({name})" if name else f"MoE layer {index}"


def _pins_per_layer(pin: PinSpec, num_layers: int) -> list[list[int]]:
    if pin is None:
        return [[] for _ in range(num_layers)]
    if isinstance(pin, Mapping):
        bad = [key for key in pin if not isinstance(key, int) or not 0 <= key < num_layers]
        if bad:
            raise ValueError(f"pin has keys {bad} that are not MoE layer indices in [0, {num_layers})")
        return [list(pin.get(i, ())) for i in range(num_layers)]
    if isinstance(pin, (str, bytes)) or not isinstance(pin, Sequence):
        raise TypeError(f"pin must be one list of experts per MoE layer or a dict of them, got {type(pin).__name__}")
    if len(pin) != num_layers:
        raise ValueError(f"pin has {len(pin)} lists of experts, the model has {num_layers} MoE layers")
    return [list(experts) for experts in pin]


def _build_stores(store: StoreSpec, model: nn.Module, layers: list[MoELayer]) -> list[ExpertStore]:
    if isinstance(store, str) and store == "cpu":
        return [HostExpertStore.from_experts(layer.experts) for layer in layers]
    if isinstance(store, (str, Path)):
        return save_expert_stores(model, store)
    if isinstance(store, Sequence) and all(isinstance(s, ExpertStore) for s in store):
        if len(store) != len(layers):
            raise ValueError(f"store has {len(store)} expert stores, the model has {len(layers)} MoE layers")
        for i, (layer_store, layer) in enumerate(zip(store, layers)):
            check_store_matches(layer_store, layer.experts, f"MoE layer {i}")
        return list(store)
    raise TypeError(f"store must be 'cpu', a directory path or one ExpertStore per MoE layer, got {store!r}")


def _prefetch_blocks(model: nn.Module, layer_names: list[str]) -> list[nn.Module]:
    """The block around each MoE layer, which must hold it as ``.ffn`` after an ``.ffn_norm``."""
    blocks = []
    for name in layer_names:
        parent_name, _, attribute = name.rpartition(".")
        block = model.get_submodule(parent_name) if name else None
        if attribute != "ffn" or not isinstance(getattr(block, "ffn_norm", None), nn.Module):
            raise ValueError(
                f"prefetch needs every MoELayer held as `.ffn` by a block with an `.ffn_norm` (as in MoETransformer); "
                f"MoE layer {name!r} is not"
            )
        blocks.append(block)
    return blocks


def _prefetch_next_layer(
    signature: inspect.Signature, next_block: nn.Module, next_cache: ExpertCache,
    block: nn.Module, args: tuple, kwargs: dict,
) -> None:
    """Forward pre-hook: route this block's input with the next MoE block's norm and router; prefetch the result."""
    router = next_block.ffn.router
    if router.training:  # a training-mode router may count its load or add noise: leave training alone
        return
    bound = signature.bind_partial(*args, **kwargs).arguments
    x = next(iter(bound.values()))
    token_ids = bound.get("token_ids_BL")
    with torch.no_grad():
        h = next_block.ffn_norm(x)
        routing = router(h.reshape(-1, h.shape[-1]), token_ids_T=None if token_ids is None else token_ids.reshape(-1))
    counts_E = routing.tokens_per_expert_E.tolist()
    ranked = sorted((e for e, count in enumerate(counts_E) if count > 0), key=lambda e: -counts_E[e])
    next_cache.to(x.device)
    next_cache.prefetch(ranked)


def _load_from_jsonl(path: Path, last_n: int | None) -> list[list[float]]:
    if last_n is not None and last_n < 1:
        raise ValueError(f"last_n must be >= 1 or None, got last_n={last_n}")
    if not path.is_file():
        raise FileNotFoundError(f"no router statistics file at {path}")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                records.append((number, _record_loads(json.loads(line))))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
                raise ValueError(f"{path} line {number} is not a router statistics record: {error}") from None
    if not records:
        raise ValueError(f"{path} holds no router statistics records")
    records = records[-last_n:] if last_n else records
    first_line, total_LE = records[0][0], [list(load_E) for load_E in records[0][1]]
    for number, load_LE in records[1:]:
        shape = [len(load_E) for load_E in load_LE]
        if shape != [len(load_E) for load_E in total_LE]:
            raise ValueError(
                f"{path} line {number} has experts per layer {shape}, line {first_line} "
                f"{[len(load_E) for load_E in total_LE]}"
            )
        for total_E, load_E in zip(total_LE, load_LE):
            for e, value in enumerate(load_E):
                total_E[e] += value
    return total_LE


def _record_loads(record: dict) -> list[list[float]]:
    """``load`` of each layer of one record, by its ``layer`` index, which must run 0..L-1."""
    by_layer = {int(entry["layer"]): [float(v) for v in entry["load"]] for entry in record["layers"]}
    if sorted(by_layer) != list(range(len(by_layer))) or len(by_layer) != len(record["layers"]):
        raise ValueError(f"layer indices {[entry['layer'] for entry in record['layers']]} are not 0..L-1 once each")
    return [by_layer[i] for i in range(len(by_layer))]


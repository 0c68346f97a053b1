"""ExpertCache: a fixed number of device slots holding some of one MoE layer's experts, filled from an ExpertStore.

Each slot holds one expert's ``(w_in_DH, w_down_FD)``; all slots live in two device tensors ``w_in_SDH`` and
``w_down_SFD`` allocated once, so loading an expert is two copies into place and nothing is allocated while serving.

- Demand: :meth:`ExpertCache.slots_for` makes a set of experts resident (hits stay, misses are loaded, evicting
  others by the policy) and returns their slots. A set larger than the free slots is split beforehand by
  :meth:`ExpertCache.plan` into chunks that each fit.
- Policies: ``"lru"`` evicts the least recently used expert; ``"lfu"`` the least frequently used (demand accesses
  counted since the cache was built, across evictions, so a hot expert that was pushed out once comes back
  strong), least recently used among equals.
- Pinned experts are loaded up front and never evicted; they take slots out of the capacity.
- Prefetch: :meth:`ExpertCache.prefetch` loads predicted experts ahead of demand; an access that finds an expert a
  prefetch brought in (and nothing used since) counts as a prefetch hit.
- On CUDA every load runs on a side stream (``non_blocking`` from page-locked memory) after the compute stream's
  earlier work (nothing still reads the slot), and records an event per slot; :meth:`ExpertCache.wait_for` makes
  the compute stream wait for exactly the slots it is about to read, so a prefetch for another layer never stalls
  this one.

Shape legend: S slots (the capacity), E experts, D model dim, F expert hidden dim, H input-projection width.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from typing import Literal

import torch
from torch import Tensor

from moe_lightning.inference.offload.store import ExpertStore

EvictionPolicy = Literal["lru", "lfu"]
POLICIES = ("lru", "lfu")


@dataclass
class CacheStats:
    """What an :class:`ExpertCache` did since it was built (or since :meth:`ExpertCache.reset_stats`)."""

    hits: int = 0
    """Demand accesses that found the expert resident (pinned and prefetched experts included)."""
    misses: int = 0
    """Demand accesses that had to load the expert."""
    evictions: int = 0
    """Experts pushed out of a slot to make room (for demand or for prefetch)."""
    bytes_loaded: int = 0
    """Bytes copied host -> device: misses, prefetches and the pinned experts loaded up front."""
    load_seconds: float = 0.0
    """Time spent loading: reading the store on the host (wall time) plus the copy (CUDA events on the side stream;
    wall time on the CPU)."""
    prefetch_loads: int = 0
    """Experts loaded by :meth:`ExpertCache.prefetch`."""
    prefetch_hits: int = 0
    """Hits on an expert a prefetch brought in before it was needed (a subset of ``hits``)."""
    prefetch_unused: int = 0
    """Prefetched experts evicted before any access used them."""

    @property
    def accesses(self) -> int:
        return self.hits + self.misses

    @property
    def hit_rate(self) -> float:
        """``hits / (hits + misses)``; 0 before any access."""
        return self.hits / self.accesses if self.accesses else 0.0

    def __add__(self, other: CacheStats) -> CacheStats:
        return CacheStats(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def as_dict(self) -> dict[str, float]:
        """Every counter plus ``hit_rate``, for loggers."""
        return {**{f.name: getattr(self, f.name) for f in fields(self)}, "hit_rate": self.hit_rate}


def resolve_count(value: int | float, total: int, name: str, minimum: int = 0, where: str = "") -> int:
    """An int count in ``[minimum, total]``, or a float fraction in ``(0, 1]`` of ``total`` (rounded up).

    ``name`` is the argument's name in errors, ``where`` what it belongs to (e.g. ``"MoE layer 1"``).
    """
    prefix = f"{where}: " if where else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{prefix}{name} must be an int count or a float fraction, got {name}={value!r}")
    if isinstance(value, numbers.Integral):
        if not minimum <= value <= total:
            raise ValueError(f"{prefix}{name} must be in [{minimum}, {total}] (the layer's experts), got {name}={value}")
        return int(value)
    if not 0 < value <= 1:
        raise ValueError(f"{prefix}{name} as a fraction must be in (0, 1], got {name}={value}")
    return max(minimum, math.ceil(value * total))


class ExpertCache:
    """``capacity`` device slots for the experts of one layer, filled from ``store``.

    Args:
        store: where the experts live (see :mod:`moe_lightning.inference.offload.store`).
        capacity: slots; an int in ``[1, E]`` (a larger int is clamped to E), or a fraction in ``(0, 1]`` of E,
            rounded up.
        policy: ``"lru"`` or ``"lfu"`` (see the module docstring).
        pinned: experts loaded up front and never evicted; they must leave at least one slot free unless they are
            all the experts.
        device: where the slots live; :meth:`to` moves them (the cache then starts empty again, pinned reloaded).
        name: how errors name this cache (e.g. ``"MoE layer 2"``).
    """

    def __init__(
        self,
        store: ExpertStore,
        capacity: int | float,
        policy: EvictionPolicy = "lru",
        pinned: Iterable[int] = (),
        device: torch.device | str | None = None,
        name: str = "expert cache",
    ) -> None:
        check_policy(policy)
        self.capacity = resolve_capacity(capacity, store.num_experts, name)
        self.pinned = check_pinned(pinned, store.num_experts, self.capacity, name)
        self.store = store
        self.policy = policy
        self.name = name
        self.device: torch.device | None = None
        self._last_used_E = [0] * store.num_experts
        self._frequency_E = [0] * store.num_experts
        self._clock = 0
        self._stats = CacheStats()
        self._pending_timings: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.to(device if device is not None else "cpu")

    # ---- shape ---------------------------------------------------------------------------------------------

    @property
    def num_experts(self) -> int:
        return self.store.num_experts

    @property
    def dim(self) -> int:
        return self.store.dim

    @property
    def free_capacity(self) -> int:
        """Slots available to experts that are not pinned."""
        return self.capacity - len(self.pinned)

    @property
    def resident(self) -> dict[int, int]:
        """Resident expert -> its slot (a copy)."""
        return dict(self._slot_of)

    def is_resident(self, expert: int) -> bool:
        return expert in self._slot_of

    # ---- device --------------------------------------------------------------------------------------------

    def to(self, device: torch.device | str) -> ExpertCache:
        """Put the slots on ``device`` (no-op if already there); a move empties the cache and reloads the pinned."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device == self.device:
            return self
        if self.device is not None and self.device.type == "cuda":
            self._copy_stream.synchronize()  # no copy may still write into the slots being dropped
        self.device = device
        store = self.store
        self.w_in_SDH = torch.empty(self.capacity, store.dim, store.input_width, dtype=store.dtype, device=device)
        self.w_down_SFD = torch.empty(self.capacity, store.hidden_dim, store.dim, dtype=store.dtype, device=device)
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._ready_S: list[torch.cuda.Event | None] = [None] * self.capacity
        self._staging_S: list[tuple[Tensor, Tensor] | None] = [None] * self.capacity
        self._expert_in_S: list[int | None] = [None] * self.capacity
        self._slot_of: dict[int, int] = {}
        self._prefetched: set[int] = set()
        for slot, expert in enumerate(self.pinned):
            self._load(expert, slot)
        return self

    # ---- demand --------------------------------------------------------------------------------------------

    def plan(self, experts: Sequence[int]) -> list[list[int]]:
        """Split distinct ``experts`` into chunks that :meth:`slots_for` can hold at once, fewest loads first.

        The first chunk takes every pinned and already-resident expert plus as many missing ones as the remaining
        free slots hold; the other missing experts follow in chunks of :attr:`free_capacity`. Each chunk is sorted.
        """
        experts = self._check_request(experts)
        pinned = set(self.pinned)
        resident = [e for e in experts if e in self._slot_of and e not in pinned]
        missing = [e for e in experts if e not in self._slot_of]
        room = self.free_capacity - len(resident)
        chunks = [sorted([e for e in experts if e in pinned] + resident + missing[:room])]
        missing = missing[room:]  # empty when every expert is pinned (free_capacity 0)
        if missing:
            chunks += [missing[i : i + self.free_capacity] for i in range(0, len(missing), self.free_capacity)]
        return [chunk for chunk in chunks if chunk]

    def slots_for(self, experts: Sequence[int]) -> list[int]:
        """Make ``experts`` (distinct, fitting the cache at once: see :meth:`plan`) resident; return their slots.

        Hits are recorded first, in the given order, then misses are loaded in the given order, each evicting (if
        no slot is free) the policy's victim among the resident experts that are neither pinned nor requested.
        """
        experts = self._check_request(experts)
        requested = set(experts)
        unpinned = len(requested - set(self.pinned))
        if unpinned > self.free_capacity:
            raise ValueError(
                f"{self.name}: {unpinned} unpinned experts {sorted(requested - set(self.pinned))} do not fit the "
                f"{self.free_capacity} free slots (capacity={self.capacity}, pinned={self.pinned}); split them "
                f"with plan()"
            )
        for expert in experts:
            if expert in self._slot_of:
                self._stats.hits += 1
                if expert in self._prefetched:
                    self._prefetched.discard(expert)
                    self._stats.prefetch_hits += 1
                self._touch(expert, demand=True)
        for expert in experts:
            if expert not in self._slot_of:
                self._stats.misses += 1
                self._load(expert, self._claim_slot(requested))
                self._touch(expert, demand=True)
        return [self._slot_of[e] for e in experts]

    def wait_for(self, slots: Iterable[int]) -> None:
        """Make the current (compute) stream wait until ``slots`` are loaded; nothing to do off CUDA."""
        if self._copy_stream is None:
            return
        stream = torch.cuda.current_stream(self.device)
        for slot in slots:
            ready = self._ready_S[slot]
            if ready is not None:
                stream.wait_event(ready)

    # ---- prefetch ------------------------------------------------------------------------------------------

    def prefetch(self, experts: Sequence[int]) -> list[int]:
        """Start loading ``experts`` (most wanted first) that are not resident; return those it started.

        At most :attr:`free_capacity` unpinned experts are considered; a prefetch never evicts a pinned expert or
        one of ``experts``. Prefetched experts count as just used (LRU) but their frequency is untouched (LFU).
        """
        wanted = [e for e in dict.fromkeys(experts) if e not in self.pinned][: self.free_capacity]
        for expert in wanted:
            if not 0 <= expert < self.num_experts:
                raise ValueError(f"{self.name}: expert {expert} is outside [0, num_experts={self.num_experts})")
        started = []
        for expert in wanted:
            if expert in self._slot_of:
                continue
            self._load(expert, self._claim_slot(set(wanted)))
            self._touch(expert, demand=False)
            self._prefetched.add(expert)
            self._stats.prefetch_loads += 1
            started.append(expert)
        return started

    # ---- stats ---------------------------------------------------------------------------------------------

    @property
    def stats(self) -> CacheStats:
        """A snapshot of the counters; on CUDA this waits for the loads issued so far to time them."""
        self._settle_timings()
        return CacheStats(**{f.name: getattr(self._stats, f.name) for f in fields(CacheStats)})

    def reset_stats(self) -> None:
        """Zero the counters (residency, recency and frequencies are kept)."""
        self._settle_timings()  # so loads issued before the reset are not counted after it
        self._stats = CacheStats()

    def _settle_timings(self) -> None:
        for begin, end in self._pending_timings:
            end.synchronize()
            self._stats.load_seconds += begin.elapsed_time(end) / 1000
        self._pending_timings.clear()

    # ---- internals -----------------------------------------------------------------------------------------

    def _check_request(self, experts: Sequence[int]) -> list[int]:
        experts = [int(e) for e in experts]
        if len(set(experts)) != len(experts):
            raise ValueError(f"{self.name}: experts must be distinct, got {experts}")
        bad = [e for e in experts if not 0 <= e < self.num_experts]
        if bad:
            raise ValueError(f"{self.name}: experts {bad} are outside [0, num_experts={self.num_experts})")
        return experts

    def _touch(self, expert: int, demand: bool) -> None:
        self._clock += 1
        self._last_used_E[expert] = self._clock
        if demand:
            self._frequency_E[expert] += 1

    def _claim_slot(self, protected: set[int]) -> int:
        """A free slot, or the slot of the evicted policy victim among unpinned, unprotected residents."""
        for slot, expert in enumerate(self._expert_in_S):
            if expert is None:
                return slot
        candidates = [e for e in self._slot_of if e not in protected and e not in self.pinned]
        assert candidates, "plan()/slots_for() keep requests within the free slots"
        if self.policy == "lru":
            victim = min(candidates, key=lambda e: self._last_used_E[e])
        else:
            victim = min(candidates, key=lambda e: (self._frequency_E[e], self._last_used_E[e]))
        slot = self._slot_of.pop(victim)
        self._expert_in_S[slot] = None
        self._stats.evictions += 1
        if victim in self._prefetched:
            self._prefetched.discard(victim)
            self._stats.prefetch_unused += 1
        return slot

    def _load(self, expert: int, slot: int) -> None:
        started = time.perf_counter()
        w_in_DH, w_down_FD = self.store.get(expert)
        if self._copy_stream is None:
            self.w_in_SDH[slot].copy_(w_in_DH)
            self.w_down_SFD[slot].copy_(w_down_FD)
            self._stats.load_seconds += time.perf_counter() - started
        else:
            self._stats.load_seconds += time.perf_counter() - started  # the host read; the copy is timed below
            copy_stream = self._copy_stream
            # The compute stream's queued work may still read this slot's previous expert: copy after it.
            copy_stream.wait_stream(torch.cuda.current_stream(self.device))
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(copy_stream):
                begin.record(copy_stream)
                self.w_in_SDH[slot].copy_(w_in_DH, non_blocking=True)
                self.w_down_SFD[slot].copy_(w_down_FD, non_blocking=True)
                end.record(copy_stream)
            self._ready_S[slot] = end
            self._staging_S[slot] = (w_in_DH, w_down_FD)  # keep the host source alive while the copy runs
            self._pending_timings.append((begin, end))
        self._stats.bytes_loaded += w_in_DH.nbytes + w_down_FD.nbytes
        self._expert_in_S[slot] = expert
        self._slot_of[expert] = slot


def check_policy(policy: str) -> None:
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got policy={policy!r}")


def resolve_capacity(capacity: int | float, num_experts: int, name: str = "expert cache") -> int:
    """Slots for a layer of ``num_experts``: an int >= 1 (clamped to E), or a fraction in ``(0, 1]`` of E rounded up."""
    if isinstance(capacity, numbers.Integral) and not isinstance(capacity, bool):
        if capacity < 1:
            raise ValueError(f"{name}: capacity must be >= 1 slot, got capacity={capacity}")
        capacity = min(int(capacity), num_experts)
    return resolve_count(capacity, num_experts, "capacity", minimum=1, where=name)


def check_pinned(pinned: Iterable[int], num_experts: int, capacity: int, name: str = "expert cache") -> tuple[int, ...]:
    """The pinned experts as a tuple, refusing ids out of range, repeats, or so many that no slot is left free."""
    pinned = list(pinned)
    if any(isinstance(e, bool) or not isinstance(e, numbers.Integral) for e in pinned):
        raise TypeError(f"{name}: pinned experts must be ints, got {pinned}")
    pinned = [int(e) for e in pinned]
    bad = [e for e in pinned if not 0 <= e < num_experts]
    if bad:
        raise ValueError(f"{name}: pinned experts {bad} are outside [0, num_experts={num_experts})")
    if len(set(pinned)) != len(pinned):
        raise ValueError(f"{name}: pinned experts must be distinct, got {pinned}")
    if len(pinned) > capacity or (len(pinned) == capacity < num_experts):
        raise ValueError(
            f"{name}: {len(pinned)} pinned experts {pinned} leave no slot for the other {num_experts - len(pinned)} "
            f"experts with capacity={capacity}; pin fewer than capacity experts, or all {num_experts}"
        )
    return tuple(pinned)

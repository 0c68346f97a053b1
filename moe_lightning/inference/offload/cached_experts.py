"""CachedExperts: a drop-in for GroupedExperts whose weights live in a store and visit the device through a cache.

Called like :class:`GroupedExperts` (``experts(x_ND, tokens_per_expert_E)``, rows sorted by expert), it reads the
counts on the host (one sync, fine at inference), makes the experts that have rows resident in its
:class:`ExpertCache`, and runs the same kernels on the same rows as the module it replaced: one grouped GEMM per
projection over the slot tensors (rows reordered by slot when the slots are not in expert order; experts without
rows get empty groups), or the per-expert loop. On the CPU the output is bitwise equal to the GroupedExperts it
replaced; on CUDA equal up to the grouped GEMM's choice of tiles.

When more experts have rows than the cache has free slots (a long prefill), the experts are processed in chunks
(:meth:`ExpertCache.plan`): each chunk is loaded and computed before the next one's loads may evict it. Nothing
fails and nothing is allocated beyond the slots; the price is reloading experts that a chunk pushed out.

Inference only: the slots are overwritten in place, so no gradient can flow into the experts' weights.

Shape legend: N routed rows (sorted by expert), D model dim, E experts, S cache slots, F expert hidden dim,
H input-projection width.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from moe_lightning.experts.activations import Activation, activate, check_activation
from moe_lightning.experts.grouped import (
    IMPLEMENTATIONS,
    GroupedExperts,
    Implementation,
    compute_dtype,
    grouped_gemm_for,
    resolve_implementation,
)
from moe_lightning.inference.offload.cache import EvictionPolicy, ExpertCache
from moe_lightning.inference.offload.store import (
    ExpertStore,
    HostExpertStore,
    check_store_matches,
)


class CachedExperts(nn.Module):
    """The experts of one layer served from an :class:`ExpertCache`; holds no parameters.

    Args:
        cache: the device slots and the store behind them.
        activation: ``"swiglu"`` or ``"gelu"``, as in the replaced :class:`GroupedExperts`.
        implementation: ``"auto"``, ``"triton"``, ``"grouped_mm"`` or ``"loop"``, resolved exactly as
            :class:`GroupedExperts` does.
    """

    def __init__(self, cache: ExpertCache, activation: Activation = "swiglu", implementation: Implementation = "auto") -> None:
        super().__init__()
        check_activation(activation)
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got implementation={implementation!r}")
        self.cache = cache
        self.activation = activation
        self.implementation = implementation

    @classmethod
    def from_grouped(
        cls,
        experts: GroupedExperts,
        capacity: int | float,
        policy: EvictionPolicy = "lru",
        store: ExpertStore | None = None,
        pinned: tuple[int, ...] | list[int] = (),
        device: torch.device | str | None = None,
        name: str = "expert cache",
    ) -> CachedExperts:
        """Serve ``experts`` from ``store`` (default: a host copy of their weights) on ``device`` (default: theirs)."""
        store = HostExpertStore.from_experts(experts) if store is None else store
        check_store_matches(store, experts, name)
        device = experts.w_in_EDH.device if device is None else device
        cache = ExpertCache(store, capacity, policy, pinned, device, name)
        return cls(cache, experts.activation, experts.implementation)

    @property
    def num_experts(self) -> int:
        return self.cache.num_experts

    @property
    def dim(self) -> int:
        return self.cache.store.dim

    @property
    def hidden_dim(self) -> int:
        return self.cache.store.hidden_dim

    def extra_repr(self) -> str:
        cache = self.cache
        return (
            f"num_experts={cache.num_experts}, capacity={cache.capacity}, policy={cache.policy!r}, "
            f"pinned={list(cache.pinned)}, store={type(cache.store).__name__}, activation={self.activation!r}"
        )

    def forward(self, x_ND: Tensor, tokens_per_expert_E: Tensor) -> Tensor:
        cache = self.cache
        if tokens_per_expert_E.shape != (cache.num_experts,):
            raise ValueError(
                f"tokens_per_expert_E must have shape ({cache.num_experts},), got {tuple(tokens_per_expert_E.shape)}"
            )
        dtype = compute_dtype(x_ND)
        x_ND = x_ND.to(dtype)
        cache.to(x_ND.device)
        counts_E = tokens_per_expert_E.tolist()  # the host sync: which experts have rows
        if sum(counts_E) != x_ND.shape[0]:
            raise ValueError(f"tokens_per_expert_E sums to {sum(counts_E)} but x_ND has {x_ND.shape[0]} rows")
        starts_E = [0] * len(counts_E)
        for e in range(1, len(counts_E)):
            starts_E[e] = starts_E[e - 1] + counts_E[e - 1]
        active = [e for e, count in enumerate(counts_E) if count > 0]
        y_ND = x_ND.new_empty(x_ND.shape[0], cache.dim)
        for chunk in cache.plan(active):
            slots = cache.slots_for(chunk)
            cache.wait_for(slots)
            w_in_SDH, w_down_SFD = cache.w_in_SDH.to(dtype), cache.w_down_SFD.to(dtype)
            implementation = resolve_implementation(self.implementation, x_ND, w_in_SDH, w_down_SFD)
            if implementation != "loop":
                gemm = grouped_gemm_for(implementation)
                whole = len(chunk) == len(active) and slots == sorted(slots)
                if whole:  # slots in expert order: the rows are already in slot order
                    return self._grouped(gemm, x_ND, slots, chunk, counts_E, w_in_SDH, w_down_SFD)
                rows_n = torch.cat([
                    torch.arange(starts_E[e], starts_E[e] + counts_E[e]) for _, e in sorted(zip(slots, chunk))
                ]).to(x_ND.device)
                y_nD = self._grouped(gemm, x_ND[rows_n], slots, chunk, counts_E, w_in_SDH, w_down_SFD)
                y_ND.index_copy_(0, rows_n, y_nD)
            else:
                for slot, e in zip(slots, chunk):
                    rows = slice(starts_E[e], starts_E[e] + counts_E[e])
                    y_ND[rows] = activate(x_ND[rows] @ w_in_SDH[slot], self.activation) @ w_down_SFD[slot]
        return y_ND

    def _grouped(
        self, gemm: Callable[[Tensor, Tensor, Tensor], Tensor], x_nD: Tensor, slots: list[int], experts: list[int],
        counts_E: list[int], w_in_SDH: Tensor, w_down_SFD: Tensor,
    ) -> Tensor:
        """One grouped GEMM per projection over all slots; ``x_nD`` holds the experts' rows in slot order."""
        rows_per_slot_S = [0] * self.cache.capacity
        for slot, e in zip(slots, experts):
            rows_per_slot_S[slot] = counts_E[e]
        row_ends_S = torch.tensor(rows_per_slot_S, device=x_nD.device).cumsum(0).to(torch.int32)
        h_nH = gemm(x_nD, w_in_SDH, row_ends_S)
        return gemm(activate(h_nH, self.activation), w_down_SFD, row_ends_S)

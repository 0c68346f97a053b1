"""Build a model on the meta device, then give it values tensor by tensor, each rank only its own experts.

:func:`build_on_meta` runs any model constructor on the meta device (no memory) and records the aten ops of its
initialisation. :func:`materialize` then installs real tensors, from a :class:`TensorSource` (a checkpoint) where it
has them and by replaying the record for the rest, optionally keeping only experts ``[p * E / P, (p + 1) * E / P)``
of every :class:`MoELayer`'s :class:`GroupedExperts` (expert-parallel rank ``p`` of ``P``).

Replay reproduces the ordinary CPU build bit for bit: it draws every random op of the build, in the build's order,
from a generator started where the global CPU generator stood when the build began. Random draws that a rank does
not keep (other ranks' experts, weights that a later init overwrites) still run, in chunks of
:data:`CHUNK_ELEMENTS`, so that the stream stays in step: memory stays at the kept tensors plus one chunk, but every
rank spends the CPU time of drawing the whole model's random numbers once (110 s for olmoe-like-1b's 6.9B in
bf16 on one core; ``benchmarks/meta_init_memory.py``).
Chunking does not change the values: torch's CPU ``normal_`` and ``uniform_`` draw element after element, and
``normal_`` transforms 16 at a time, so chunks of a multiple of 16 (the tail merged into the last one) give the
whole tensor's numbers.

The record replays factories, in-place random and pointwise ops, views, and out-of-place ops on whole tensors.
A sliced (expert) tensor may only be made by factories and in-place random or pointwise ops on itself, which is
how initialisation works; anything else raises ``ValueError`` naming the tensor.

Shape legend: E experts of a layer, P expert-parallel ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

from moe_lightning.experts.grouped import GroupedExperts
from moe_lightning.layer import MoELayer

ModelT = TypeVar("ModelT", bound=nn.Module)

CHUNK_ELEMENTS = 1 << 22
"""Random numbers drawn per chunk when replaying a draw that is not (wholly) kept; a multiple of 16."""

_CHUNKABLE = {torch.ops.aten.normal_.default, torch.ops.aten.uniform_.default}
_FILLS = {torch.ops.aten.fill_.Scalar, torch.ops.aten.zero_.default}
_EMPTY = {torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default}


class TensorSource(Protocol):
    """Where :func:`materialize` reads values: a checkpoint keyed by the model's own ``state_dict`` names."""

    def names(self) -> Collection[str]:
        """The tensors it holds."""
        ...

    def load(self, name: str, experts: range | None = None) -> Tensor:
        """Tensor ``name``; with ``experts``, only those rows of its first (expert) dimension."""
        ...


@dataclass(frozen=True)
class _Ref:
    """A meta tensor in the record: its storage's index and its view of it."""

    storage: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int


@dataclass
class _Op:
    func: Any
    args: Any
    kwargs: Any
    writes: list[int]
    """Storages the op creates or mutates (views and reads are not writes)."""
    reads: list[int]
    new: list[_Ref]
    """Its outputs that own a new storage."""

    @property
    def is_random(self) -> bool:
        return torch.Tag.nondeterministic_seeded in self.func.tags


@dataclass
class InitRecord:
    """The initialisation of one :func:`build_on_meta` call; :func:`materialize` replays it."""

    rng_state: Tensor
    """The global CPU generator's state when the build began."""
    ops: list[_Op] = field(default_factory=list)
    storage_of: dict[int, int] = field(default_factory=dict)
    """``untyped_storage()._cdata`` of every recorded meta tensor -> its storage index."""
    storages: list[tuple[int, torch.dtype]] = field(default_factory=list)
    """Per storage index: its element count and dtype (those of the tensor that made it)."""
    keep_alive: list[Tensor] = field(default_factory=list)
    """Every recorded meta tensor, so that no storage address is reused while the record lives."""

    def ref(self, tensor: Tensor) -> _Ref | None:
        index = self.storage_of.get(tensor.untyped_storage()._cdata)
        if index is None:
            return None
        return _Ref(index, tuple(tensor.shape), tuple(tensor.stride()), tensor.storage_offset())

    def add_storage(self, tensor: Tensor) -> _Ref:
        self.storage_of[tensor.untyped_storage()._cdata] = len(self.storages)
        self.storages.append((tensor.untyped_storage().nbytes() // tensor.element_size(), tensor.dtype))
        return self.ref(tensor)


class _Recorder(TorchDispatchMode):
    def __init__(self, record: InitRecord) -> None:
        super().__init__()
        self.record = record

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
        outputs = [t for t in tree_leaves(out) if isinstance(t, Tensor)]
        if not any(t.is_meta for t in inputs + outputs):
            if torch.Tag.nondeterministic_seeded in func.tags:
                raise ValueError(
                    f"{func} ran on a {outputs[0].device if outputs else 'non-meta'} tensor during build_on_meta: it "
                    "draws from the global generator out of the ordinary build's order; build every tensor on meta"
                )
            return out
        if kwargs.get("generator") is not None:
            raise ValueError(f"{func} was given its own generator during build_on_meta; replay draws from one stream")
        self._record(func, args, kwargs, inputs, outputs)
        return out

    def _record(self, func, args, kwargs, inputs: list[Tensor], outputs: list[Tensor]) -> None:
        record = self.record
        known = {t.untyped_storage()._cdata for t in inputs if t.is_meta}
        new = []
        for tensor in outputs:
            address = tensor.untyped_storage()._cdata
            if tensor.is_meta and address not in known and address not in record.storage_of:
                new.append(record.add_storage(tensor))
        record.keep_alive += [t for t in inputs + outputs if t.is_meta]
        writes = [ref.storage for ref in new]
        for index, argument in enumerate(func._schema.arguments):
            value = args[index] if index < len(args) else kwargs.get(argument.name)
            if argument.alias_info is not None and argument.alias_info.is_write and isinstance(value, Tensor):
                writes.append((record.ref(value) or _unknown(func)).storage)
        as_refs = lambda x: (record.ref(x) or _unknown(func)) if isinstance(x, Tensor) and x.is_meta else x  # noqa: E731
        ref_args, ref_kwargs = tree_map(as_refs, args), tree_map(as_refs, kwargs)
        reads = [leaf.storage for leaf in tree_leaves((ref_args, ref_kwargs)) if isinstance(leaf, _Ref)]
        if writes:  # views need no replay: every reference carries its own view of the storage
            record.ops.append(_Op(func, ref_args, ref_kwargs, writes, reads, new))


def _unknown(func) -> Any:
    raise ValueError(f"{func} used a meta tensor made outside build_on_meta; it cannot be replayed")


def build_on_meta(build: Callable[[], ModelT]) -> tuple[ModelT, InitRecord]:
    """``build()`` on the meta device (no memory allocated), and the record of its initialisation.

    Leaves the global generator untouched (the ordinary build advances it).
    """
    record = InitRecord(rng_state=torch.get_rng_state())
    with torch.device("meta"), _Recorder(record):
        model = build()
    if not torch.equal(torch.get_rng_state(), record.rng_state):
        raise ValueError(
            "the build function seeded or drew from the global generator itself; replay would start from the wrong "
            "state: seed before build_on_meta"
        )
    return model, record


def expert_rows(model: nn.Module, ep_rank: int = 0, ep_size: int = 1) -> dict[str, range]:
    """Per expert parameter of every MoE layer's :class:`GroupedExperts`: rank ``ep_rank``'s experts of ``ep_size``."""
    if not 0 <= ep_rank < ep_size:
        raise ValueError(f"ep_rank must be in [0, ep_size), got ep_rank={ep_rank} and ep_size={ep_size}")
    rows = {}
    for layer_name, layer in model.named_modules():
        if not (isinstance(layer, MoELayer) and isinstance(layer.experts, GroupedExperts)):
            continue
        num_experts = layer.experts.num_experts
        if num_experts % ep_size != 0:
            raise ValueError(
                f"expert_parallel_size={ep_size} must divide the number of experts, got num_experts={num_experts} "
                f"in {layer_name!r}"
            )
        local = num_experts // ep_size
        prefix = f"{layer_name}.experts." if layer_name else "experts."
        for name, _ in layer.experts.named_parameters(recurse=False):
            rows[prefix + name] = range(ep_rank * local, (ep_rank + 1) * local)
    return rows


def materialize(
    model: nn.Module,
    record: InitRecord | None = None,
    source: TensorSource | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    ep_rank: int = 0,
    ep_size: int = 1,
) -> None:
    """Replace every meta parameter and buffer of ``model`` (built by :func:`build_on_meta`) by a real tensor.

    Values come from ``source`` for the names it holds and from ``record`` (the build's own initialisation) for
    the rest. Every MoE layer keeps only experts ``[p * E / P, (p + 1) * E / P)`` with ``p = ep_rank``,
    ``P = ep_size``. Everything is checked before anything is read: a name neither can provide, or a source name the
    model lacks, raises ``ValueError``.

    Args:
        model: the meta model; changed in place.
        record: what :func:`build_on_meta` returned with it; None: every tensor must come from ``source``.
        source: a checkpoint, see :class:`TensorSource`.
        device: where the tensors go.
        dtype: cast floating-point tensors to it; None: the dtypes the model was built with.
        ep_rank, ep_size: which experts to keep.
    """
    rows = expert_rows(model, ep_rank, ep_size)
    if ep_size == 1:
        rows = {}  # every expert: built whole, by any initialisation
    wanted = {name: t for name, t in _named_tensors(model) if t.is_meta}
    from_source = set(source.names()) if source is not None else set()
    unexpected = sorted(from_source - {name for name, _ in _named_tensors(model)})
    if unexpected:
        raise ValueError(f"the source holds tensors the model does not have: {unexpected[:8]} ({len(unexpected)} in all)")
    replayed = {name: t for name, t in wanted.items() if name not in from_source}
    if replayed and record is None:
        raise ValueError(f"no record to initialise tensors the source lacks: {sorted(replayed)[:8]} ({len(replayed)} in all)")
    values = _Replay(record, replayed, rows, dtype).run() if replayed else {}
    for name in sorted(wanted.keys() & from_source):
        values[name] = _checked(source.load(name, rows.get(name)), wanted[name], rows.get(name), name)
    new: dict[int, Tensor] = {}
    for module_name, module in model.named_modules():
        for kind in ("_parameters", "_buffers"):
            for name, old in getattr(module, kind).items():
                if old is None or not old.is_meta:
                    continue
                if id(old) not in new:
                    full_name = f"{module_name}.{name}" if module_name else name
                    value = values.pop(full_name).to(device=device, dtype=_target_dtype(old, dtype))
                    new[id(old)] = nn.Parameter(value, old.requires_grad) if kind == "_parameters" else value
                getattr(module, kind)[name] = new[id(old)]


def _named_tensors(model: nn.Module) -> list[tuple[str, Tensor]]:
    """Parameters and buffers, each once (a tied weight under its first name)."""
    return [*model.named_parameters(), *model.named_buffers()]


def _target_dtype(tensor: Tensor, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype


def _checked(value: Tensor, meta: Tensor, rows: range | None, name: str) -> Tensor:
    expected = (len(rows), *meta.shape[1:]) if rows is not None else tuple(meta.shape)
    if tuple(value.shape) != expected:
        raise ValueError(f"source tensor {name!r} has shape {tuple(value.shape)}, the model needs {expected}")
    return value



class _Replay:
    """One pass over a record's ops computing the requested tensors, of expert tensors only the requested rows."""

    def __init__(
        self, record: InitRecord, wanted: Mapping[str, Tensor], rows: Mapping[str, range], dtype: torch.dtype | None
    ) -> None:
        self.record = record
        self.refs: dict[str, _Ref] = {}
        for name, tensor in wanted.items():
            ref = record.ref(tensor)
            if ref is None:
                raise ValueError(f"{name!r} was not made inside build_on_meta, so it cannot be replayed")
            self.refs[name] = ref
        self.sliced = {self.refs[name].storage: (name, rows[name]) for name in wanted if name in rows}
        self.dtype = dtype
        self.values: dict[int, Tensor] = {}
        self.scratch: dict[torch.dtype, Tensor] = {}
        self.needed = self._needed_storages()
        kept = [i for i, op in enumerate(record.ops) if op.is_random and self._kept(op)]
        self.draws_end = kept[-1] + 1 if kept else 0  # random ops after the last kept one need not run

    def run(self) -> dict[str, Tensor]:
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self.record.rng_state)
            for index, op in enumerate(self.record.ops):
                if any(s in self.sliced for s in op.writes):
                    self._run_sliced(op)
                elif any(s in self.needed for s in op.writes):
                    self._run_whole(op)
                elif op.is_random and index < self.draws_end:
                    self._draw(op, keep=None)
        return {name: self._tensor(ref) for name, ref in self.refs.items()}

    def _kept(self, op: _Op) -> bool:
        return any(s in self.needed or s in self.sliced for s in op.writes)

    def _needed_storages(self) -> set[int]:
        """The storages computed whole: the requested ones outside experts and everything they are computed from."""
        needed = {ref.storage for ref in self.refs.values() if ref.storage not in self.sliced}
        for op in reversed(self.record.ops):
            if any(s in self.sliced for s in op.writes):
                self._check_row_local(op)
            elif any(s in needed for s in op.writes):
                needed.update(op.reads)
        both = needed & self.sliced.keys()
        if both:
            names = sorted(self.sliced[s][0] for s in both)
            raise ValueError(f"other tensors are computed from the experts of {names}: they cannot be built by slices")
        return needed

    def _check_row_local(self, op: _Op) -> None:
        name = self.sliced[op.writes[0]][0]
        factory = not op.reads and op.func in _EMPTY
        in_place = (
            len(op.writes) == 1 and set(op.reads) == set(op.writes) and self._whole(op.args[0])
            and (op.is_random or op.func in _FILLS or torch.Tag.pointwise in op.func.tags)
        )
        if not (factory or in_place):
            raise ValueError(
                f"cannot build a slice of the experts of {name!r}: its initialisation runs {op.func}, which is neither "
                "torch.empty nor an in-place random or pointwise op on the whole tensor"
            )

    def _whole(self, ref: Any) -> bool:
        """Whether ``ref`` views its whole storage, contiguous."""
        return (
            isinstance(ref, _Ref) and ref.offset == 0 and _numel(ref.size) == self.record.storages[ref.storage][0]
            and ref.stride == torch.empty(ref.size, device="meta").stride()
        )

    def _tensor(self, ref: _Ref) -> Tensor:
        if ref.storage in self.sliced:
            return self.values[ref.storage]
        return self.values[ref.storage].as_strided(ref.size, ref.stride, ref.offset)

    def _real(self, x: Any) -> Any:
        if isinstance(x, _Ref):
            return self._tensor(x)
        if isinstance(x, torch.device) and x.type == "meta":
            return torch.device("cpu")
        return x

    def _run_whole(self, op: _Op) -> None:
        out = op.func(*tree_map(self._real, op.args), **tree_map(self._real, op.kwargs))
        for ref, tensor in zip(op.new, [t for t in tree_leaves(out) if isinstance(t, Tensor)]):
            self.values[ref.storage] = tensor

    def _run_sliced(self, op: _Op) -> None:
        storage = op.writes[0]
        rows = self.sliced[storage][1]
        if not op.reads:  # torch.empty: make the kept rows only
            dtype = self.record.storages[storage][1]
            if self.dtype is not None and dtype.is_floating_point:
                dtype = self.dtype  # the kept rows are held in the target dtype: draws are cast as they are copied
            self.values[storage] = torch.empty((len(rows), *op.new[0].size[1:]), dtype=dtype)
        elif op.is_random:
            self._draw(op, keep=rows)
        else:
            op.func(self.values[storage], *op.args[1:], **op.kwargs)

    def _scratch(self, numel: int, dtype: torch.dtype) -> Tensor:
        """One buffer per dtype for the draws, grown as needed: a fresh chunk per draw fragments the heap (glibc
        keeps freed chunks of this size), and the peak grows well past the kept tensors."""
        buffer = self.scratch.get(dtype)
        if buffer is None or buffer.numel() < numel:
            buffer = self.scratch[dtype] = torch.empty(numel, dtype=dtype)
        return buffer

    def _draw(self, op: _Op, keep: range | None) -> None:
        """Run random op ``op`` over its whole tensor (in chunks where that keeps the values, see :data:`_CHUNKABLE`)
        and copy its rows ``keep`` into the storage's kept rows; ``keep=None``: only advance the stream."""
        if not op.reads:  # a random factory of a tensor nobody keeps (kept ones are refused before)
            op.func(*tree_map(self._real, op.args), **tree_map(self._real, op.kwargs))
            return
        ref = op.args[0]
        numel, dtype = self.record.storages[ref.storage]
        row_numel = numel // ref.size[0] if ref.size[0] else 0
        first, last = (keep.start * row_numel, keep.stop * row_numel) if keep is not None else (0, 0)
        chunk_numel = CHUNK_ELEMENTS if op.func in _CHUNKABLE else numel
        scratch = self._scratch(min(numel, chunk_numel + 16), dtype)
        start = 0
        while start < numel:
            stop = numel if numel - start <= chunk_numel + 16 else start + chunk_numel
            chunk = op.func(scratch[: stop - start], *op.args[1:], **op.kwargs)
            lo, hi = max(start, first), min(stop, last)
            if lo < hi:
                self.values[ref.storage].view(-1)[lo - first : hi - first] = chunk[lo - start : hi - start]
            start = stop



def _numel(size: tuple[int, ...]) -> int:
    numel = 1
    for s in size:
        numel *= s
    return numel

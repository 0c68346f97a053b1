"""Dense parameters sharded with FSDP2 ``fully_shard`` while the experts stay sharded by expert parallelism.

Which modules become FSDP units (each gathers its parameters before its forward and reduce-scatters their
gradients after its backward):

- *blocks*: the elements of every outermost ``nn.ModuleList`` of the model (not looking inside MoE layers or
  inside another list), e.g. ``model.blocks.0``, ``model.blocks.1`` of :class:`MoETransformer`;
- *roots*: the direct children of the LightningModule that still hold dense parameters outside the blocks
  (``model`` for :class:`MoELightningModule`, which owns the embedding, final norm and head). Children rather
  than the LightningModule itself, because a ``training_step`` may call ``self.model(x)`` without going
  through ``LightningModule.forward``, where the hooks of a root on the LightningModule would run. If the
  LightningModule owns dense parameters itself, it is the single root instead (its ``forward`` must then run).

Expert parameters are ``ignored_params`` of every unit: FSDP neither shards nor reduces them. They stay plain
tensors beside the dense ``DTensor``s, and the multi-tensor (``foreach``) and ``fused`` optimizer kernels refuse
lists that mix the two: :func:`step_mixed_groups_per_tensor` turns them off where a param group mixes them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

from moe_lightning.layer import MoELayer

DenseParallel = Literal["replicate", "fully_shard"]
DENSE_PARALLEL_MODES: tuple[str, ...] = ("replicate", "fully_shard")


def check_dense_parallel(dense_parallel: object) -> None:
    if dense_parallel not in DENSE_PARALLEL_MODES:
        raise ValueError(f"dense_parallel must be one of {DENSE_PARALLEL_MODES}, got dense_parallel={dense_parallel!r}")


def shard_units(module: nn.Module, ignored: Iterable[nn.Parameter] = ()) -> list[str]:
    """Names (relative to ``module``; ``""`` is ``module``) of the modules to ``fully_shard``, blocks before roots.

    Raises ``ValueError`` if one parameter would be managed by two units (e.g. weights tied between two
    direct children of the LightningModule).
    """
    ignored_ids = {id(p) for p in ignored}
    blocks: list[str] = []
    _collect_blocks(module, "", ignored_ids, blocks)
    in_blocks = {id(p) for name in blocks for p in module.get_submodule(name).parameters()}
    if _dense_ids(module.parameters(recurse=False), ignored_ids):
        roots = [""]
    else:
        roots = [
            name for name, child in module.named_children()
            if _dense_ids(child.parameters(), ignored_ids) - in_blocks
        ]
    units = blocks + roots
    _check_disjoint(module, units, ignored_ids)
    return units


def shard_dense(
    module: nn.Module, mesh: DeviceMesh, expert_params: Iterable[nn.Parameter],
    mp_policy: MixedPrecisionPolicy | None = None,
) -> list[FSDPModule]:
    """Apply ``fully_shard`` over the 1-D ``mesh`` to the units of :func:`shard_units`; returns them, blocks first.

    Every unit reshards after its forward, so between steps (and after an evaluation forward) every dense
    parameter is its sharded ``DTensor``. From torch 2.13, a dense parameter unused on some rank gets a zero
    gradient there (the reduce-scatter needs every rank), and one unused on every rank zeros instead of ``None``;
    older torch has no such switch, and a dense parameter unused on some ranks only would desynchronise them.
    """
    ignored = set(expert_params)
    units = []
    for name in shard_units(module, ignored):
        unit = fully_shard(
            module.get_submodule(name), mesh=mesh, reshard_after_forward=True, ignored_params=ignored,
            mp_policy=mp_policy or MixedPrecisionPolicy(),
        )
        if hasattr(unit, "set_reduce_scatter_unused_params"):  # torch >= 2.13; before, every rank must use them all
            unit.set_reduce_scatter_unused_params(True, recurse=False)
        units.append(unit)
    return units


def step_mixed_groups_per_tensor(optimizer: Optimizer) -> list[dict[str, Any]]:
    """Set ``foreach`` and ``fused`` to False in the param groups holding both ``DTensor`` and plain parameters.

    Those kernels take one list per device and dtype, and DTensor refuses a list that mixes the two kinds. The
    per-tensor update computes the same step, one kernel per tensor. Returns, per group, the flags it had
    (empty where left alone), so that checkpoints can keep the user's settings.
    """
    originals = []
    for group in optimizer.param_groups:
        flags: dict[str, Any] = {}
        if len({isinstance(p, DTensor) for p in group["params"]}) > 1:
            flags = {key: group[key] for key in ("foreach", "fused") if key in group}
            group.update(dict.fromkeys(flags, False))
        originals.append(flags)
    return originals


def _dense_ids(params: Iterable[nn.Parameter], ignored_ids: set[int]) -> set[int]:
    return {id(p) for p in params if id(p) not in ignored_ids}


def _collect_blocks(module: nn.Module, prefix: str, ignored_ids: set[int], blocks: list[str]) -> None:
    for name, child in module.named_children():
        if isinstance(child, MoELayer):
            continue
        if isinstance(child, nn.ModuleList):
            blocks += [
                f"{prefix}{name}.{index}" for index, block in child.named_children()
                if _dense_ids(block.parameters(), ignored_ids)
            ]
        else:
            _collect_blocks(child, f"{prefix}{name}.", ignored_ids, blocks)


def _check_disjoint(module: nn.Module, units: list[str], ignored_ids: set[int]) -> None:
    """Each dense parameter belongs to the innermost unit above a module that registers it."""
    unit_set = set(units)
    owner: dict[int, str] = {}
    names: dict[int, str] = {}
    for module_name, submodule in module.named_modules(remove_duplicate=False):
        parts = module_name.split(".") if module_name else []
        unit = next(
            (".".join(parts[:i]) for i in range(len(parts), -1, -1) if ".".join(parts[:i]) in unit_set), None
        )
        for param_name, param in submodule.named_parameters(recurse=False):
            if id(param) in ignored_ids or unit is None:
                continue
            full_name = f"{module_name}.{param_name}" if module_name else param_name
            if owner.setdefault(id(param), unit) != unit:
                raise ValueError(
                    f"dense_parallel='fully_shard' cannot shard a parameter shared by two FSDP units: "
                    f"{names[id(param)]!r} (unit {owner[id(param)]!r}) is also {full_name!r} (unit {unit!r})"
                )
            names.setdefault(id(param), full_name)

"""Between sharded ``DTensor`` parameters (FSDP2) and the full tensors that checkpoints hold.

Checkpoints store every dense tensor whole, whatever the dense layout of the run that wrote them, so a
checkpoint saved with ``dense_parallel="fully_shard"`` loads with ``"replicate"`` (or in one process) and
the other way round. Gathering is a collective: every rank calls these functions with the same dicts.
Loading slices the full tensor locally (each rank has read the whole checkpoint): no communication.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.optim import Optimizer


def full_tensors(state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` with every ``DTensor`` gathered to a full CPU tensor (a collective, in ``state``'s order).

    A ``DTensor`` listed twice (tied weights) is gathered once.
    """
    gathered: dict[int, Tensor] = {}
    out = {}
    for key, value in state.items():
        if isinstance(value, DTensor):
            if id(value) not in gathered:
                gathered[id(value)] = value.full_tensor().cpu()
            value = gathered[id(value)]
        out[key] = value
    return out


def full_optimizer_state(optimizer_state: Mapping[str, Any]) -> dict[str, Any]:
    """An ``Optimizer.state_dict()`` with its ``DTensor`` moments gathered; new dicts, the live state untouched."""
    state = {param_id: full_tensors(param_state) for param_id, param_state in optimizer_state["state"].items()}
    return {**optimizer_state, "state": state}


def shard_like(full: Tensor, like: DTensor) -> DTensor:
    """This rank's shard of ``full``, placed as ``like`` (no communication: ``full`` is the same on every rank)."""
    full = full.to(device=like.device, dtype=like.dtype)
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)


def sharded_state_dict(module: nn.Module, state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """``state_dict`` with each full tensor whose counterpart in ``module`` is a ``DTensor`` cut to its shard."""
    own = module.state_dict()
    out = dict(state_dict)
    for key, value in state_dict.items():
        current = own.get(key)
        if isinstance(current, DTensor) and isinstance(value, Tensor) and not isinstance(value, DTensor):
            _check_shape(key, value, current)
            out[key] = shard_like(value, current)
    return out


def sharded_optimizer_state(optimizer: Optimizer, optimizer_state: Mapping[str, Any]) -> dict[str, Any]:
    """``optimizer_state`` (full tensors) with the moments of ``DTensor`` parameters cut like their parameter.

    Scalars (Adam's ``step``) and tensors of another shape are kept as they are.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for param_id, param_state in optimizer_state["state"].items():
        param = params[param_id]
        if isinstance(param, DTensor):
            param_state = {
                key: shard_like(value, param)
                if isinstance(value, Tensor) and not isinstance(value, DTensor) and value.dim() > 0
                and value.shape == param.shape else value
                for key, value in param_state.items()
            }
        state[param_id] = param_state
    return {**optimizer_state, "state": state}


def _check_shape(key: str, value: Tensor, current: DTensor) -> None:
    if value.shape != current.shape:
        raise ValueError(
            f"checkpoint tensor {key!r} has shape {tuple(value.shape)} but the model's has {tuple(current.shape)}"
        )

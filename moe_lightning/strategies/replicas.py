"""Keep replicas equal: one initial broadcast, then gradients averaged so every rank steps like one process.

Gradient scaling. Each of the W ranks optimises the mean loss ``L_r`` of its own tokens; the one-process
run on the global batch optimises ``L = mean_r L_r``. A dense parameter's local gradient is ``dL_r``, so the
mean over all W ranks is ``dL``. An expert's local gradient already sums ``dL_r`` over the ranks of its
expert-parallel group (the all-to-all backward brings their contributions home), so summing over its
data-parallel replicas gives ``sum_r dL_r`` over all W ranks, and dividing by W gives ``dL`` again.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
import torch.distributed as dist
from torch import Tensor, nn


@torch.no_grad()
def broadcast_module_states(
    module: nn.Module, skip: Collection[str] = (), only: Collection[str] | None = None,
    group: dist.ProcessGroup | None = None,
) -> None:
    """Copy the parameters and buffers (those in ``only`` if given, none in ``skip``) from the first rank of
    ``group`` (None: global rank 0) to its other ranks."""
    src = 0 if group is None else dist.get_global_rank(group, 0)
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if name not in skip and (only is None or name in only):
            dist.broadcast(tensor.data, src=src, group=group)


class GradientReducer:
    """All-reduces dense gradients over every rank and expert gradients over their data-parallel group.

    With ``reduce_dense=False`` it leaves the dense gradients alone (FSDP reduce-scatters them, see
    :mod:`moe_lightning.strategies.dense`) and reduces only the experts'.

    Call :meth:`reduce` once per optimizer step, after the last backward of the step (with gradient
    accumulation, the local gradients are summed first and reduced once).

    Args:
        module: the model whose ``.grad``s are reduced.
        expert_names: names (in ``module``) of the expert-sharded parameters.
        data_parallel_group: the ranks that hold the same experts.
        reduce_dense: whether to all-reduce the dense gradients too.
    """

    def __init__(
        self, module: nn.Module, expert_names: list[str], data_parallel_group: dist.ProcessGroup,
        reduce_dense: bool = True,
    ) -> None:
        expert_set = set(expert_names)
        named = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
        self.dense = [p for name, p in named if name not in expert_set] if reduce_dense else []
        self.experts = [p for name, p in named if name in expert_set]
        self.data_parallel_group = data_parallel_group

    @torch.no_grad()
    def reduce(self) -> None:
        world_size = dist.get_world_size()
        _all_reduce_gradients(self.dense, None, world_size, keep_unused=False)
        # A slice whose experts got no row anywhere still has a zero gradient in one process, where it is part
        # of a 3-D weight that some other expert used.
        _all_reduce_gradients(self.experts, self.data_parallel_group, world_size, keep_unused=True)


def _all_reduce_gradients(
    params: list[nn.Parameter], group: dist.ProcessGroup | None, divisor: int, keep_unused: bool
) -> None:
    """Sum the gradients over ``group`` in one flat buffer per dtype, then divide by ``divisor``.

    A rank where a parameter got no gradient contributes zeros; one flag per parameter counts the ranks
    that had one, so a parameter unused on every rank keeps ``grad=None`` as it would in one process
    (unless ``keep_unused``: then it gets zeros).
    """
    by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
    for p in params:
        by_dtype.setdefault(p.dtype, []).append(p)
    for bucket in by_dtype.values():
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in bucket]
        flags = torch.tensor([p.grad is not None for p in bucket], dtype=bucket[0].dtype, device=bucket[0].device)
        flat = torch.cat([g.reshape(-1) for g in grads] + [flags])
        dist.all_reduce(flat, group=group)
        values: list[Tensor] = list(flat[: -len(bucket)].split([p.numel() for p in bucket]))
        for p, value, flag in zip(bucket, values, flat[-len(bucket):].tolist()):
            if flag > 0 or keep_unused:
                p.grad = value.view_as(p).div_(divisor)

"""DeepSpeed's engine for a model whose MoE layers are moe_lightning's.

DeepSpeed finds expert parameters by their marks (``allreduce=False`` and ``group_name``, see
:func:`mark_expert_parameters`) wherever it handles them: the initial broadcast, the ZeRO-1/2 partitions and gradient
reduction over the expert-data-parallel group, the optimizer's ``moe`` groups. It switches that handling on, though,
only when the model contains its own ``deepspeed.moe.layer.MoE`` class; :class:`ExpertParallelEngine` switches it on
for ours. Imported only when a strategy builds an engine.
"""

from __future__ import annotations

from typing import Any

from deepspeed.runtime.config import DeepSpeedConfig
from deepspeed.runtime.engine import DeepSpeedEngine
from deepspeed.utils import groups
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.optim import Optimizer

from moe_lightning.layer import MoELayer


def expert_group_name(expert_parallel_size: int) -> str:
    """The name DeepSpeed-MoE gives the expert groups of one expert-parallel size."""
    return f"ep_size_{expert_parallel_size}"


def create_expert_groups(mesh: DeviceMesh) -> str:
    """Create DeepSpeed's expert-parallel and expert-data-parallel groups for the size of ``mesh["expert_parallel"]``
    and check they hold the same ranks as the mesh's (DeepSpeed's layout: consecutive ranks share experts, as in
    moe_lightning's ``(data_parallel, expert_parallel)`` mesh). Returns their name."""
    import torch.distributed as dist

    size = mesh["expert_parallel"].size()
    name = expert_group_name(size)
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(size)
    ours = [dist.get_process_group_ranks(mesh[dim].get_group()) for dim in ("expert_parallel", "data_parallel")]
    theirs = [
        dist.get_process_group_ranks(groups._get_expert_parallel_group(name)),
        dist.get_process_group_ranks(groups._get_expert_data_parallel_group(name)),
    ]
    assert ours == theirs, f"DeepSpeed's expert groups {theirs} are not the device mesh's {ours}"
    return name


def mark_expert_parameters(module: nn.Module, names: list[str], group_name: str) -> None:
    """Mark expert parameters as DeepSpeed-MoE does: no all-reduce over all ranks, reduced in group ``group_name``."""
    for name in names:
        param = module.get_parameter(name)
        param.allreduce = False
        param.group_name = group_name


def tag_expert_param_groups(optimizer: Optimizer) -> None:
    """Give the param groups holding expert parameters DeepSpeed-MoE's ``moe`` flag and their group's name.

    A group mixing expert and dense parameters is refused: ZeRO partitions each group over one process group.
    """
    for index, group in enumerate(optimizer.param_groups):
        names = {getattr(p, "group_name", None) if not getattr(p, "allreduce", True) else None for p in group["params"]}
        if len(names) > 1:
            raise ValueError(
                f"optimizer param group {index} mixes expert parameters (groups {sorted(n for n in names if n)}) with "
                "dense ones; build the optimizer from groups split by "
                "deepspeed.moe.utils.split_params_into_different_moe_groups_for_optimizer (MoELightningModule."
                "param_groups splits them), since ZeRO partitions the experts over their own data-parallel group"
            )
        (name,) = names or {None}
        if name is not None:
            group.update(moe=True, name=name)


def register_router_parameters(module: nn.Module) -> None:
    """Tell ZeRO-3 to gather each router's parameters around its MoE layer's forward and backward.

    ZeRO-3 gathers a module's parameters around that module's own forward, and again before its backward through
    hooks on the tensors it returns. A router reads its gate's weight without calling the gate (one GEMM in the
    router's precision) and returns a ``Routing``, not tensors, so neither happens for the router: the MoE layer,
    which returns its output tensor, fetches them instead.
    """
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter

    for layer in (m for m in module.modules() if isinstance(m, MoELayer)):
        for param in layer.router.parameters():
            register_external_parameter(layer, param)


class ExpertParallelEngine(DeepSpeedEngine):
    """A ``DeepSpeedEngine`` that treats the marked parameters as experts (see the module docstring)."""

    def _configure_distributed_model(self, model: nn.Module) -> None:
        super()._configure_distributed_model(model)
        self.has_moe_layers = True


def initialize_engine(
    model: nn.Module, optimizer: Optimizer | None, lr_scheduler: Any, config: dict[str, Any], experts: bool,
) -> DeepSpeedEngine:
    """What ``deepspeed.initialize`` does for a plain module whose process groups exist, with
    :class:`ExpertParallelEngine` where ``experts`` (marked expert parameters) is true."""
    engine_class = ExpertParallelEngine if experts else DeepSpeedEngine
    return engine_class(
        args=None, model=model, optimizer=optimizer, lr_scheduler=lr_scheduler,
        model_parameters=[p for p in model.parameters() if p.requires_grad], dist_init_required=False,
        config=config, config_class=DeepSpeedConfig(config),
    )

"""DeepSpeedExpertParallelStrategy: DeepSpeed's engine (ZeRO for the dense parameters) with moe_lightning's expert
parallelism (experts sharded over an expert-parallel group, tokens exchanged by all-to-all).

The W ranks form the same ``(data_parallel, expert_parallel)`` mesh as
:class:`~moe_lightning.strategies.ExpertParallelStrategy`, and the experts are placed by the same function
(:func:`~moe_lightning.strategies.sharding.place_experts`): each MoE layer keeps its slice and gets an
``AllToAllDispatcher``. The expert parameters are then marked as DeepSpeed-MoE marks its own (``allreduce=False``,
``group_name="ep_size_P"``), so DeepSpeed's engine handles them as it handles DeepSpeed-MoE experts:

- ZeRO stage 1 and 2: the dense parameters' optimizer state (and, at stage 2, gradients) are partitioned over all W
  ranks, the experts' over their W / P data-parallel replicas; expert gradients are summed over those replicas and
  divided by W, which is the one-process gradient (see :mod:`moe_lightning.strategies.replicas`).
- ZeRO stage 3 also partitions the dense parameters themselves; DeepSpeed supports that only for experts of its own
  AutoEP layers, so stage 3 runs with ``expert_parallel_size=1`` (experts replicated, partitioned like the rest).

Only the name of the backend differs from the native strategy; the model, routers, dispatch and configs are the same.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.nn import Module
from torch.optim import Optimizer
from typing_extensions import override

from moe_lightning.checkpoint import load_for_rank
from moe_lightning.checkpoint.sharded import local_slice
from moe_lightning.strategies.expert_parallel import Size, resolve_parallel_sizes
from moe_lightning.strategies.sharding import place_experts
from moe_lightning_deepspeed.checkpoint import (
    LIGHTNING_KEYS, TAG, is_deepspeed_checkpoint, read_expert_shards, save_expert_shard,
)

STAGES = (1, 2, 3)


class DeepSpeedExpertParallelStrategy(DeepSpeedStrategy):
    """DeepSpeed ZeRO for dense parameters, moe_lightning expert parallelism for the experts; CUDA or CPU.

    Use ``Trainer(strategy="deepspeed_moe")`` (ZeRO-2; ``deepspeed_moe_stage_1`` / ``_2`` / ``_3`` name the stage),
    YAML ``strategy: deepspeed_moe``, or an instance. On CPUs DeepSpeed must run its CPU accelerator (it picks it
    where there is no GPU; ``DS_ACCELERATOR=cpu`` forces it), with gloo.

    Args:
        stage: the ZeRO stage, 1, 2 or 3; ``None``: the config's ``zero_optimization.stage``, else 2.
        expert_parallel_size: P, the ranks sharing one copy of the experts; ``"auto"``: the world size (1 at stage 3).
        config: a DeepSpeed config (dict or JSON path); ``None``: Lightning's default for ``stage``. It must not set
            ``expert_parallel`` (DeepSpeed's AutoEP, which would replace our MoE layers) nor another stage than
            ``stage``.
        kwargs: the other arguments of Lightning's ``DeepSpeedStrategy``.
    """

    strategy_name = "deepspeed_moe"

    def __init__(
        self, stage: int | None = None, expert_parallel_size: Size = "auto",
        config: str | Path | dict[str, Any] | None = None, **kwargs: Any,
    ) -> None:
        if stage is not None and stage not in STAGES:
            raise ValueError(f"stage must be one of the ZeRO stages {STAGES}, got stage={stage!r}")
        if expert_parallel_size != "auto" and not (isinstance(expert_parallel_size, int) and expert_parallel_size >= 1):
            raise ValueError(f"expert_parallel_size must be 'auto' or an int >= 1, got {expert_parallel_size=}")
        super().__init__(stage=2 if stage is None else stage, config=config, **kwargs)
        zero = self.config.setdefault("zero_optimization", {"stage": 2 if stage is None else stage})
        configured = zero.get("stage", 0)
        if stage is not None and configured != stage:
            raise ValueError(
                f"the DeepSpeed config's zero_optimization.stage={configured} conflicts with stage={stage}: give one"
            )
        if configured not in STAGES:
            raise ValueError(f"zero_optimization.stage must be one of {STAGES}, got stage={configured!r}")
        if configured == 3 and expert_parallel_size not in ("auto", 1):
            raise ValueError(
                f"ZeRO stage 3 runs with expert_parallel_size=1 (DeepSpeed partitions only its own AutoEP experts at "
                f"stage 3), got expert_parallel_size={expert_parallel_size}; use stage 1 or 2 to shard the experts"
            )
        if "expert_parallel" in self.config:
            raise ValueError(
                f"the DeepSpeed config sets expert_parallel={self.config['expert_parallel']!r} (DeepSpeed's AutoEP, "
                "which replaces MoE layers with its own); this strategy shards moe_lightning's experts itself: "
                f"remove it and pass expert_parallel_size (got {expert_parallel_size!r})"
            )
        # Our optimizers (configure_optimizers) are DeepSpeed's "untested" client optimizers.
        self.config.setdefault("zero_allow_untested_optimizer", True)
        self.stage = configured
        self._expert_parallel_size = 1 if configured == 3 else expert_parallel_size
        self._device_mesh: DeviceMesh | None = None
        self._expert_group: str | None = None
        self._expert_names: list[str] = []
        self._loading_ours = False

    @property
    def device_mesh(self) -> DeviceMesh:
        if self._device_mesh is None:
            raise RuntimeError("the device mesh exists only after the processes have started (setup_environment)")
        return self._device_mesh

    @property
    @override
    def root_device(self) -> torch.device:
        assert self.parallel_devices is not None
        return self.parallel_devices[self.local_rank]

    # ----------------------------------------------------------------- processes
    @override
    def setup_environment(self) -> None:
        check_deepspeed_accelerator(self.root_device)
        # Lightning's DeepSpeedStrategy refuses anything but CUDA here; its engine runs on the CPU accelerator too.
        DDPStrategy.setup_environment(self)
        dp, ep = resolve_parallel_sizes(self._expert_parallel_size, "auto", self.world_size)
        self._device_mesh = init_device_mesh(
            self.root_device.type, (dp, ep), mesh_dim_names=("data_parallel", "expert_parallel")
        )
        assert self.lightning_module is not None
        self.lightning_module._device_mesh = self._device_mesh  # configure_model materialises this rank's experts

    @override
    def setup_distributed(self) -> None:
        if self.root_device.type == "cuda":
            super().setup_distributed()
            return
        # As DeepSpeedStrategy, without its check of CUDA device indices (CPU devices have none).
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    @contextmanager
    @override
    def model_sharded_context(self) -> Generator[None, None, None]:
        # No zero.Init: each rank builds its dense part whole (and only its experts, with meta_init or pretrained);
        # the engine partitions it when it starts.
        yield

    # ----------------------------------------------------------------- model and engine
    @override
    def setup(self, trainer: pl.Trainer) -> None:
        if trainer.gradient_clip_val and self.device_mesh["expert_parallel"].size() > 1:
            # DeepSpeed's ZeRO takes each rank's norm over its own experts only, so ranks would clip differently.
            raise ValueError(
                f"gradient clipping needs expert_parallel_size=1 with DeepSpeed (its norm leaves out the other "
                f"ranks' experts), got gradient_clip_val={trainer.gradient_clip_val} and expert_parallel_size="
                f"{self.device_mesh['expert_parallel'].size()}"
            )
        assert self.model is not None
        self.model.to(self.root_device)
        names = place_experts(self.model, self.device_mesh)
        if self.stage == 3:  # experts replicated (EP=1): ZeRO-3 partitions them as it partitions dense parameters
            from moe_lightning_deepspeed.engine import register_router_parameters

            register_router_parameters(self.model)
        elif names:
            from moe_lightning_deepspeed.engine import create_expert_groups, mark_expert_parameters

            self._expert_names = names
            self._expert_group = create_expert_groups(self.device_mesh)
            mark_expert_parameters(self.model, names, self._expert_group)
        super().setup(trainer)

    @override
    def _setup_model_and_optimizer(
        self, model: Module, optimizer: Optimizer | None, lr_scheduler: Any = None,
    ) -> tuple[Any, Optimizer]:
        from moe_lightning_deepspeed.engine import initialize_engine, tag_expert_param_groups

        if optimizer is not None and self._expert_group is not None:
            tag_expert_param_groups(optimizer)
        engine = initialize_engine(model, optimizer, lr_scheduler, self.config, experts=self._expert_group is not None)
        return engine, engine.optimizer

    # ----------------------------------------------------------------- checkpoints
    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        """DeepSpeed's checkpoint directory, plus each expert-parallel rank's experts (see
        :mod:`moe_lightning_deepspeed.checkpoint`)."""
        lightning_keys = [key for key in checkpoint if key not in ("state_dict", "optimizer_states")]
        super().save_checkpoint({**checkpoint, LIGHTNING_KEYS: lightning_keys}, filepath, storage_options)
        if not self._expert_names:
            return
        directory = Path(self.broadcast(str(filepath))) / TAG
        if self.device_mesh["data_parallel"].get_local_rank() == 0:  # one replica of each expert-parallel rank
            experts = {name: self.lightning_module.get_parameter(name).detach() for name in self._expert_names}
            ep = self.device_mesh["expert_parallel"]
            save_expert_shard(directory, experts, ep.get_local_rank(), ep.size())
        self.barrier()

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """A DeepSpeed checkpoint directory resumes everything (DeepSpeed restores each rank's ZeRO partitions, its
        experts' among them); a moe_lightning checkpoint (a file, or a sharded directory of any expert-parallel size)
        gives the weights and the loop state, the ZeRO optimizer state starting afresh."""
        path = Path(self.broadcast(str(checkpoint_path)))
        self._loading_ours = not is_deepspeed_checkpoint(path)
        if not self._loading_ours:
            client_state = super().load_checkpoint(path, weights_only)
            self._load_own_experts(path)
            return client_state
        ep = self.device_mesh["expert_parallel"]
        info = {"expert_names": self._expert_names, "optimizer_param_names": []}
        return load_for_rank(path, ep.get_local_rank(), ep.size(), info)

    @torch.no_grad()
    def _load_own_experts(self, path: Path) -> None:
        # DeepSpeed loaded rank 0's module state on every rank (its experts are rank 0's) and each rank's own ZeRO
        # partitions, whose fp32 weights reach the module only at the next step: this rank's experts come from its
        # shard.
        if not self._expert_names:
            return
        ep = self.device_mesh["expert_parallel"]
        experts = read_expert_shards(path / TAG)
        for name in self._expert_names:
            self.lightning_module.get_parameter(name).copy_(local_slice(experts[name], ep.get_local_rank(), ep.size()))

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        if not self._loading_ours:
            return  # the engine loaded DeepSpeed's checkpoint in load_checkpoint
        assert self.lightning_module is not None
        if self.stage == 3:
            self._restore_zero_state(checkpoint, strict=strict)
        else:
            self.lightning_module.load_state_dict(checkpoint["state_dict"], strict=strict)
        if self.deepspeed_engine.optimizer is not None:
            # ZeRO steps its own fp32 copies of the weights: they must take the loaded values too.
            self.deepspeed_engine.optimizer.refresh_fp32_params()


def check_deepspeed_accelerator(device: torch.device) -> None:
    """DeepSpeed picks its accelerator once, at import; it must be the Trainer's device type."""
    os.environ.setdefault("DS_ACCELERATOR", device.type)  # read only if deepspeed is not imported yet
    from deepspeed.accelerator import get_accelerator

    name = get_accelerator().device_name()
    if name != device.type:
        raise ValueError(
            f"DeepSpeed runs on its {name!r} accelerator but the Trainer's device is {device}: set "
            f"DS_ACCELERATOR={device.type} before deepspeed is imported"
        )

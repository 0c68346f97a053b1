"""ExpertParallelStrategy: experts sharded over an expert-parallel group; dense parameters replicated or sharded.

The W ranks form a 2-D mesh ``("data_parallel", "expert_parallel")`` of shape ``(W / P, P)``; the P ranks of
one expert-parallel group hold disjoint slices of every MoE layer's experts and exchange tokens with
all-to-all. Every rank reads different data. Expert gradients are reduced over the ranks that hold the same
experts (see :mod:`moe_lightning.strategies.replicas` for why this equals the one-process gradient).

Dense parameters (attention, norms, embeddings, routers) follow ``dense_parallel``:

- ``"replicate"`` (default): every rank holds them whole; their gradients are averaged over all ranks by an
  explicit all-reduce after the last backward of each optimizer step, together with the experts' reduction.
  No DDP wrapper: the module stays unwrapped and the two reduction groups visible, at the cost of no overlap
  between backward and communication.
- ``"fully_shard"``: FSDP2 ``fully_shard`` over a 1-D mesh of all W ranks, per block and per root (see
  :mod:`moe_lightning.strategies.dense` for which modules), with the expert parameters left out
  (``ignored_params``). Each rank keeps 1/W of every dense parameter (a ``DTensor``) and of its optimizer
  state; a unit's parameters are all-gathered before its forward and its gradients reduce-scattered (averaged
  over all W ranks) during backward. The explicit reduction then handles only the experts. Mixed precision is
  the precision plugin's, as with ``"replicate"`` (autocast over fp32 parameters for ``*-mixed``, parameters
  cast for ``*-true``): FSDP gathers and reduces in the parameters' own dtype (no ``MixedPrecisionPolicy``).

Checkpoints hold dense tensors whole in both modes (gathered from the shards on save, re-cut on load), so a
checkpoint of either mode resumes in the other, at any expert-parallel size that divides the expert count.
"""

from __future__ import annotations

from collections.abc import Generator, Mapping
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.distributed import (
    _distributed_is_initialized,
    _get_default_process_group_backend_for_device,
    _init_dist_connection,
    _sync_ddp_if_available,
)
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import ParallelStrategy
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule
from typing_extensions import override

from moe_lightning.checkpoint.dtensors import (
    full_optimizer_state, full_tensors, sharded_optimizer_state, sharded_state_dict,
)
from moe_lightning.checkpoint.resharding import load_for_rank
from moe_lightning.checkpoint.atomic import partial_path, remove_atomically
from moe_lightning.checkpoint.sharded import begin_directory, finish_directory, save_sharded, split_expert_tensors
from moe_lightning.strategies.clipping import clip_grad_norm_over_experts
from moe_lightning.strategies.dense import (
    DenseParallel, check_dense_parallel, shard_dense, step_mixed_groups_per_tensor,
)
from moe_lightning.strategies.replicas import GradientReducer
from moe_lightning.strategies.sharding import place_experts

Size = int | Literal["auto"]


def resolve_parallel_sizes(expert_parallel_size: Size, data_parallel_size: Size, world_size: int) -> tuple[int, int]:
    """``(data_parallel_size, expert_parallel_size)`` with ``dp * ep == world_size``; raises naming the values."""
    ep = expert_parallel_size
    if ep == "auto":
        ep = world_size if data_parallel_size == "auto" else world_size // data_parallel_size
    if ep < 1 or world_size % ep != 0:
        raise ValueError(
            f"the world size must be divisible by expert_parallel_size, got world_size={world_size} and "
            f"expert_parallel_size={expert_parallel_size}"
        )
    dp = world_size // ep
    if data_parallel_size not in ("auto", dp):
        raise ValueError(
            f"data_parallel_size * expert_parallel_size must equal the world size, got data_parallel_size="
            f"{data_parallel_size}, expert_parallel_size={ep} and world_size={world_size}"
        )
    return dp, ep


class ExpertParallelStrategy(ParallelStrategy):
    """Expert parallelism for any LightningModule whose MoE layers are :class:`MoELayer` with :class:`GroupedExperts`.

    Use ``Trainer(strategy="expert_parallel", devices=N)`` or pass an instance. Works with Lightning's own
    launcher, torchrun and SLURM; NCCL on GPUs, gloo on CPUs.

    Checkpoints are directories: global rank 0 writes the dense state, one replica of each expert-parallel
    rank writes its experts (safetensors). They reload at any expert-parallel size dividing the number of
    experts; :func:`moe_lightning.checkpoint.export_consolidated` writes one ordinary file.

    Args:
        expert_parallel_size: P, the ranks that share one copy of the experts; ``"auto"``: the world size
            (or world size / ``data_parallel_size``). Must divide the world size and every layer's expert count.
        data_parallel_size: copies of the experts; ``"auto"``: world size / P.
        dense_parallel: ``"replicate"`` the dense parameters on every rank, or ``"fully_shard"`` them with
            FSDP2 over all ranks (see above).
        process_group_backend: ``"nccl"``, ``"gloo"``, ...; ``None``: chosen from the device.
        timeout: timeout of the collectives.
    """

    strategy_name = "expert_parallel"

    def __init__(
        self,
        expert_parallel_size: Size = "auto",
        data_parallel_size: Size = "auto",
        dense_parallel: DenseParallel = "replicate",
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        for name, value in (("expert_parallel_size", expert_parallel_size), ("data_parallel_size", data_parallel_size)):
            if value != "auto" and not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name} must be 'auto' or an int >= 1, got {name}={value!r}")
        check_dense_parallel(dense_parallel)
        self._expert_parallel_size = expert_parallel_size
        self._data_parallel_size = data_parallel_size
        self._dense_parallel = dense_parallel
        self._process_group_backend = process_group_backend
        self._timeout = timeout
        self._device_mesh: DeviceMesh | None = None
        self._dense_mesh: DeviceMesh | None = None
        self._fsdp_units: list[FSDPModule] = []
        self._group_flags: dict[int, list[dict[str, Any]]] = {}  # id(optimizer) -> its groups' own foreach/fused
        self._expert_names: list[str] = []
        self._reducer: GradientReducer | None = None
        self._sync_gradients = True
        self.num_nodes = 1

    # ----------------------------------------------------------------- topology
    @property
    def device_mesh(self) -> DeviceMesh:
        if self._device_mesh is None:
            raise RuntimeError("the device mesh exists only after the processes have started (setup_environment)")
        return self._device_mesh

    @property
    def dense_parallel(self) -> str:
        return self._dense_parallel

    @property
    def expert_parallel_rank(self) -> int:
        return self.device_mesh["expert_parallel"].get_local_rank()

    @property
    def expert_parallel_size(self) -> int:
        return self.device_mesh["expert_parallel"].size()

    @property
    @override
    def root_device(self) -> torch.device:
        assert self.parallel_devices is not None
        return self.parallel_devices[self.local_rank]

    @property
    def num_processes(self) -> int:
        return len(self.parallel_devices) if self.parallel_devices is not None else 0

    @property
    def is_distributed(self) -> bool:  # read by Lightning to decide on a distributed sampler
        return True

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        # Expert-parallel peers are also data-parallel for the dense part: every rank reads its own samples.
        return {"num_replicas": self.world_size, "rank": self.global_rank}

    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        # Shards are loaded into the already-sliced parameters and the optimizer built on them.
        return True

    @override
    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        if not self.cluster_environment.creates_processes_externally:
            self._launcher = _SubprocessScriptLauncher(self.cluster_environment, self.num_processes, self.num_nodes)

    def set_world_ranks(self) -> None:
        if self.cluster_environment is not None:
            self.cluster_environment.set_global_rank(self.node_rank * self.num_processes + self.local_rank)
            self.cluster_environment.set_world_size(self.num_nodes * self.num_processes)
        rank_zero_only.rank = self.global_rank

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        reset_seed()
        self.set_world_ranks()
        backend = self._process_group_backend or _get_default_process_group_backend_for_device(self.root_device)
        assert self.cluster_environment is not None
        _init_dist_connection(self.cluster_environment, backend, timeout=self._timeout)
        dp, ep = resolve_parallel_sizes(self._expert_parallel_size, self._data_parallel_size, self.world_size)
        self._device_mesh = init_device_mesh(
            self.root_device.type, (dp, ep), mesh_dim_names=("data_parallel", "expert_parallel")
        )
        if self._dense_parallel == "fully_shard":
            # All W ranks in one dimension (the default group): FSDP on the 2-D mesh would replicate over its first.
            self._dense_mesh = init_device_mesh(self.root_device.type, (self.world_size,), mesh_dim_names=("dense",))
        assert self.lightning_module is not None
        self.lightning_module._device_mesh = self._device_mesh

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        assert self.accelerator is not None and self.model is not None
        if self._dense_parallel == "fully_shard" and trainer.gradient_clip_val:
            # clip_grad_norm_ cannot mix the DTensor (dense) and plain (expert) gradients.
            raise ValueError(
                f"gradient clipping is not supported with dense_parallel='fully_shard', got "
                f"gradient_clip_val={trainer.gradient_clip_val}"
            )
        self.accelerator.setup(trainer)
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        if self._reducer is None:  # a second setup (fit, then test) finds the model already sharded
            self._parallelize()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
            self._step_mixed_groups_per_tensor()
        self.setup_precision_plugin()
        if not self._fsdp_units:
            # Lightning clips by norm through the precision plugin, whose norm would see only this rank's experts.
            self.precision_plugin.clip_grad_by_norm = self._clip_grad_by_global_norm
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)

    def _parallelize(self) -> None:
        module = self.lightning_module
        assert module is not None
        self._expert_names = place_experts(module, self.device_mesh)
        fully_shard = self._dense_parallel == "fully_shard"
        if fully_shard:
            assert self._dense_mesh is not None
            experts = [module.get_parameter(name) for name in self._expert_names]
            self._fsdp_units = shard_dense(module, self._dense_mesh, experts)
        self._reducer = GradientReducer(
            module, self._expert_names, self.device_mesh["data_parallel"].get_group(), reduce_dense=not fully_shard
        )

    def _step_mixed_groups_per_tensor(self) -> None:
        if self._fsdp_units:
            self._group_flags = {id(opt): step_mixed_groups_per_tensor(opt) for opt in self.optimizers}

    @override
    def teardown(self) -> None:
        if not self._fsdp_units:
            super().teardown()
            return
        # Sharded parameters stay on their device (as in Lightning's ModelParallelStrategy): moved to the CPU, a
        # later save_checkpoint would gather them there, where an NCCL mesh has no backend.
        assert self.cluster_environment is not None and self.accelerator is not None
        self.cluster_environment.teardown()
        self.precision_plugin.teardown()
        self.accelerator.teardown()
        self.checkpoint_io.teardown()

    @override
    def model_to_device(self) -> None:
        assert self.model is not None
        self.model.to(self.root_device)

    # ----------------------------------------------------------------- gradients
    def _clip_grad_by_global_norm(self, optimizer: torch.optim.Optimizer, clip_val: float) -> None:
        assert self._reducer is not None
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        clip_grad_norm_over_experts(
            [p for p in self._reducer.dense if id(p) in in_optimizer],
            [p for p in self._reducer.experts if id(p) in in_optimizer],
            self.device_mesh["expert_parallel"].get_group(), clip_val,
        )

    @override
    def post_backward(self, closure_loss: Tensor) -> None:
        if self._sync_gradients and self._reducer is not None:
            self._reducer.reduce()

    @contextmanager
    @override
    def block_backward_sync(self) -> Generator[None, None, None]:
        # Lightning enters this for the micro-batches that only accumulate; the step's last backward reduces.
        # FSDP then keeps the unsharded gradients and reduce-scatters their sum in the last backward.
        self._set_gradient_sync(False)
        try:
            yield
        finally:
            self._set_gradient_sync(True)

    def _set_gradient_sync(self, enabled: bool) -> None:
        self._sync_gradients = enabled
        for unit in self._fsdp_units:
            unit.set_requires_gradient_sync(enabled, recurse=False)

    # ----------------------------------------------------------------- collectives
    @override
    def barrier(self, name: str | None = None) -> None:
        if _distributed_is_initialized():
            dist.barrier()

    @override
    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if not _distributed_is_initialized():
            return obj
        holder = [obj]
        dist.broadcast_object_list(holder, src)
        return holder[0]

    @override
    def reduce(self, tensor: Tensor | Any, group: Any | None = None, reduce_op: Any = "mean") -> Tensor | Any:
        return _sync_ddp_if_available(tensor, group, reduce_op=reduce_op) if isinstance(tensor, Tensor) else tensor

    # ----------------------------------------------------------------- checkpoints
    def _checkpoint_info(self) -> dict[str, Any]:
        """Parameter names of the expert slices and, per optimizer, of its parameters in state_dict order."""
        assert self.lightning_module is not None
        names = {id(p): name for name, p in self.lightning_module.named_parameters()}
        optimizer_param_names = [
            [names[id(p)] for group in optimizer.param_groups for p in group["params"]] for optimizer in self.optimizers
        ]
        return {"expert_names": list(self._expert_names), "optimizer_param_names": optimizer_param_names}

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        # Sharded dense parameters are gathered whole (every rank takes part; only global rank 0 writes them).
        state = super().lightning_module_state_dict()
        return full_tensors(state) if self._fsdp_units else state

    @override
    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        state = super().optimizer_state(optimizer)
        if not self._fsdp_units:
            return state
        raw = optimizer._optimizer if isinstance(optimizer, LightningOptimizer) else optimizer
        # Save the groups' own foreach/fused, not the per-tensor fallback (param_groups are fresh dicts here).
        for group, flags in zip(state["param_groups"], self._group_flags.get(id(raw), [])):
            group.update(flags)
        return full_optimizer_state(state)

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        if self._fsdp_units:
            assert self.lightning_module is not None
            state_dict = sharded_state_dict(self.lightning_module, checkpoint["state_dict"])
            checkpoint = {**checkpoint, "state_dict": state_dict}
        super().load_model_state_dict(checkpoint, strict=strict)

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        if self._fsdp_units:
            states = [
                sharded_optimizer_state(optimizer, state)
                for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"])
            ]
            checkpoint = {**checkpoint, "optimizer_states": states}
        super().load_optimizer_state_dict(checkpoint)
        self._step_mixed_groups_per_tensor()  # loading restored the checkpoint's flags

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} writes its own files and takes no storage_options")
        # Assembled under a hidden partial name, manifest last, then renamed: the name only ever holds a whole one.
        path = Path(self.broadcast(str(filepath)))
        partial = begin_directory(path) if self.is_global_zero else partial_path(path)
        self.barrier()
        info = self._checkpoint_info()
        info["optimizer_param_names"] = info["optimizer_param_names"][: len(checkpoint.get("optimizer_states", []))]
        experts = split_expert_tensors(checkpoint, info["expert_names"], info["optimizer_param_names"])
        save_sharded(
            partial, checkpoint, experts, info, self.expert_parallel_rank, self.expert_parallel_size,
            write_meta=self.is_global_zero, write_experts=self.device_mesh["data_parallel"].get_local_rank() == 0,
        )
        self.barrier()
        if self.is_global_zero:
            finish_directory(partial, path)
        self.barrier()

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        path = self.broadcast(str(checkpoint_path))
        return load_for_rank(path, self.expert_parallel_rank, self.expert_parallel_size, self._checkpoint_info())

    @override
    def remove_checkpoint(self, filepath: Any) -> None:
        if self.is_global_zero:
            remove_atomically(filepath)

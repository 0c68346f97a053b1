"""MoELightningModule: trains any model that returns ``(logits, routings)`` as a causal language model."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.optim import Optimizer
from torchmetrics import MeanMetric
from typing_extensions import override

from moe_lightning.analytics.load import max_mean_imbalance
from moe_lightning.checkpoint.loop_state import count_epoch_as_started, count_stopped_epoch_as_running
from moe_lightning.checkpoint.rng import gather_rng_states, restore_rng_states
from moe_lightning.kernels.adamw import TritonAdamW
from moe_lightning.kernels.cross_entropy import cross_entropy
from moe_lightning.models.materialize import InitRecord, build_on_meta, materialize
from moe_lightning.routing import Router, Routing
# Registers the "expert_parallel" strategy names for the CLI and Trainer(strategy=...): the package's __init__
# cannot, as it must not import Lightning.
from moe_lightning import strategies  # noqa: F401

IGNORE_INDEX = -100
RNG_STATES_KEY = "rng_states"


class MoELightningModule(LightningModule):
    """Next-token training of an MoE model: cross-entropy plus each router's weighted auxiliary losses.

    The wrapped ``model`` is called as ``model(input_ids)`` and must return ``(logits, routings)`` (a tuple or
    an object with ``.logits`` and ``.routings``), with ``logits`` ``[B, L, V]`` and one :class:`Routing` per
    MoE layer. Batches are dicts with ``input_ids`` and ``labels`` (already shifted; ``-100`` is ignored).

    Customise by subclassing and overriding the documented hooks:

    - :meth:`forward` to call a model with another signature;
    - :meth:`compute_loss` to change the objective;
    - :meth:`configure_model` to build ``self.model`` another way (pass ``model=None``);
    - :meth:`param_groups` to change the optimizer groups.

    Big models are built on the meta device and materialised in :meth:`configure_model`, each expert-parallel rank
    holding only its own experts (never the whole model): pass ``pretrained`` (YAML: ``pretrained: DIR``) to start
    from a checkpoint, or ``model`` as a function that builds the network with ``meta_init=True`` (YAML:
    ``meta_init: true`` beside ``model``'s ``class_path``/``init_args``) to start from a fresh initialisation.

    Args:
        model: the network; or a function building it (YAML's ``class_path``/``init_args`` is one), called here;
            ``None`` with ``pretrained``, or if a subclass builds it in :meth:`configure_model`.
        pretrained: a transformers checkpoint directory or a ``.safetensors`` file of ``moe-lightning export`` to
            start from; checked here, read per rank in :meth:`configure_model`.
        meta_init: call a function ``model`` on the meta device (no memory; ``self.model`` is on meta until
            :meth:`configure_model` gives it its values, this rank's experts only): the values of the ordinary CPU
            build at the same point, bit for bit, but the global generator is not advanced past them. A built
            ``model`` (an ``nn.Module``) is used as it is, whatever ``meta_init`` says.
        lr: peak learning rate of AdamW.
        router_lr: learning rate of router parameters; ``None``: same as ``lr``.
        weight_decay: AdamW decay of matrices (biases, norms and other 1-D tensors are not decayed).
        betas: AdamW betas.
        warmup_steps: linear warm-up steps.
        max_steps: steps of the cosine decay; ``None``: the trainer's estimated stepping batches.
        min_lr_ratio: the cosine floor as a fraction of the peak.
        log_layer_stats: log each MoE layer's aux losses, load imbalance (max/mean) and dropped fraction.
    """

    def __init__(
        self,
        model: Callable[[], nn.Module] | nn.Module | None = None,
        pretrained: str | None = None,
        meta_init: bool = False,
        lr: float = 3e-4,
        router_lr: float | None = None,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 100,
        max_steps: int | None = None,
        min_lr_ratio: float = 0.1,
        log_layer_stats: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (("lr", lr), ("router_lr", router_lr)):
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be > 0, got {name}={value}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got warmup_steps={warmup_steps}")
        if max_steps is not None and max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or None, got max_steps={max_steps}")
        if not 0 <= min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got min_lr_ratio={min_lr_ratio}")
        if model is not None and pretrained is not None:
            raise ValueError(f"pass either model or pretrained, not both: got model={model!r} and pretrained={pretrained!r}")
        self._pretrained = None
        if pretrained is not None:
            from moe_lightning.checkpoint.sources import open_pretrained  # imports the exporters and readers

            self._pretrained = open_pretrained(pretrained)
        self.save_hyperparameters(ignore=["model"])
        self._init_record: InitRecord | None = None
        if model is None or isinstance(model, nn.Module):
            self.model = model
        elif meta_init:
            self.model, self._init_record = build_on_meta(model)
        else:
            self.model = model()
        self.val_loss = MeanMetric()

    # ----------------------------------------------------------------- hooks meant to be overridden
    @override
    def forward(self, batch: dict[str, Tensor]) -> Any:
        """Run the model on a batch; override for models with another call signature."""
        return self.model(batch["input_ids"])

    def compute_loss(self, batch: dict[str, Tensor], logits: Tensor, routings: list[Routing]) -> dict[str, Tensor]:
        """Return named loss terms; their sum is optimised. Default: ``ce`` plus every router's aux losses."""
        terms = {"ce": self.cross_entropy(logits, batch["labels"])}
        for routing in routings:
            for name, value in routing.aux_losses.items():
                terms[name] = terms.get(name, 0.0) + value
        return terms

    def param_groups(self) -> list[dict[str, Any]]:
        """AdamW groups: routers may get their own learning rate; only matrices are weight-decayed.

        Expert parameters marked the DeepSpeed-MoE way (``allreduce=False`` and a ``group_name``, as the DeepSpeed
        plugin's strategy marks them before the optimizer is built) get groups of their own: DeepSpeed's ZeRO
        partitions them over another process group than the dense parameters. Unmarked, nothing changes."""
        router_params = {id(p) for m in self.modules() if isinstance(m, Router) for p in m.parameters()}
        groups: dict[tuple[bool, bool, str | None], list[nn.Parameter]] = {}
        for param in self.parameters():
            if param.requires_grad:
                expert_group = None if getattr(param, "allreduce", True) else param.group_name
                groups.setdefault((id(param) in router_params, param.dim() >= 2, expert_group), []).append(param)
        router_lr = self.hparams.router_lr or self.hparams.lr
        return [
            {
                "params": params,
                "lr": router_lr if is_router else self.hparams.lr,
                "weight_decay": self.hparams.weight_decay if decays else 0.0,
            }
            for (is_router, decays, _), params in groups.items()
        ]

    # ----------------------------------------------------------------- Lightning hooks
    @override
    def configure_model(self) -> None:
        """Materialise the model built on the meta device (``meta_init``, or ``pretrained``: built here) on the
        strategy's device: experts ``[p * E / P, (p + 1) * E / P)`` only, on rank ``p`` of the device mesh's
        ``expert_parallel`` dimension (all of them without one). Does nothing once ``self.model`` has its values."""
        if self._init_record is not None:
            model, record = self.model, self._init_record
        elif self.model is None and self._pretrained is not None:
            model, record = build_on_meta(self._pretrained.build_model)
        else:
            return
        ep_rank, ep_size = expert_parallel_coordinates(self.device_mesh)
        device = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
        materialize(model, record, self._pretrained, device=device, ep_rank=ep_rank, ep_size=ep_size)
        self.model, self._init_record = model, None

    @override
    def setup(self, stage: str) -> None:
        if self.model is None:
            self.configure_model()
        if self.model is None:
            raise ValueError("MoELightningModule needs a model: pass model=... or build self.model in configure_model()")
        self._check_vocab_size()

    @override
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Any]:
        """Returns the loss and the step's detached routings, which callbacks read in ``on_train_batch_end``."""
        logits, routings = unpack_output(self(batch))
        terms = self.compute_loss(batch, logits, routings)
        loss = sum(terms.values())
        batch_size = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log_dict({f"train/{name}": value for name, value in terms.items()}, batch_size=batch_size)
        if self.hparams.log_layer_stats:
            self.log_dict(layer_stats(routings), batch_size=batch_size)
        return {"loss": loss, "routings": [routing.detach() for routing in routings]}

    @override
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        logits, _ = unpack_output(self(batch))
        num_targets = (batch["labels"] != IGNORE_INDEX).sum()
        self.val_loss.update(self.cross_entropy(logits, batch["labels"]), weight=num_targets)

    @override
    def on_validation_epoch_end(self) -> None:
        self._log_held_out_loss("val")

    @override
    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    @override
    def on_test_epoch_end(self) -> None:
        self._log_held_out_loss("test")

    @override
    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        # Aux-loss-free balancing steps once per optimizer step, from the load of every micro-batch of the step.
        for router in self._routers_with_expert_bias():
            router.update_expert_bias(self.trainer.strategy.reduce(router.expert_load_E, reduce_op="sum"))

    @override
    def on_train_start(self) -> None:
        count_epoch_as_started(self.trainer)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Every rank's generators (a collective: Trainer.save_checkpoint runs on all ranks), so a resumed run draws
        # the same router jitter and sampling noise as an uninterrupted one.
        checkpoint[RNG_STATES_KEY] = gather_rng_states()
        if self._trainer is not None and "loops" in checkpoint:
            count_stopped_epoch_as_running(self.trainer, checkpoint)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(RNG_STATES_KEY)
        strategy = self.trainer.strategy if self._trainer is not None else None
        rank, world_size = (strategy.global_rank, strategy.world_size) if strategy is not None else (0, 1)
        if saved is not None and not restore_rng_states(saved, rank, world_size):
            rank_zero_warn(
                f"the checkpoint holds the RNG states of {len(saved)} processes, this run has {world_size}: random "
                "draws after resuming differ from the saved run's"
            )

    @override
    def configure_optimizers(self) -> dict[str, Any]:
        # torch's AdamW with a Triton step on CUDA: torch's own kernels took 18 of 137 ms of a whole-model step on
        # an H200 (benchmarks/RESULTS.md). It does not unscale gradients itself, so AMP gradient clipping works.
        optimizer = TritonAdamW(self.param_groups(), betas=self.hparams.betas)
        total = self.hparams.max_steps or int(self.trainer.estimated_stepping_batches)
        schedule = warmup_cosine(self.hparams.warmup_steps, total, self.hparams.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ----------------------------------------------------------------- helpers
    @staticmethod
    def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
        """Mean token cross-entropy in fp32 (a fused kernel on CUDA that never copies the logits to fp32)."""
        return cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX)

    def _log_held_out_loss(self, split: str) -> None:
        # MeanMetric.compute() already reduces over ranks.
        loss = self.val_loss.compute()
        self.val_loss.reset()
        self.log_dict({f"{split}/loss": loss, f"{split}/ppl": torch.exp(loss)}, prog_bar=True)

    def _routers_with_expert_bias(self) -> Iterator[Router]:
        for module in self.modules():
            if isinstance(module, Router) and getattr(module, "expert_bias_E", None) is not None:
                yield module

    def _check_vocab_size(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_vocab = getattr(datamodule, "vocab_size", None)
        model_vocab = getattr(getattr(self.model, "config", None), "vocab_size", None)
        if data_vocab is not None and model_vocab is not None and data_vocab > model_vocab:
            raise ValueError(
                f"vocab mismatch: the data produces token ids up to vocab_size={data_vocab} but the model's "
                f"embedding has vocab_size={model_vocab}"
            )


def expert_parallel_coordinates(mesh: DeviceMesh | None) -> tuple[int, int]:
    """``(rank, size)`` of this process in the mesh's ``expert_parallel`` dimension; ``(0, 1)`` without one."""
    if mesh is None or "expert_parallel" not in (mesh.mesh_dim_names or ()):
        return 0, 1
    return mesh["expert_parallel"].get_local_rank(), mesh["expert_parallel"].size()


def unpack_output(output: Any) -> tuple[Tensor, list[Routing]]:
    """Accept ``(logits, routings)`` tuples and objects with ``.logits`` / ``.routings``."""
    if hasattr(output, "logits") and hasattr(output, "routings"):
        return output.logits, list(output.routings)
    if isinstance(output, (tuple, list)) and len(output) == 2:
        return output[0], list(output[1])
    raise TypeError(f"the model must return (logits, routings), got {type(output).__name__}")


@torch.no_grad()
def layer_stats(routings: list[Routing]) -> dict[str, Tensor]:
    """Per MoE layer: each weighted aux loss, load imbalance max/mean and the dropped-row fraction."""
    stats = {}
    for layer, routing in enumerate(routings):
        stats[f"moe/layer{layer}/imbalance"] = max_mean_imbalance(routing.tokens_per_expert_E).float()
        stats[f"moe/layer{layer}/dropped_fraction"] = routing.dropped_fraction
        for name, value in routing.aux_losses.items():
            stats[f"moe/layer{layer}/{name}"] = value.detach()
    return stats


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float):
    """LR multiplier: linear warm-up to 1, then cosine decay to ``min_ratio`` at ``total_steps``."""

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier

"""Fine-tuning from YAML: callbacks that change what the model trains before the optimizer is built.

Each applies its method in ``setup`` (Lightning calls it before ``configure_optimizers``, as for
``BaseFinetuning``), once per callback, on every stage: a checkpoint of a fine-tuned run loads into a model
prepared the same way. A model that ``configure_model`` builds (``pretrained:``, ``meta_init``) is built there first.
With ``export_path`` set, rank zero writes a merged copy of the model at the end of fit (:func:`export_finetuned`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities import move_data_to_device
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from moe_lightning.finetune.esft import (
    Criterion,
    check_criterion,
    check_threshold,
    relevance_from_stats_file,
    routing_relevance,
    select_experts,
)
from moe_lightning.finetune.export import ExportFormat, check_export, check_export_format, export_finetuned
from moe_lightning.finetune.freezing import (
    freeze_all_but_experts,
    freeze_routers,
    moe_layers,
    train_only_experts,
)
from moe_lightning.finetune.lora import DEFAULT_TARGET_MODULES, apply_lora, check_lora_arguments
from moe_lightning.module import unpack_output


class FineTuningCallback(Callback):
    """The shared frame: apply :meth:`prepare` once in ``setup``, report the trainable share, export at fit end.

    Args:
        export_path: where rank zero writes the merged model at the end of fit (a ``.safetensors`` file, or a
            directory for ``export_format="hf"``), relative to the trainer's log dir (its ``default_root_dir`` without
            a logger); None writes nothing.
        export_format: ``"safetensors"`` or ``"hf"`` (a transformers checkpoint), see :func:`export_finetuned`.
        hf_family: the transformers family of an ``"hf"`` export; None: the one the model was imported from.
    """

    def __init__(
        self, export_path: str | None = None, export_format: ExportFormat = "safetensors", hf_family: str | None = None,
    ) -> None:
        check_export_format(export_format)
        self.export_path = export_path
        self.export_format = export_format
        self.hf_family = hf_family
        self._prepared = False

    def prepare(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Change what ``pl_module`` trains (subclasses)."""
        raise NotImplementedError

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._prepared:
            return
        if getattr(pl_module, "model", pl_module) is None or any(p.is_meta for p in pl_module.parameters()):
            # A `pretrained:` or meta-initialised MoELightningModule gets its weights in configure_model, which
            # Lightning calls after the callbacks' setup; the hook is idempotent, so build them now for the method.
            pl_module.configure_model()
        if getattr(pl_module, "model", pl_module) is None:
            raise ValueError(
                f"{type(self).__name__} prepares the model in setup: {type(pl_module).__name__}.model is None after "
                "configure_model()"
            )
        if self.export_path is not None:  # refuse an export that would fail before training, not after
            check_export(pl_module, self._resolved_export_path(trainer), self.export_format, self.hf_family)
        # Counted before: afterwards adapters add parameters, quantised bases hide theirs in buffers.
        total = sum(p.numel() for p in pl_module.parameters())
        self.prepare(trainer, pl_module)
        self._prepared = True
        trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        rank_zero_info(f"{type(self).__name__}: training {trainable:,} parameters, {trainable / total:.2%} of the "
                       f"model's {total:,}")

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.export_path is None:
            return
        path = self._resolved_export_path(trainer)
        if trainer.is_global_zero:
            export_finetuned(pl_module, path, self.export_format, self.hf_family)

    def _resolved_export_path(self, trainer: Trainer | None) -> Path:
        path = Path(self.export_path)
        if path.is_absolute() or trainer is None:
            return path
        log_dir = trainer.log_dir  # a collective: every rank asks
        return Path(log_dir or trainer.default_root_dir) / path


class ExpertFineTuning(FineTuningCallback):
    """Train only some weights of an MoE model: the chosen routed experts, and optionally the routers and the rest.

    Args:
        experts: MoE layer index (depth order of the model's MoE layers) to the indices of the experts to train there,
            e.g. ``{0: [1, 5], 3: [2]}``; experts of layers left out are frozen. None: every routed expert trains. The
            others stay bit-identical whatever the optimizer does (see :mod:`moe_lightning.finetune.expert_rows`).
        freeze_routers: freeze router weights (and the aux-loss-free expert bias).
        freeze_non_experts: freeze everything outside the routed experts, routers included.
        export_path, export_format, hf_family: see :class:`FineTuningCallback`.
    """

    def __init__(
        self, experts: dict[int, list[int]] | None = None, freeze_routers: bool = True, freeze_non_experts: bool = True,
        export_path: str | None = None, export_format: ExportFormat = "safetensors", hf_family: str | None = None,
    ) -> None:
        super().__init__(export_path, export_format, hf_family)
        if freeze_non_experts and not freeze_routers:
            raise ValueError("freeze_non_experts=True freezes the routers too: it contradicts freeze_routers=False")
        if experts is None and not freeze_routers:
            raise ValueError("experts=None with freeze_routers=False and freeze_non_experts=False freezes nothing")
        self.experts = experts
        self.freeze_routers = freeze_routers
        self.freeze_non_experts = freeze_non_experts

    @override
    def prepare(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.experts is not None:
            train_only_experts(pl_module, self.experts)
        if self.freeze_non_experts:
            freeze_all_but_experts(pl_module)
        elif self.freeze_routers:
            freeze_routers(pl_module)


class ESFTFineTuning(FineTuningCallback):
    """ESFT (see :mod:`moe_lightning.finetune.esft`): train only each MoE layer's most task-relevant experts, with
    everything else frozen.

    Relevance comes from ``stats_file`` when given (a :class:`RouterStatsMonitor` ``router_stats.jsonl`` of a run on
    the task, token criterion), else from a calibration pass of ``calibration_batches`` batches of the datamodule's
    training data through the model in eval mode, where the model sits at setup (the CPU before a strategy moves it).

    Args:
        threshold: the share of each layer's relevance the chosen experts must reach, in (0, 1].
        criterion: ``"token"`` (token selection ratio) or ``"gate"`` (average gate score).
        stats_file: a ``router_stats.jsonl`` to take the relevance from instead of calibrating.
        calibration_batches: training batches of the calibration pass.
        export_path, export_format, hf_family: see :class:`FineTuningCallback`.
    """

    def __init__(
        self, threshold: float = 0.2, criterion: Criterion = "token", stats_file: str | None = None,
        calibration_batches: int = 8, export_path: str | None = None, export_format: ExportFormat = "safetensors",
        hf_family: str | None = None,
    ) -> None:
        super().__init__(export_path, export_format, hf_family)
        check_threshold(threshold)
        check_criterion(criterion)
        if stats_file is not None and criterion != "token":
            raise ValueError(f"a router stats file holds routed-row counts, the token criterion: got criterion={criterion!r}")
        if stats_file is not None and not Path(stats_file).is_file():
            raise ValueError(f"the router stats file {stats_file!r} does not exist")
        if calibration_batches < 1:
            raise ValueError(f"calibration_batches must be >= 1, got calibration_batches={calibration_batches}")
        self.threshold = threshold
        self.criterion = criterion
        self.stats_file = stats_file
        self.calibration_batches = calibration_batches
        self.selection: dict[int, list[int]] | None = None
        """The experts chosen per MoE layer, once set up."""

    @override
    def prepare(self, trainer: Trainer, pl_module: LightningModule) -> None:
        layers = moe_layers(pl_module)
        if not layers:
            raise ValueError(f"{type(pl_module).__name__} has no MoELayer to choose experts in")
        if self.stats_file is not None:
            relevance_LE = relevance_from_stats_file(self.stats_file, len(layers), layers[0].num_experts)
        else:
            relevance_LE = self._calibrate(pl_module, self._calibration_data(trainer))
        self.selection = select_experts(relevance_LE, self.threshold)
        rank_zero_info(f"ESFT ({self.criterion}, threshold {self.threshold}) trains experts {self.selection}")
        train_only_experts(pl_module, self.selection)
        freeze_all_but_experts(pl_module)

    @torch.no_grad()
    def _calibrate(self, pl_module: LightningModule, batches: Iterable[dict[str, Any]]) -> torch.Tensor:
        was_training = pl_module.training
        pl_module.eval()
        relevance_LE = None
        for batch in islice(batches, self.calibration_batches):
            _, routings = unpack_output(pl_module(move_data_to_device(batch, pl_module.device)))
            batch_LE = routing_relevance(routings, self.criterion)
            relevance_LE = batch_LE if relevance_LE is None else relevance_LE + batch_LE
        pl_module.train(was_training)
        if relevance_LE is None:
            raise ValueError("the calibration data yielded no batch")
        return relevance_LE

    def _calibration_data(self, trainer: Trainer) -> Iterable[dict[str, Any]]:
        datamodule = trainer.datamodule
        if datamodule is None:
            raise ValueError("ESFTFineTuning calibrates on the datamodule's training data: pass a datamodule to fit, "
                             "or a stats_file")
        return datamodule.train_dataloader()


class LoRAFineTuning(FineTuningCallback):
    """LoRA (or QLoRA, with ``quantize``) through :func:`apply_lora`: the model frozen, float32 adapters trained.

    Args:
        rank: adapter rank.
        alpha: adapter scale numerator (``alpha / rank``).
        target_modules: ``nn.Linear`` layers to adapt, by name or name suffix; empty for none.
        experts: adapt every MoE layer's routed experts too.
        quantize: QLoRA: store the routed experts as frozen bitsandbytes ``"nf4"`` (or ``"fp4"``, ``"int8"``) first.
        export_path, export_format, hf_family: see :class:`FineTuningCallback`; the export holds merged float weights.
    """

    def __init__(
        self, rank: int = 8, alpha: float = 16.0, target_modules: Sequence[str] = DEFAULT_TARGET_MODULES,
        experts: bool = True, quantize: str | None = None, export_path: str | None = None,
        export_format: ExportFormat = "safetensors", hf_family: str | None = None,
    ) -> None:
        super().__init__(export_path, export_format, hf_family)
        check_lora_arguments(rank, alpha, target_modules, experts, quantize)
        self.rank = rank
        self.alpha = alpha
        self.target_modules = list(target_modules)
        self.experts = experts
        self.quantize = quantize

    @override
    def prepare(self, trainer: Trainer, pl_module: LightningModule) -> None:
        apply_lora(pl_module, self.rank, self.alpha, self.target_modules, self.experts, self.quantize)

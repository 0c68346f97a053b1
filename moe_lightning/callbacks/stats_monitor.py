"""RouterStatsMonitor: per-layer routing statistics, reduced over ranks, to every logger and a JSON-lines file."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from moe_lightning.analytics import (
    BF16_TIE_MARGIN,
    LayerRoutingStats,
    RoutingCounts,
    expert_seconds,
    layer_statistics,
    recorded_expert_inputs,
    time_share,
)
from moe_lightning.callbacks.routing_window import ChurnProbe, CountsWindow
from moe_lightning.callbacks.sampling import StepSampler, batch_labels, step_routings
from moe_lightning.layer import MoELayer

HEATMAP_CELL_PIXELS = 8


class RouterStatsMonitor(Callback):
    """Every ``log_every_n_steps`` optimizer steps, logs per MoE layer: load imbalance (max/mean), coefficient of
    variation, normalised load and token entropy, dead experts, dropped and near-tie fractions, routing churn of a
    fixed probe batch, and the NMI between top-1 expert and the batch's per-token labels when it has them.

    The counts of the last ``window_steps`` steps before each logging step are summed, all-reduced over ranks in one
    call, and logged under ``router/layer{l}/{name}`` to every logger; TensorBoard also gets per-layer histograms of
    the expert load share and a layer x expert load heatmap image. Rank zero appends each record, with the
    co-occurrence, label x expert and transition matrices, to ``stats_filename`` in the log dir, which
    ``moe-lightning report`` reads. Other steps cost one int comparison.

    Metrics go straight to ``trainer.loggers`` (as ``LearningRateMonitor`` does) so that this interval does not
    depend on ``Trainer(log_every_n_steps)``.

    Args:
        log_every_n_steps: optimizer steps between records.
        window_steps: steps summed into each record (dead experts are judged over this window).
        dead_threshold: an expert is dead when its load in the window is at most this times the mean load.
        num_labels: label classes for the NMI; ``None``: ``len(datamodule.task_names)`` when the datamodule has them.
        label_key: the batch key of the per-token labels ``[B, L]``; ``None`` turns the NMI off.
        probe_size: sequences of the first sampled batch kept to measure churn; 0 turns churn off.
        near_tie_threshold: top-k score margin under which a token counts as a near-tie.
        log_images: send histograms and the heatmap to TensorBoard loggers.
        stats_filename: the JSON-lines file in the log dir; ``None`` writes none.
        time_experts: at each record, also time every expert alone on its rows of the probe batch and log each
            expert's share of its layer's expert time (``expert_time_share`` in the record; the busiest share as
            ``router/layer{l}/expert_time_share_max``). Rank zero's experts only (its own slice under expert
            parallelism). Costs a few extra expert calls per record; needs ``probe_size > 0``.
    """

    def __init__(
        self,
        log_every_n_steps: int = 50,
        window_steps: int = 1,
        dead_threshold: float = 0.05,
        num_labels: int | None = None,
        label_key: str | None = "task_ids",
        probe_size: int = 4,
        near_tie_threshold: float = BF16_TIE_MARGIN,
        log_images: bool = True,
        stats_filename: str | None = "router_stats.jsonl",
        time_experts: bool = False,
    ) -> None:
        if log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps must be >= 1, got log_every_n_steps={log_every_n_steps}")
        self._sampler = StepSampler(log_every_n_steps, window_steps)
        for name, value in (("dead_threshold", dead_threshold), ("probe_size", probe_size),
                            ("near_tie_threshold", near_tie_threshold)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {name}={value}")
        if time_experts and probe_size == 0:
            raise ValueError("time_experts=True times the experts on the probe batch: it needs probe_size > 0")
        if num_labels is not None and num_labels < 1:
            raise ValueError(f"num_labels must be >= 1 or None, got num_labels={num_labels}")
        self.log_every_n_steps = log_every_n_steps
        self.window_steps = window_steps
        self.dead_threshold = dead_threshold
        self.num_labels = num_labels
        self.label_key = label_key
        self.probe_size = probe_size
        self.near_tie_threshold = near_tie_threshold
        self.log_images = log_images
        self.stats_filename = stats_filename
        self.time_experts = time_experts
        self._time_share: list[list[float]] | None = None
        self.label_names: list[str] | None = None
        self.stats_path: str | None = None
        self._window = CountsWindow(num_labels or 0, near_tie_threshold)
        self._probe = ChurnProbe(probe_size)

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(log_every_n_steps=self.log_every_n_steps, window_steps=self.window_steps)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        names = getattr(trainer.datamodule, "task_names", None)
        if self.num_labels is None and names:
            self.num_labels = len(names)
        self.label_names = list(names) if names and len(names) == self.num_labels else None
        self._window.num_labels = self.num_labels or 0
        log_dir = trainer.log_dir  # a collective: every rank asks
        if self.stats_path is None and self.stats_filename is not None and log_dir is not None:
            self.stats_path = str(Path(log_dir) / self.stats_filename)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if not self._sampler.sample(step):
            return
        counts = self._window.add(step_routings(outputs), self._labels(batch))
        if not self._sampler.is_boundary(step):
            return
        if self.probe_size:
            self._measure_churn(pl_module, batch, counts)
        reduced = self._window.take_reduced(trainer.strategy)
        stats = layer_statistics(reduced, self.dead_threshold)
        if trainer.is_global_zero:
            self._report(trainer, step, stats, reduced)

    def _labels(self, batch: Any) -> Tensor | None:
        labels = batch_labels(batch, self.label_key)
        if labels is not None and not self.num_labels:
            rank_zero_warn(f"the batch has {self.label_key!r} but num_labels is unknown: pass num_labels for the NMI")
            self.label_key = None
            return None
        return labels

    def _measure_churn(self, pl_module: LightningModule, batch: Any, counts: RoutingCounts) -> None:
        recorder = recorded_expert_inputs(pl_module) if self.time_experts else contextlib.nullcontext()
        with recorder as expert_inputs:
            routings = self._probe.route(pl_module, batch)
        if self.time_experts:
            experts = [module.experts for module in pl_module.modules() if isinstance(module, MoELayer)]
            self._time_share = [time_share(expert_seconds(e, *inputs)).tolist()
                                for e, inputs in zip(experts, expert_inputs) if inputs is not None]
        self._probe.add_churn(routings, counts)

    def _report(self, trainer: Trainer, step: int, stats: list[LayerRoutingStats], counts: RoutingCounts) -> None:
        metrics = {f"router/layer{s.layer}/{name}": value for s in stats for name, value in s.scalars().items()}
        for layer, shares in enumerate(self._time_share or []):
            metrics[f"router/layer{layer}/expert_time_share_max"] = max(shares)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
            if self.log_images and isinstance(logger, TensorBoardLogger):
                self._log_images(logger, step, stats)
        if self.stats_path is not None:
            self._append_record(step, stats, counts)

    def _log_images(self, logger: TensorBoardLogger, step: int, stats: list[LayerRoutingStats]) -> None:
        share_LE = torch.tensor([s.load_share for s in stats])
        for s in stats:
            logger.experiment.add_histogram(f"router/layer{s.layer}/load_share", share_LE[s.layer], step)
        # Brightest cell = busiest expert of any layer; cells enlarged so a few experts stay visible.
        image = (share_LE / share_LE.max().clamp_min(1e-12)).repeat_interleave(HEATMAP_CELL_PIXELS, 0)
        image = image.repeat_interleave(HEATMAP_CELL_PIXELS, 1)
        logger.experiment.add_image("router/load_heatmap", image[None], step, dataformats="CHW")

    def _append_record(self, step: int, stats: list[LayerRoutingStats], counts: RoutingCounts) -> None:
        record = {
            "step": step,
            "label_names": self.label_names,
            "layers": [
                {**s.as_dict(), "load": counts.load_LE[s.layer].tolist(),
                 "cooccurrence": counts.cooccurrence_LEE[s.layer].tolist(),
                 "label_expert": counts.label_expert_LCE[s.layer].tolist(),
                 **({"expert_time_share": self._time_share[s.layer]} if self._time_share else {})}
                for s in stats
            ],
            "transitions": counts.transitions_LEE.tolist(),
        }
        path = Path(self.stats_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as file:
            file.write(json.dumps(record) + "\n")

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**self._window.state_dict(), **self._probe.state_dict(), "stats_path": self.stats_path}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._window.load_state_dict(state_dict)
        self._probe.load_state_dict(state_dict)
        self.stats_path = state_dict["stats_path"]

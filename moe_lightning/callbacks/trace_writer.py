"""RoutingTraceWriter: sampled routing decisions with token ids and labels, for offline analysis."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

from moe_lightning.analytics import save_trace, trace_columns
from moe_lightning.callbacks.sampling import StepSampler, batch_labels, step_routings


class RoutingTraceWriter(Callback):
    """Every ``every_n_steps`` optimizer steps, rank zero writes the routing rows of the first ``max_tokens`` tokens
    of its batch, every layer, to ``dirpath/step{step:09d}.npz`` (columns: see :mod:`moe_lightning.analytics.traces`;
    read them back with :func:`moe_lightning.analytics.load_traces`). Other ranks' batches are not traced.

    Args:
        every_n_steps: optimizer steps between traces.
        max_tokens: tokens per trace, taken from the flattened ``[B, L]`` batch in order.
        dirpath: where the files go; ``None``: ``routing_traces`` in the trainer's log dir. Kept across resume.
        label_key: the batch key of the per-token labels; missing labels are written as -1.
    """

    def __init__(
        self, every_n_steps: int = 100, max_tokens: int = 1024, dirpath: str | None = None, label_key: str | None = "task_ids"
    ) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got every_n_steps={every_n_steps}")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got max_tokens={max_tokens}")
        self.every_n_steps = every_n_steps
        self.max_tokens = max_tokens
        self.dirpath = dirpath
        self.label_key = label_key
        self.written_steps: list[int] = []
        self._sampler = StepSampler(every_n_steps)

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps, max_tokens=self.max_tokens)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        log_dir = trainer.log_dir  # a collective: every rank asks
        if self.dirpath is None:
            self.dirpath = str(Path(log_dir or trainer.default_root_dir) / "routing_traces")

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if not self._sampler.sample(step) or not trainer.is_global_zero:
            return
        columns = trace_columns(step_routings(outputs), batch["input_ids"], batch_labels(batch, self.label_key), self.max_tokens)
        save_trace(self.dirpath, step, columns)
        self.written_steps.append(step)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"dirpath": self.dirpath, "written_steps": list(self.written_steps)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.dirpath = state_dict["dirpath"]
        self.written_steps = list(state_dict["written_steps"])

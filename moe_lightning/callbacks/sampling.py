"""Which training batches a router callback looks at: one per optimizer step, every n steps, for pure-int cost."""

from __future__ import annotations

from typing import Any

from moe_lightning.routing.base import Routing


class StepSampler:
    """Samples the batch that completed optimizer step ``s`` when ``s`` is one of the last ``window`` steps before a
    multiple of ``every``; :meth:`is_boundary` tells when that multiple is reached (time to reduce and report).

    ``on_train_batch_end`` sees ``trainer.global_step`` after the optimizer step, so the first batch that sees a
    new value is the one that completed that step; with gradient accumulation the other micro-batches are skipped.
    Deciding costs an int comparison and never touches a tensor.
    """

    def __init__(self, every: int, window: int = 1) -> None:
        if every < 1:
            raise ValueError(f"the interval must be >= 1 step, got {every}")
        if not 1 <= window <= every:
            raise ValueError(f"window must be in [1, {every}] steps, got window={window}")
        self.every = every
        self.window = window
        self._last_step = -1

    def sample(self, step: int) -> bool:
        if step == self._last_step:
            return False
        self._last_step = step
        return step > 0 and (-step) % self.every < self.window

    def is_boundary(self, step: int) -> bool:
        return step > 0 and step % self.every == 0


def step_routings(outputs: Any) -> list[Routing]:
    """The detached routings ``training_step`` returned (see :class:`MoELightningModule`)."""
    routings = outputs.get("routings") if isinstance(outputs, dict) else None
    if routings is None:
        raise ValueError(
            "router callbacks need training_step to return {'loss': ..., 'routings': [Routing per MoE layer]}, "
            f"as MoELightningModule does; got {type(outputs).__name__}"
        )
    return routings


def batch_labels(batch: Any, key: str | None) -> Any:
    """The per-token labels of a dict batch (e.g. ``task_ids``), or None."""
    return batch.get(key) if key is not None and isinstance(batch, dict) else None

"""LossTrace: appends each training step's loss, bit-exact, to a file that survives the process being killed."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override


class LossTrace(Callback):
    """One JSON line ``{"step", "loss"}`` per optimizer step (``loss`` as ``float.hex``), appended with one
    ``write`` on an ``O_APPEND`` descriptor: a kill leaves whole lines, at most the last one cut short."""

    def __init__(self, path: str) -> None:
        self.path = path

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not trainer.is_global_zero:
            return
        line = json.dumps({"step": trainer.global_step, "loss": float(outputs["loss"]).hex()}) + "\n"
        descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(descriptor, line.encode())
        finally:
            os.close(descriptor)


def read_trace(path: Path) -> list[tuple[int, str]]:
    """``(step, loss hex)`` of every whole line, in the order written (a resumed run logs some steps again)."""
    if not path.exists():
        return []
    lines = path.read_text().split("\n")[:-1]  # the text after the last newline is a line a kill cut short
    return [(record["step"], record["loss"]) for record in map(json.loads, lines)]

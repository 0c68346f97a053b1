"""The fit loop's state in a checkpoint saved after training stopped part-way through an epoch.

When ``max_steps`` (or ``should_stop``) ends ``fit`` in the middle of an epoch, Lightning still runs the epoch's end
and counts the epoch as completed, while its batch counter stays at the batch it stopped after. A checkpoint saved
then (``trainer.save_checkpoint`` after ``fit``, or ``save_last`` at train end) resumes at the *next* epoch, with
that epoch cut short by the stale batch count: other batches than an uninterrupted run's. Counting the epoch as
still running, as in a checkpoint saved after that batch, resumes it where it stopped.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl


def count_stopped_epoch_as_running(trainer: pl.Trainer, checkpoint: dict[str, Any]) -> None:
    """Rewrite ``checkpoint`` (being saved by ``trainer``) so a stopped, unfinished epoch resumes where it stopped."""
    fit_loop = trainer.fit_loop
    epochs = fit_loop.epoch_progress.current
    batches = fit_loop.epoch_loop.batch_progress
    if epochs.started == 0 or epochs.processed < epochs.started:  # inside the epoch: the state already says so
        return
    if batches.is_last_batch or batches.current.completed == 0 or batches.current.completed >= trainer.num_training_batches:
        return  # the epoch did end
    completed = epochs.completed == epochs.started  # saved after the epoch end, or (on_train_epoch_end) during it
    loop_state = checkpoint["loops"]["fit_loop"]["epoch_progress"]
    for counts in (loop_state["current"], loop_state["total"]):
        counts["processed"] -= 1
        counts["completed"] -= completed
    checkpoint["epoch"] -= completed

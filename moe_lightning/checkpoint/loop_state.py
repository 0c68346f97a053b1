"""Lightning's fit-loop epoch counters, kept true across restarts and stops, so that checkpoints resume exactly.

Resumed from a checkpoint taken after the last batch of an epoch, Lightning closes that epoch but does not count
the next one as started (it takes the restart for one inside the old epoch): while it runs, the counters say
"no epoch in progress", so a checkpoint taken in it resumed an epoch later, at the wrong batches.
:func:`count_epoch_as_started` counts it, from ``on_train_start``.

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


def count_epoch_as_started(trainer: pl.Trainer) -> None:
    """From ``on_train_start``: count the epoch a restart after an epoch's last batch goes on to as ready and
    started (Lightning closes the old epoch in its reset, then skips the new one's counts and start hooks)."""
    epochs = trainer.fit_loop.epoch_progress
    if trainer.fit_loop.restarted_mid_epoch and epochs.current.ready == epochs.current.processed:
        epochs.increment_ready()
        epochs.increment_started()

"""CrashSafeCheckpoint: a ModelCheckpoint whose ``last`` always names a complete checkpoint, however it is killed."""

from __future__ import annotations

import os
from datetime import timedelta

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override

from moe_lightning.checkpoint.atomic import replace_symlink
from moe_lightning.checkpoint.atomic_io import AtomicCheckpointIO


class CrashSafeCheckpoint(ModelCheckpoint):
    """Keeps the ``keep`` newest checkpoints by step and ``last.ckpt`` as a link to the newest; resume a killed run
    with ``--ckpt_path last``.

    What makes it safe to kill at any instant (``SIGKILL``, power loss):

    - every checkpoint is written whole under a temporary name and renamed into place (a Lightning ``.ckpt`` file
      through :class:`~moe_lightning.checkpoint.atomic_io.AtomicCheckpointIO`, installed here when the strategy
      uses the default ``TorchCheckpointIO``; an expert-parallel directory by the strategy itself, manifest last);
    - ``last.ckpt`` is a symbolic link, switched in one rename only after the checkpoint it will name is complete
      (``save_last="link"``; Lightning's ``save_last=True`` writes a second copy after the first, so a kill between
      the two resumes from the older one);
    - the checkpoint ``last.ckpt`` names is never the one removed: the oldest of ``keep >= 2`` goes, after the new
      one is complete (with one kept, Lightning removes the previous file before it moves the link);
    - a step saved again by a resumed run replaces the interrupted run's file of that step
      (``enable_version_counter=False``) instead of leaving it beside a ``-v1`` copy.

    Args:
        dirpath, filename, every_n_train_steps, train_time_interval, every_n_epochs: as in ``ModelCheckpoint``.
        keep: how many of the newest checkpoints to keep, at least 2; ``-1`` keeps every one.
    """

    def __init__(
        self,
        dirpath: str | None = None,
        filename: str | None = None,
        every_n_train_steps: int | None = None,
        train_time_interval: timedelta | None = None,
        every_n_epochs: int | None = None,
        keep: int = 2,
    ) -> None:
        if keep != -1 and keep < 2:
            raise ValueError(
                f"keep must be >= 2 (the checkpoint last.ckpt names stays until a newer one is complete) or -1, "
                f"got keep={keep}"
            )
        super().__init__(
            dirpath=dirpath, filename=filename, monitor="step", mode="max", save_top_k=keep, save_last="link",
            every_n_train_steps=every_n_train_steps, train_time_interval=train_time_interval,
            every_n_epochs=every_n_epochs, enable_version_counter=False,
        )

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # a CheckpointIO of the user's stays
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()

    @staticmethod
    @override
    def _link_checkpoint(trainer: pl.Trainer, filepath: str, linkpath: str) -> None:
        # Lightning removes the old link before it makes the new one: a kill in between leaves no last.ckpt at all.
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            replace_symlink(linkpath, os.path.relpath(filepath, os.path.dirname(linkpath)))
        trainer.strategy.barrier()

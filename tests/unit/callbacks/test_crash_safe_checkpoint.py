"""CrashSafeCheckpoint keeps the two newest checkpoints, last.ckpt a link to the newest, written atomically."""

import os

import pytest
from lightning.pytorch import Trainer
from lightning.pytorch.demos.boring_classes import BoringModel

from moe_lightning.callbacks import CrashSafeCheckpoint
from moe_lightning.checkpoint.atomic_io import AtomicCheckpointIO


def test_keeps_the_two_newest_and_links_last_to_the_newest(tmp_path):
    callback = CrashSafeCheckpoint(dirpath=str(tmp_path), every_n_train_steps=1)
    trainer = Trainer(max_steps=4, callbacks=[callback], logger=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=0, accelerator="cpu")
    trainer.fit(BoringModel())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch=0-step=3.ckpt", "epoch=0-step=4.ckpt", "last.ckpt"]
    assert os.readlink(tmp_path / "last.ckpt") == "epoch=0-step=4.ckpt"
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


@pytest.mark.parametrize("keep", [0, 1, -2])
def test_keeping_fewer_than_two_is_refused(keep):
    with pytest.raises(ValueError, match=f"keep must be >= 2 .* got keep={keep}"):
        CrashSafeCheckpoint(keep=keep)

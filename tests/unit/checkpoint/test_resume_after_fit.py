"""A checkpoint saved after fit stopped mid-epoch resumes the epoch where it stopped, with the generators as they
were: the losses after it equal an uninterrupted run's bit for bit (router jitter draws from the global RNG)."""

from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import Callback

from moe_lightning import MoELightningModule
from moe_lightning.callbacks import CrashSafeCheckpoint
from moe_lightning.data import ByteTextDataModule
from moe_lightning.models import MoETransformer
from moe_lightning.models.config import MoETransformerConfig
from moe_lightning.routing import TopKRouter

STEPS = 12  # five batches an epoch: the first run stops after step 7, two batches into epoch 1


class LossRecorder(Callback):
    def __init__(self):
        self.losses = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = float(outputs["loss"]).hex()


def _fit(max_steps, ckpt_path=None, save_to=None, checkpoints=None):
    seed_everything(0)
    config = MoETransformerConfig(vocab_size=256, dim=32, num_layers=2, num_heads=2, num_experts=4, expert_hidden_dim=48)
    model = MoETransformer(config, router=lambda d, e: TopKRouter(d, e, num_experts_per_token=2, jitter_eps=0.1))
    module = MoELightningModule(model, lr=1e-2, warmup_steps=2, max_steps=STEPS)
    recorder = LossRecorder()
    every_step = [] if checkpoints is None else [CrashSafeCheckpoint(str(checkpoints), every_n_train_steps=1, keep=-1)]
    trainer = Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=checkpoints is not None,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
                      callbacks=[recorder, *every_step])
    trainer.fit(module, ByteTextDataModule(max_bytes=800, seq_len=32, batch_size=4), ckpt_path=ckpt_path)
    if save_to is not None:
        trainer.save_checkpoint(save_to)
    return recorder.losses


def test_a_checkpoint_saved_after_fit_resumes_to_the_uninterrupted_losses(tmp_path):
    uninterrupted = _fit(STEPS)
    first = _fit(7, save_to=tmp_path / "end.ckpt")
    resumed = _fit(STEPS, ckpt_path=tmp_path / "end.ckpt")
    assert sorted(resumed) == list(range(8, STEPS + 1))
    assert {**first, **resumed} == uninterrupted


def test_a_resume_of_a_resume_across_an_epoch_end_keeps_the_uninterrupted_losses(tmp_path):
    # Resumed after the last batch of epoch 0 (step 5), Lightning left epoch 1 uncounted: a checkpoint taken in it
    # (step 7) resumed as epoch 0 again.
    uninterrupted = _fit(STEPS, checkpoints=tmp_path / "a")
    _fit(7, ckpt_path=tmp_path / "a" / "epoch=0-step=5.ckpt", checkpoints=tmp_path / "b")
    resumed = _fit(STEPS, ckpt_path=tmp_path / "b" / "epoch=1-step=7.ckpt")
    assert resumed == {step: loss for step, loss in uninterrupted.items() if step > 7}

"""MoELightningModule on CUDA: the Triton AdamW step, and bf16-mixed training with and without gradient clipping."""

import pytest
from lightning.pytorch import Callback, Trainer

from moe_lightning.kernels.adamw import TritonAdamW
from moe_lightning.models import MoETransformer, MoETransformerConfig
from moe_lightning.module import MoELightningModule
from tests.unit.helpers import pattern_loader

pytestmark = pytest.mark.gpu

CONFIG = MoETransformerConfig(vocab_size=32, dim=64, num_layers=2, num_heads=2, num_experts=4, expert_hidden_dim=64)


@pytest.mark.parametrize("clip", [None, 1.0])
def test_bf16_mixed_fits_with_and_without_clipping(tmp_path, clip):
    # Lightning's mixed-precision plugin refuses to clip for an optimizer that unscales itself (torch's fused AdamW);
    # TritonAdamW does not, so clipping keeps the fast step.
    module = MoELightningModule(MoETransformer(CONFIG), max_steps=3)
    kernel_steps = KernelSteps()
    trainer = Trainer(
        accelerator="gpu", devices=1, precision="bf16-mixed", gradient_clip_val=clip, max_steps=3, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        callbacks=[kernel_steps],
    )
    trainer.fit(module, train_dataloaders=pattern_loader(batch_size=4))
    assert trainer.global_step == 3
    assert kernel_steps.seen == [True] * 3


class KernelSteps(Callback):
    """Whether each step's optimizer was a TritonAdamW whose kernel applied (after fit, Lightning moves it to the CPU)."""

    def __init__(self) -> None:
        self.seen = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        optimizer = trainer.optimizers[0]
        self.seen.append(isinstance(optimizer, TritonAdamW) and optimizer._kernel_applies())

"""MoELightningModule on CUDA: fused AdamW where it can, and bf16-mixed training with gradient clipping."""

import pytest
from lightning.pytorch import Trainer

from moe_lightning.models import MoETransformer, MoETransformerConfig
from moe_lightning.module import MoELightningModule
from tests.unit.helpers import pattern_loader

pytestmark = pytest.mark.gpu

CONFIG = MoETransformerConfig(vocab_size=32, dim=64, num_layers=2, num_heads=2, num_experts=4, expert_hidden_dim=64)


@pytest.mark.parametrize("clip, fused", [(None, True), (1.0, False)])
def test_bf16_mixed_fits_with_and_without_clipping(tmp_path, clip, fused):
    # Lightning's mixed-precision plugin refuses to clip for an optimizer that unscales itself (fused AdamW).
    module = MoELightningModule(MoETransformer(CONFIG), max_steps=3)
    trainer = Trainer(
        accelerator="gpu", devices=1, precision="bf16-mixed", gradient_clip_val=clip, max_steps=3, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )
    trainer.fit(module, train_dataloaders=pattern_loader(batch_size=4))
    assert trainer.global_step == 3
    assert trainer.optimizers[0].defaults["fused"] is fused

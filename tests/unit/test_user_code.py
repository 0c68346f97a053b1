"""Written as a user would: subclass MoELightningModule, or put MoELayer into an own nn.Module."""

import torch
from lightning.pytorch import Trainer
from torch import nn

from moe_lightning import GroupedExperts, MoELayer, TopKRouter
from moe_lightning.models import MoETransformer, MoETransformerConfig
from moe_lightning.module import MoELightningModule
from tests.unit.helpers import LossRecorder, pattern_loader


class LabelSmoothedMoE(MoELightningModule):
    """A user's own objective: label-smoothed cross-entropy, plus the usual aux losses."""

    def compute_loss(self, batch, logits, routings):
        terms = super().compute_loss(batch, logits, routings)
        terms["ce"] = nn.functional.cross_entropy(
            logits.flatten(0, 1), batch["labels"].flatten(), label_smoothing=0.05
        )
        return terms


def test_subclassed_module_trains_and_loss_falls(tmp_path):
    model = MoETransformer(
        MoETransformerConfig(vocab_size=32, dim=32, num_layers=2, num_heads=2, num_experts=4, expert_hidden_dim=32)
    )
    module = LabelSmoothedMoE(model, lr=3e-3, warmup_steps=2)
    recorder = LossRecorder()
    trainer = Trainer(
        max_steps=40, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[recorder], default_root_dir=tmp_path,
    )
    trainer.fit(module, train_dataloaders=pattern_loader())
    losses = recorder.losses
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


class MyTaggerWithMoE(nn.Module):
    """A user's own model: embedding, one MoE feed-forward block, a classifier head."""

    def __init__(self, vocab_size=32, dim=32):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.moe = MoELayer(TopKRouter(dim, num_experts=4, num_experts_per_token=2), GroupedExperts(4, dim, 64))
        self.head = nn.Linear(dim, vocab_size)

    def forward(self, input_ids):
        h = self.embed(input_ids)
        y, routing = self.moe(h)
        return self.head(h + y), routing


def test_moe_layer_inside_a_plain_user_model_trains():
    model = MyTaggerWithMoE()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(3):
        for batch in pattern_loader():
            logits, routing = model(batch["input_ids"])
            loss = nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
            loss = loss + sum(routing.aux_losses.values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]

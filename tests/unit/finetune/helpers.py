"""A tiny MoE model, a quiet CPU trainer and parameter snapshots for the fine-tuning tests."""

import functools

import torch
from lightning.pytorch import LightningDataModule, Trainer

from moe_lightning.models import MoETransformer, MoETransformerConfig
from moe_lightning.module import MoELightningModule
from moe_lightning.routing import TopKRouter
from tests.unit.helpers import pattern_loader

CONFIG = MoETransformerConfig(
    vocab_size=32, dim=32, num_layers=2, num_heads=2, num_experts=4, expert_hidden_dim=16, max_seq_len=16,
)
STEPS = 3


def tiny_model(seed: int = 0, **overrides) -> MoETransformer:
    torch.manual_seed(seed)
    config = MoETransformerConfig(**{**CONFIG.__dict__, **overrides})
    return MoETransformer(config, router=functools.partial(TopKRouter, num_experts_per_token=2))


def tiny_module(model: MoETransformer | None = None, **kwargs) -> MoELightningModule:
    # A large learning rate and weight decay: any parameter the optimizer holds moves visibly in a few steps.
    options = {"lr": 1e-2, "weight_decay": 0.1, "warmup_steps": 0, **kwargs}
    return MoELightningModule(model or tiny_model(), **options)


class PatternDataModule(LightningDataModule):
    def train_dataloader(self):
        return pattern_loader(batch_size=4)


def fit(module: MoELightningModule, callbacks, tmp_path, steps: int = STEPS) -> Trainer:
    torch.manual_seed(0)
    trainer = Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, callbacks=callbacks,
    )
    trainer.fit(module, datamodule=PatternDataModule())
    return trainer


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by name, copied."""
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def expert_weights(model: MoETransformer) -> list[dict[str, torch.Tensor]]:
    """Per MoE layer, the routed experts' effective weights (through any parametrization), copied."""
    return [{name: getattr(layer.experts, name).detach().clone() for name in ("w_in_EDH", "w_down_EFD")}
            for layer in model.moe_layers]

"""MoELightningModule: the objective, the aux-free bias step, optimizer groups, schedule and input checks."""

import math

import pytest
import torch
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.callbacks import Callback

from moe_lightning.models import MoETransformer, MoETransformerConfig
from moe_lightning.module import MoELightningModule, warmup_cosine
from moe_lightning.routing import TopKRouter
from tests.unit.helpers import pattern_loader

CONFIG = MoETransformerConfig(vocab_size=32, dim=32, num_layers=2, num_heads=2, num_experts=4, expert_hidden_dim=32)


def quiet_trainer(tmp_path, **kwargs):
    return Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, **kwargs,
    )


def test_loss_is_cross_entropy_plus_every_layers_aux_losses():
    module = MoELightningModule(MoETransformer(CONFIG))
    batch = next(iter(pattern_loader(batch_size=2)))
    logits, routings = module(batch)
    terms = module.compute_loss(batch, logits, routings)

    log_probs = torch.log_softmax(logits.double(), dim=-1)
    nll = -log_probs.gather(-1, batch["labels"].unsqueeze(-1)).mean()
    assert terms["ce"].item() == pytest.approx(nll.item(), rel=1e-5)
    expected_balance = sum(r.aux_losses["load_balance"] for r in routings)
    assert terms["load_balance"].item() == pytest.approx(expected_balance.item())
    assert set(terms) == {"ce", "load_balance"}


def test_expert_bias_steps_once_per_optimizer_step_from_all_micro_batches(tmp_path):
    router = lambda dim, num_experts: TopKRouter(dim, num_experts, 2, expert_bias=True, load_balance_coef=0.0)
    module = MoELightningModule(MoETransformer(CONFIG, router=router))
    calls = []
    for layer in module.model.moe_layers:
        original = layer.router.update_expert_bias

        def spy(load_E, original=original):
            calls.append(load_E.clone())
            original(load_E)

        layer.router.update_expert_bias = spy
    quiet_trainer(tmp_path, max_steps=3, accumulate_grad_batches=2).fit(module, pattern_loader(batch_size=4))

    assert len(calls) == 3 * len(module.model.moe_layers)
    rows_per_step = 2 * 4 * 16 * 2  # micro-batches x batch x length x top-k
    assert all(load.sum().item() == rows_per_step for load in calls)
    assert all(layer.router.expert_bias_E.abs().sum() > 0 for layer in module.model.moe_layers)


def test_router_gets_its_own_learning_rate_and_only_matrices_decay():
    module = MoELightningModule(MoETransformer(CONFIG), lr=1e-3, router_lr=1e-4, weight_decay=0.1)
    groups = module.param_groups()
    router_ids = {id(layer.router.gate.weight) for layer in module.model.moe_layers}
    for group in groups:
        in_router = {id(p) in router_ids for p in group["params"]}
        assert len(in_router) == 1
        assert group["lr"] == (1e-4 if in_router.pop() else 1e-3)
        assert group["weight_decay"] == (0.1 if group["params"][0].dim() >= 2 else 0.0)
    assert sum(len(g["params"]) for g in groups) == len(list(module.parameters()))


def test_warmup_then_cosine_to_the_floor():
    schedule = warmup_cosine(warmup_steps=4, total_steps=14, min_ratio=0.1)
    assert [schedule(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert schedule(9) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert schedule(14) == pytest.approx(0.1)
    assert schedule(100) == pytest.approx(0.1)


class WideVocabData(LightningDataModule):
    vocab_size = 1000

    def train_dataloader(self):
        return pattern_loader()


def test_vocab_mismatch_between_data_and_model_fails_before_training(tmp_path):
    with pytest.raises(ValueError, match="vocab_size=1000 .* vocab_size=32"):
        quiet_trainer(tmp_path, max_steps=1).fit(MoELightningModule(MoETransformer(CONFIG)), datamodule=WideVocabData())


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(lr=0), "lr=0"), (dict(warmup_steps=-1), "warmup_steps=-1"), (dict(min_lr_ratio=2), "min_lr_ratio=2")],
)
def test_invalid_hyperparameters_name_the_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MoELightningModule(MoETransformer(CONFIG), **kwargs)


def test_missing_model_is_explained(tmp_path):
    with pytest.raises(ValueError, match="needs a model"):
        quiet_trainer(tmp_path, max_steps=1).fit(MoELightningModule(None), pattern_loader())


def test_training_step_hands_detached_routings_to_callbacks(tmp_path):
    seen = []

    class Inspect(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(outputs["routings"])

    module = MoELightningModule(MoETransformer(CONFIG))
    quiet_trainer(tmp_path, max_steps=2, callbacks=[Inspect()]).fit(module, pattern_loader(batch_size=4))
    assert len(seen) == 2 and len(seen[0]) == len(module.model.moe_layers)
    routing = seen[0][0]
    assert not routing.weight_N.requires_grad and not routing.probs_TE.requires_grad
    assert routing.tokens_per_expert_E.sum() == 4 * 16 * 2

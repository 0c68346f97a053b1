"""CapacityAutoTuner under expert parallelism on 2 gloo processes: both ranks set the same factors, solved from both
ranks' loads, and the dropped fraction of both ranks' tokens is in the target band after two updates and stays
(in the first MoE layer: the unit test says why a later one can take longer)."""

import functools

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from moe_lightning import ExpertParallelStrategy
from moe_lightning.callbacks.capacity_tuner import (
    CapacityAutoTuner,
    capacity_factor_for_drop_rate,
    imputed_requested_load,
)
from moe_lightning.data import SyntheticTasksDataModule
from moe_lightning.models import MoETransformer, MoETransformerConfig
from moe_lightning.module import MoELightningModule
from moe_lightning.routing import TopKRouter
from tests.distributed.launch import run_workers
from tests.unit.callbacks.fixtures import RecordingLogger

STEPS, EVERY, TARGET, TOLERANCE = 20, 5, 0.05, 0.025


class LoadsAndFactors(Callback):
    """Per step: this rank's kept load and dropped rows per layer, and the routers' factors after the tuner ran."""

    def __init__(self):
        self.steps = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        routings = outputs["routings"]
        self.steps[trainer.global_step] = {
            "kept": [r.tokens_per_expert_E.clone() for r in routings],
            "dropped": [r.num_dropped.clone() for r in routings],
            "factors": [layer.router.capacity_factor for layer in pl_module.model.moe_layers],
        }


def _fit(rank, world_size, tmp):
    torch.manual_seed(0)  # the same initial model on both ranks; each reads its own half of the data
    # A small learning rate keeps the loads nearly still (the unit test says why).
    data = SyntheticTasksDataModule(seq_len=64, batch_size=8, num_train_samples=512, num_val_samples=8)
    config = MoETransformerConfig(vocab_size=data.vocab_size, dim=32, num_layers=2, num_heads=2, num_experts=8,
                                  expert_hidden_dim=32, max_seq_len=64)
    router = functools.partial(TopKRouter, num_experts_per_token=2, capacity_factor=1.0)
    module = MoELightningModule(MoETransformer(config, router=router), lr=1e-5, warmup_steps=5, log_layer_stats=False)
    tuner = CapacityAutoTuner(target_drop_rate=TARGET, tolerance=TOLERANCE, check_every_n_steps=EVERY)
    recorder, logger = LoadsAndFactors(), RecordingLogger()
    fit = Trainer(accelerator="cpu", devices=world_size, strategy=ExpertParallelStrategy(), max_steps=STEPS,
                  logger=logger, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                  limit_val_batches=0, callbacks=[tuner, recorder])
    fit.fit(module, data)
    torch.save({"steps": recorder.steps, "metrics": logger.metrics, "factors": tuner.capacity_factors},
               f"{tmp}/rank{rank}.pt")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("capacity")
    run_workers(_fit, 2, str(tmp))
    return [torch.load(tmp / f"rank{rank}.pt", weights_only=False) for rank in range(2)]


def test_both_ranks_set_the_same_factors_at_every_step(ranks):
    assert ranks[0]["factors"] == ranks[1]["factors"]
    for step in range(1, STEPS + 1):
        assert ranks[0]["steps"][step]["factors"] == ranks[1]["steps"][step]["factors"], step


def test_the_first_check_solves_from_both_ranks_windows(ranks):
    for layer in (0, 1):
        kept = torch.stack([r["steps"][s]["kept"][layer] for r in ranks for s in range(1, EVERY + 1)])
        dropped = torch.stack([r["steps"][s]["dropped"][layer] for r in ranks for s in range(1, EVERY + 1)])
        measured = float(dropped.sum() / (kept.sum() + dropped.sum()))
        assert ranks[0]["metrics"][EVERY][f"capacity/layer{layer}/dropped_fraction"] == pytest.approx(measured)
        expected = min(max(capacity_factor_for_drop_rate(imputed_requested_load(kept, dropped), TARGET), 1.0), 4.0)
        assert ranks[0]["steps"][EVERY]["factors"][layer] == pytest.approx(expected)


def test_the_dropped_fraction_is_in_the_band_after_two_updates_and_stays(ranks):
    metrics = ranks[0]["metrics"]
    checks = range(EVERY, STEPS + 1, EVERY)
    drops = {layer: [metrics[step][f"capacity/layer{layer}/dropped_fraction"] for step in checks] for layer in (0, 1)}
    for layer in (0, 1):
        assert drops[layer][0] > 0.1, drops  # a factor of 1 drops over 10% at first
        assert drops[layer][1] <= TARGET, drops  # a raise drops at most the target
    assert all(abs(d - TARGET) <= TOLERANCE for d in drops[0][2:]), drops

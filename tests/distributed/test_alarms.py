"""RoutingAlarms under expert parallelism on 2 gloo processes: both ranks fire the same alarms from the statistics of
both ranks' tokens (the churn probe's forward, an all-to-all, runs on both), bump the same biases and stop at the same
step; a reinit alarm, which cannot copy experts another rank holds, is refused."""

import functools

import pytest
import torch
from lightning.pytorch import Trainer

from moe_lightning import ExpertParallelStrategy
from moe_lightning.callbacks.alarms import AlarmRule, RoutingAlarms
from moe_lightning.models import MoETransformer, MoETransformerConfig
from moe_lightning.module import MoELightningModule
from moe_lightning.routing import TopKRouter
from tests.distributed.launch import run_workers
from tests.unit.callbacks.fixtures import loader

RULES = [
    AlarmRule("churn", 0.0),  # any change of the probe's top-1 experts
    AlarmRule("dead_experts", 0, action="bias_bump"),
    AlarmRule("load_entropy", 1.0, patience=3, action="stop"),  # below 1 at every check: stops at the third
]


def build_module():
    torch.manual_seed(0)
    config = MoETransformerConfig(vocab_size=32, dim=16, num_layers=2, num_heads=2, num_experts=4, expert_hidden_dim=16)
    router = functools.partial(TopKRouter, num_experts_per_token=2, expert_bias=True, bias_update_rate=0.0)
    model = MoETransformer(config, router=router)
    for layer in model.moe_layers:
        layer.router.expert_bias_E.copy_(torch.tensor([-1.0, 0, 0, 0]))  # expert 0 is dead until its bias is bumped
    return MoELightningModule(model, warmup_steps=1, log_layer_stats=False)


def fit(world_size, alarms, max_steps, tmp):
    module = build_module()
    Trainer(accelerator="cpu", devices=world_size, strategy=ExpertParallelStrategy(), max_steps=max_steps,
            logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            limit_val_batches=0, callbacks=[alarms], default_root_dir=tmp).fit(module, loader())
    return module


def _worker(rank, world_size, tmp):
    alarms = RoutingAlarms(RULES, check_every_n_steps=1, bias_bump=2.0)
    module = fit(world_size, alarms, max_steps=10, tmp=tmp)
    refused = None
    try:
        fit(world_size, RoutingAlarms([AlarmRule("dead_experts", 0, action="reinit")]), max_steps=1, tmp=tmp)
    except ValueError as error:
        refused = str(error)
    torch.save({
        "fired": [(a.step, a.layer, a.metric, a.value, a.experts) for a in alarms.fired],
        "step": module.trainer.global_step,
        "biases": [layer.router.expert_bias_E.clone() for layer in module.model.moe_layers],
        "refused": refused,
        "alarms_file": alarms.alarms_path,
    }, f"{tmp}/rank{rank}.pt")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("alarms")
    run_workers(_worker, 2, str(tmp))
    return [torch.load(tmp / f"rank{rank}.pt", weights_only=False) for rank in range(2)]


def test_both_ranks_fire_the_same_alarms_and_stop_at_the_same_step(ranks):
    assert ranks[0]["fired"] == ranks[1]["fired"]
    fired = {(step, layer, metric) for step, layer, metric, _, _ in ranks[0]["fired"]}
    assert {(1, 0, "dead_experts"), (1, 1, "dead_experts"), (3, 0, "load_entropy"), (3, 1, "load_entropy")} <= fired
    assert ranks[0]["step"] == ranks[1]["step"] == 3
    assert ranks[0]["alarms_file"] == ranks[1]["alarms_file"]  # written by rank 0 only


def test_the_bias_bumps_are_the_same_on_both_ranks_and_what_the_alarms_say(ranks):
    fired = ranks[0]["fired"]
    bumps = [(step, layer, experts) for step, layer, metric, _, experts in fired if metric == "dead_experts"]
    assert bumps[:2] == [(1, 0, [0]), (1, 1, [0])]  # expert 0, dead from the start, is bumped at the first check
    for layer in (0, 1):
        expected = torch.tensor([-1.0, 0, 0, 0])
        for _, bumped_layer, experts in bumps:
            if bumped_layer == layer:
                expected[experts] += 2.0
        assert torch.equal(ranks[0]["biases"][layer], expected) and torch.equal(ranks[1]["biases"][layer], expected)


def test_a_reinit_alarm_is_refused_under_expert_parallelism(ranks):
    for rank in ranks:
        assert "under expert parallelism each rank holds a slice of the experts" in rank["refused"]

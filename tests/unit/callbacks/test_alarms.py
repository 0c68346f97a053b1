import functools
import json
import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing import event_accumulator

from moe_lightning.callbacks.alarms import AlarmRule, RoutingAlarms
from moe_lightning.cli import MoELightningCLI
from moe_lightning.models import MoETransformer
from moe_lightning.module import MoELightningModule
from moe_lightning.routing import TopKRouter
from tests.unit.callbacks.fixtures import CONFIG, RecordingLogger, loader, tiny_module, trainer

ROOT = Path(__file__).resolve().parents[3]
# One rule per alarm, with thresholds a healthy run of the tiny model stays clear of (it measures churn <= 0.19,
# near-tie fractions <= 0.49 of its near-uniform untrained router, load entropy >= 0.93, no dead expert).
RULES = {
    "churn": AlarmRule("churn", 0.5),
    "near_tie_fraction": AlarmRule("near_tie_fraction", 0.9),
    "dead_experts": AlarmRule("dead_experts", 0),
    "load_entropy": AlarmRule("load_entropy", 0.6),  # collapse
}


def fit(tmp_path, alarms, module=None, max_steps=2, logger=False, callbacks=()):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fitted = trainer(tmp_path, [*callbacks, alarms], logger=logger, max_steps=max_steps)
        fitted.fit(module or tiny_module(), loader())
    return fitted, [str(w.message) for w in caught if "routing alarm" in str(w.message)]


def biased_module(bias):
    """Top-2 routers whose fixed selection bias (no bias updates) decides which experts are picked."""
    torch.manual_seed(0)
    router = functools.partial(TopKRouter, num_experts_per_token=2, expert_bias=True, bias_update_rate=0.0)
    model = MoETransformer(CONFIG, router=router)
    for layer in model.moe_layers:
        layer.router.expert_bias_E.copy_(torch.tensor(bias))
    return MoELightningModule(model, warmup_steps=1)


def flat_router_module():
    """Routers with tiny frozen gates: every score is within ~1e-4 of 1/E, far inside the bf16 margin, so every token
    is a near-tie, yet which experts win still depends on the token (exact ties would all go to experts 0 and 1)."""
    module = tiny_module()
    for layer in module.model.moe_layers:
        with torch.no_grad():
            layer.router.gate.weight.mul_(1e-4)
        layer.router.gate.weight.requires_grad_(False)
    return module


class RollRouterGates(Callback):
    """After every batch, each router's gate rows move one expert on: every token's top-1 expert changes."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        with torch.no_grad():
            for layer in pl_module.model.moe_layers:
                layer.router.gate.weight.copy_(layer.router.gate.weight.roll(1, dims=0))


def test_no_alarm_fires_on_a_healthy_run(tmp_path):
    alarms = RoutingAlarms(list(RULES.values()), check_every_n_steps=2)
    _, fired = fit(tmp_path, alarms, max_steps=12)
    assert fired == [] and alarms.fired == []
    assert not list(tmp_path.rglob("alarms.jsonl"))


@pytest.mark.parametrize(
    "metric, module, callbacks, step, value",
    [
        ("churn", tiny_module, [RollRouterGates()], 2, 1.0),  # the first churn is measured at the second check
        ("near_tie_fraction", flat_router_module, [], 1, 1.0),
        ("dead_experts", lambda: biased_module([-1.0, 0, 0, 0]), [], 1, 1.0),  # expert 0 is never picked
        ("load_entropy", lambda: biased_module([1.0, 1.0, 0, 0]), [], 1, 0.5),  # all tokens on experts 0 and 1
    ],
)
def test_each_alarm_fires_on_a_run_built_to_trigger_it_and_only_that_alarm(tmp_path, metric, module, callbacks, step,
                                                                         value):
    # Collapse also kills experts 2 and 3, so there the dead-experts rule fires too; the others stay quiet.
    expected = {metric, "dead_experts"} if metric == "load_entropy" else {metric}
    alarms = RoutingAlarms(list(RULES.values()), check_every_n_steps=1)
    _, fired = fit(tmp_path, alarms, module(), max_steps=2, callbacks=callbacks)
    assert {alarm.metric for alarm in alarms.fired} == expected
    first = next(alarm for alarm in alarms.fired if alarm.metric == metric)
    assert (first.step, first.layer, first.value) == (step, 0, pytest.approx(value))
    assert any(message.startswith(f"routing alarm at step {step}, MoE layer 0: {metric}=") for message in fired)


def test_patience_counts_consecutive_checks_and_starts_over_after_firing(tmp_path):
    alarms = RoutingAlarms([AlarmRule("dead_experts", 0, patience=2)], check_every_n_steps=1)
    fit(tmp_path, alarms, biased_module([-1.0, 0, 0, 0]), max_steps=5)
    assert [alarm.step for alarm in alarms.fired if alarm.layer == 0] == [2, 4]
    assert alarms.strikes == [[1, 1]]


def test_a_resumed_run_keeps_counting_strikes_and_appends_to_the_same_alarms_file(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=2)
    rules = [AlarmRule("dead_experts", 0, patience=3), AlarmRule("churn", 0.5)]
    first = RoutingAlarms(rules, check_every_n_steps=1)
    logger = TensorBoardLogger(tmp_path, name="tb")
    fitted = trainer(tmp_path, [checkpoint, first], logger=logger, max_steps=2, enable_checkpointing=True)
    fitted.fit(biased_module([-1.0, 0, 0, 0]), loader())
    assert first.fired == [] and first.strikes[0] == [2, 2]

    resumed = RoutingAlarms(rules, check_every_n_steps=1)
    fitted = trainer(tmp_path, [resumed], logger=TensorBoardLogger(tmp_path, name="other"), max_steps=3)
    fitted.fit(biased_module([-1.0, 0, 0, 0]), loader(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert [(a.step, a.metric) for a in resumed.fired] == [(3, "dead_experts"), (3, "dead_experts")]
    assert resumed.alarms_path == first.alarms_path  # the first run's file, not the new logger's
    assert len((tmp_path / "tb" / "version_0" / "alarms.jsonl").read_text().splitlines()) == 2


def test_stop_ends_training_at_the_check_that_fires(tmp_path):
    alarms = RoutingAlarms([AlarmRule("dead_experts", 0, patience=2, action="stop")], check_every_n_steps=1)
    fitted, fired = fit(tmp_path, alarms, biased_module([-1.0, 0, 0, 0]), max_steps=10)
    assert fitted.global_step == 2 and "action='stop': stopping training" in fired[0]


def test_bias_bump_raises_the_dead_experts_selection_bias(tmp_path):
    alarms = RoutingAlarms([AlarmRule("dead_experts", 0, action="bias_bump")], check_every_n_steps=1, bias_bump=2.0)
    module = biased_module([-1.0, 0, 0, 0])
    _, fired = fit(tmp_path, alarms, module, max_steps=1)
    for layer in module.model.moe_layers:
        assert layer.router.expert_bias_E.tolist() == [1.0, 0, 0, 0]  # -1 + 2: expert 0 is now picked first
    assert [alarm.experts for alarm in alarms.fired] == [[0], [0]]
    assert "raised the selection bias of experts [0] by 2.0" in fired[0]


def test_reinit_acts_once_per_layer_when_several_of_its_rules_fire(tmp_path):
    rules = [AlarmRule("dead_experts", 0, action="reinit"), AlarmRule("load_entropy", 0.6, action="reinit")]
    alarms = RoutingAlarms(rules, check_every_n_steps=1)
    module = biased_module([1.0, 1.0, 0, 0])  # experts 2 and 3 dead; a bias keeps them dead, the copy is still made
    before = module.model.moe_layers[0].experts.w_in_EDH.detach().clone()
    fit(tmp_path, alarms, module, max_steps=1)
    assert len(alarms.fired) == 4 and alarms.num_reinits == 2  # 2 rules x 2 layers; one re-initialisation per layer
    assert {tuple(alarm.experts) for alarm in alarms.fired} == {(2, 3)}
    after = module.model.moe_layers[0].experts.w_in_EDH
    assert not torch.allclose(after[2:], before[2:], atol=1e-3) and torch.allclose(after[2], after[0], atol=0.1)


def test_bias_bump_needs_routers_with_an_expert_bias(tmp_path):
    alarms = RoutingAlarms([AlarmRule("dead_experts", 0, action="bias_bump")])
    with pytest.raises(ValueError, match=r"needs routers with expert_bias=True; these MoE layers have none: \['model"):
        fit(tmp_path, alarms)


def test_fired_alarms_reach_the_loggers_tensorboard_text_and_the_alarms_file(tmp_path):
    recording, tensorboard = RecordingLogger(), TensorBoardLogger(tmp_path, name="tb")
    alarms = RoutingAlarms([RULES["dead_experts"]], check_every_n_steps=1)
    fit(tmp_path, alarms, biased_module([-1.0, 0, 0, 0]), max_steps=2, logger=[tensorboard, recording])
    assert recording.metrics[1] == {"alarms/layer0/dead_experts": 1.0, "alarms/layer1/dead_experts": 1.0}
    lines = (tmp_path / "tb" / "version_0" / "alarms.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [(r["step"], r["layer"], r["metric"], r["value"], r["action"]) for r in records] == [
        (1, 0, "dead_experts", 1.0, "warn"), (1, 1, "dead_experts", 1.0, "warn"),
        (2, 0, "dead_experts", 1.0, "warn"), (2, 1, "dead_experts", 1.0, "warn"),
    ]
    assert records[0]["message"].startswith("routing alarm at step 1, MoE layer 0: dead_experts=1 above the threshold")
    events = event_accumulator.EventAccumulator(str(tmp_path / "tb" / "version_0"), size_guidance={"tensors": 0})
    events.Reload()
    texts = [(e.step, e.tensor_proto.string_val[0].decode()) for e in events.Tensors("alarms/text_summary")]
    assert texts == [(r["step"], r["message"]) for r in records]


@pytest.mark.parametrize(
    "rule, error, message",
    [
        (dict(metric="churn", threshold="0.2"), TypeError,
         "alarm rule 'churn': threshold must be a number, got threshold='0.2' of type str"),
        (dict(metric="entropy", threshold=0.2), ValueError, r"unknown alarm metric 'entropy'; choose from \['churn'"),
        (dict(metric="churn", threshold=0.2, action="explode"), ValueError,
         r"alarm rule 'churn': unknown action 'explode'; choose from \['warn', 'stop', 'reinit', 'bias_bump'\]"),
        (dict(metric="churn", threshold=1.5), ValueError, r"threshold must be in \[0, 1\], got threshold=1.5"),
        (dict(metric="imbalance", threshold=-1), ValueError, "threshold must be >= 0, got threshold=-1"),
        (dict(metric="churn", threshold=0.2, patience=0), ValueError, "patience must be >= 1, got patience=0"),
        (dict(metric="churn", threshold=0.2, patience="2"), TypeError, "patience must be an int, got patience='2'"),
        (dict(metric="churn", threshold=0.2, action="reinit"), ValueError,
         "action='reinit' acts on the layer's dead experts, so it needs a load metric"),
    ],
)
def test_bad_rules_are_named(rule, error, message):
    with pytest.raises(error, match=message):
        AlarmRule(**rule)
    with pytest.raises(error, match=message):  # and as a dict, the way a config gives it
        RoutingAlarms([rule])


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(rules=[]), ValueError, "rules must be a non-empty list of alarm rules, got rules=\\[\\]"),
        (dict(rules=RULES["churn"]), ValueError, "rules must be a non-empty list"),
        (dict(rules=["churn"]), TypeError, "an alarm rule must be an AlarmRule or a dict of its fields, got 'churn'"),
        (dict(rules=[RULES["churn"]], probe_size=0), ValueError, "a churn alarm .* needs probe_size > 0"),
        (dict(rules=[RULES["dead_experts"]], bias_bump=-1), ValueError, "bias_bump must be >= 0, got bias_bump=-1"),
        (dict(rules=[RULES["dead_experts"]], dead_threshold="low"), TypeError, "dead_threshold='low'"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, message):
    with pytest.raises(error, match=message):
        RoutingAlarms(**kwargs)


def test_a_yaml_rule_with_a_string_threshold_is_refused_by_the_config_parser(tmp_path, capsys):
    callbacks = [{"class_path": "moe_lightning.callbacks.alarms.RoutingAlarms",
                  "init_args": {"rules": [{"metric": "churn", "threshold": "high"}]}}]
    args = ["--config", str(ROOT / "configs" / "tiny.yaml"), f"--trainer.default_root_dir={tmp_path}",
            "--trainer.logger=false", f"--trainer.callbacks={json.dumps(callbacks)}"]
    with pytest.raises(SystemExit):
        MoELightningCLI(run=False, args=args, save_config_kwargs={"overwrite": True})
    error = capsys.readouterr().err
    assert 'Parser key "threshold"' in error and "Got value: high" in error

import json

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from moe_lightning.callbacks import RouterStatsMonitor
from tests.unit.callbacks.fixtures import (
    ROWS_PER_STEP,
    RecordingLogger,
    StepRecorder,
    loader,
    plain_load,
    tiny_module,
    trainer,
)


def test_logs_every_n_steps_to_every_logger_with_tensorboard_images(tmp_path):
    recorder, logger = StepRecorder(), RecordingLogger()
    tensorboard = TensorBoardLogger(tmp_path, name="tb")
    monitor = RouterStatsMonitor(log_every_n_steps=2, num_labels=2)
    trainer(tmp_path, [recorder, monitor], logger=[tensorboard, logger], max_steps=4).fit(tiny_module(), loader())

    assert sorted(logger.metrics) == [2, 4]
    for step in (2, 4):
        routings, _ = recorder.steps[step]
        for layer, routing in enumerate(routings):
            load = plain_load(routing, 4)
            metrics = logger.metrics[step]
            assert metrics[f"router/layer{layer}/imbalance"] == pytest.approx(max(load) / (sum(load) / 4))
            assert 0 <= metrics[f"router/layer{layer}/nmi"] <= 1
            assert metrics[f"router/layer{layer}/dropped_fraction"] == 0
    assert "router/layer0/churn" not in logger.metrics[2] and "router/layer0/churn" in logger.metrics[4]

    records = [json.loads(line) for line in (tmp_path / "tb" / "version_0" / "router_stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    assert records[0]["layers"][1]["routed_rows"] == ROWS_PER_STEP
    assert len(records[0]["layers"][0]["label_expert"]) == 2 and len(records[0]["transitions"]) == 1
    events = list((tmp_path / "tb" / "version_0").glob("events.out.tfevents.*"))
    assert events and max(e.stat().st_size for e in events) > 1000  # histograms and the heatmap went in


def test_unsampled_steps_do_not_touch_the_outputs():
    monitor = RouterStatsMonitor(log_every_n_steps=10)

    class Step:
        global_step = 3

    monitor.on_train_batch_end(Step(), None, outputs=None, batch=None, batch_idx=0)  # would raise if it looked


def test_window_counts_survive_checkpoint_and_resume(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=3)
    kwargs = dict(log_every_n_steps=4, window_steps=2, num_labels=2)
    first = trainer(tmp_path, [RouterStatsMonitor(**kwargs), checkpoint], max_steps=3, enable_checkpointing=True)
    first.fit(tiny_module(), loader())
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["callbacks"]
    (state,) = [v for k, v in saved.items() if k.startswith("RouterStatsMonitor")]
    assert state["counts"]["load_LE"].sum() == 2 * ROWS_PER_STEP  # 2 layers x step 3

    resumed = RouterStatsMonitor(**kwargs)
    trainer(tmp_path / "resumed", [resumed], max_steps=4).fit(tiny_module(), loader(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    # The stats file and the step-3 counts carried over: the step-4 record sums steps 3 and 4.
    (record,) = [json.loads(line) for line in (tmp_path / "router_stats.jsonl").read_text().splitlines()]
    assert record["step"] == 4 and record["layers"][0]["routed_rows"] == 2 * ROWS_PER_STEP
    assert resumed.state_dict()["counts"] is None  # reset after the record


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(log_every_n_steps=0), "log_every_n_steps=0"), (dict(log_every_n_steps=5, window_steps=6), "window=6"),
     (dict(dead_threshold=-1), "dead_threshold=-1"), (dict(num_labels=0), "num_labels=0")],
)
def test_invalid_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RouterStatsMonitor(**kwargs)


def test_expert_time_shares_reach_the_record_when_timing_is_on(tmp_path):
    logger = RecordingLogger()
    tensorboard = TensorBoardLogger(tmp_path, name="tb")
    monitor = RouterStatsMonitor(log_every_n_steps=2, num_labels=2, time_experts=True)
    trainer(tmp_path, [monitor], logger=[tensorboard, logger], max_steps=2).fit(tiny_module(), loader())
    record = json.loads((tmp_path / "tb" / "version_0" / "router_stats.jsonl").read_text().splitlines()[0])
    for layer, stats in enumerate(record["layers"]):
        assert len(stats["expert_time_share"]) == 4 and sum(stats["expert_time_share"]) == pytest.approx(1.0)
        assert logger.metrics[2][f"router/layer{layer}/expert_time_share_max"] == max(stats["expert_time_share"])


def test_timing_without_a_probe_is_refused():
    with pytest.raises(ValueError, match="needs probe_size > 0"):
        RouterStatsMonitor(time_experts=True, probe_size=0)

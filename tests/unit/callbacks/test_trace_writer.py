import pytest

from moe_lightning.analytics import load_traces
from moe_lightning.callbacks import RoutingTraceWriter
from tests.unit.callbacks.fixtures import StepRecorder, loader, tiny_module, trainer


def test_traces_every_n_steps_with_token_ids_and_labels(tmp_path):
    recorder, writer = StepRecorder(), RoutingTraceWriter(every_n_steps=2, max_tokens=5)
    trainer(tmp_path, [recorder, writer], max_steps=4).fit(tiny_module(), loader())

    assert writer.dirpath == str(tmp_path / "routing_traces") and writer.written_steps == [2, 4]
    table = load_traces(writer.dirpath)
    assert sorted(set(table["step"].tolist())) == [2, 4]
    for step in (2, 4):
        routings, batch = recorder.steps[step]
        at_step = table["step"] == step
        assert at_step.sum() == 2 * 5 * 2  # layers x tokens x top-k
        ids, labels = batch["input_ids"].flatten().tolist(), batch["task_ids"].flatten().tolist()
        for layer, token, token_id, label, expert in zip(
            *(table[name][at_step].tolist() for name in ("layer", "token", "token_id", "label", "expert"))
        ):
            assert token_id == ids[token] and label == labels[token]
            routing = routings[layer]
            rows = [e for t, e in zip(routing.token_idx_N.tolist(), routing.expert_idx_N.tolist()) if t == token]
            assert expert in rows


def test_state_round_trips():
    writer = RoutingTraceWriter(dirpath="somewhere")
    writer.written_steps = [100]
    restored = RoutingTraceWriter()
    restored.load_state_dict(writer.state_dict())
    assert restored.dirpath == "somewhere" and restored.written_steps == [100]


@pytest.mark.parametrize("kwargs, message", [(dict(every_n_steps=0), "every_n_steps=0"), (dict(max_tokens=0), "max_tokens=0")])
def test_invalid_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RoutingTraceWriter(**kwargs)

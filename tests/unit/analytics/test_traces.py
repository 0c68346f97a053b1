import numpy as np
import torch

from moe_lightning.analytics import load_traces, save_trace, trace_columns
from tests.unit.analytics.routings import example_routing


def test_trace_keeps_rows_of_the_first_tokens_with_ids_and_labels(tmp_path):
    columns = trace_columns([example_routing(), example_routing()], torch.tensor([[7, 3, 5]]), torch.tensor([[1, 0, 2]]), max_tokens=1)
    assert columns["layer"].tolist() == [0, 0, 1, 1]
    assert columns["token"].tolist() == [0, 0, 0, 0]
    assert columns["token_id"].tolist() == [7] * 4 and columns["label"].tolist() == [1] * 4
    assert columns["expert"].tolist() == [2, 1, 2, 1]
    assert columns["weight"].tolist() == np.float32([0.7, 0.3, 0.7, 0.3]).tolist()


def test_traces_round_trip_with_a_step_column(tmp_path):
    without_labels = trace_columns([example_routing()], torch.tensor([7, 3, 5]))
    assert without_labels["label"].tolist() == [-1] * 4
    save_trace(tmp_path, 20, without_labels)
    save_trace(tmp_path, 10, without_labels)
    table = load_traces(tmp_path)
    assert table["step"].tolist() == [10] * 4 + [20] * 4
    assert table["expert"].tolist() == [2, 1, 0, 3] * 2
    assert load_traces(tmp_path / "none")["layer"].shape == (0,)

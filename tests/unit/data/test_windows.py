import numpy as np
import pytest
import torch

from moe_lightning.data.windows import IGNORE_INDEX, ContiguousWindows, next_token_sample, validation_start


def test_next_token_sample_shifts_and_masks():
    tokens = torch.tensor([5, 6, 7, 8])
    sample = next_token_sample(tokens, torch.tensor([True, False, True, True]), torch.tensor([0, 0, 1, 1]))
    assert sample["input_ids"].tolist() == [5, 6, 7]
    assert sample["labels"].tolist() == [IGNORE_INDEX, 7, 8]
    assert sample["task_ids"].tolist() == [0, 0, 1]


def test_contiguous_windows_label_every_token_but_the_first_once():
    stream = np.arange(3, 30, dtype=np.uint16)
    windows = ContiguousWindows(stream, seq_len=4, start=2, stop=23)
    assert len(windows) == (23 - 2 - 1) // 4
    labels = torch.cat([windows[i]["labels"] for i in range(len(windows))])
    assert labels.tolist() == stream[3 : 3 + len(labels)].tolist()
    for i in range(len(windows)):
        assert windows[i]["input_ids"][1:].tolist() == windows[i]["labels"][:-1].tolist()
    with pytest.raises(IndexError):
        windows[len(windows)]


def test_contiguous_windows_task_ids_look_up_token_classes():
    classes = torch.tensor([0, 1, 2, 0, 1])
    sample = ContiguousWindows(np.array([4, 3, 2, 1]), seq_len=3, token_classes=classes)[0]
    assert sample["task_ids"].tolist() == [1, 0, 2]


def test_validation_start_holds_out_the_tail():
    assert validation_start(1000, 0.1) == 900
    assert validation_start(5, 0.1) == 5

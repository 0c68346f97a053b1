import pytest
import torch

from moe_lightning.data import IGNORE_INDEX, SyntheticTasksDataModule
from moe_lightning.data.synthetic import FIRST_SYMBOL_TOKEN, FIRST_TASK_TOKEN, SEP_TOKEN
from moe_lightning.data.synthetic_tasks import TASK_NAMES

SMALL = {"num_train_samples": 64, "num_val_samples": 16, "seq_len": 96, "batch_size": 8}


def built(**kwargs) -> SyntheticTasksDataModule:
    datamodule = SyntheticTasksDataModule(**{**SMALL, **kwargs})
    datamodule.setup("fit")
    return datamodule


def episodes(sample):
    """Split a sample's inputs at task tokens: (start, task name, payload, answer) of every complete episode."""
    tokens = sample["input_ids"].tolist()
    starts = [t for t, token in enumerate(tokens) if FIRST_TASK_TOKEN <= token < FIRST_SYMBOL_TOKEN]
    for start, end in zip(starts, starts[1:]):  # the last episode may be cut
        episode = tokens[start:end]
        sep = episode.index(SEP_TOKEN)
        symbols = [token - FIRST_SYMBOL_TOKEN for token in episode]
        yield start, TASK_NAMES[episode[0] - FIRST_TASK_TOKEN], symbols[1:sep], symbols[sep + 1 :]


def test_vocab_layout_is_as_documented():
    assert (SEP_TOKEN, FIRST_TASK_TOKEN, FIRST_SYMBOL_TOKEN) == (0, 1, 6)
    assert SyntheticTasksDataModule(num_symbols=10).vocab_size == 16


def test_same_seed_same_batches_and_splits_differ():
    first, again, other_seed = built(seed=3), built(seed=3), built(seed=4)
    batch = next(iter(first.train_dataloader()))
    assert all(torch.equal(batch[key], value) for key, value in next(iter(again.train_dataloader())).items())
    assert not torch.equal(first.train_dataset[0]["input_ids"], other_seed.train_dataset[0]["input_ids"])
    assert not torch.equal(first.train_dataset[0]["input_ids"], first.val_dataset[0]["input_ids"])
    assert torch.equal(first.val_dataset[5]["input_ids"], again.val_dataset[5]["input_ids"])


def test_batches_have_the_documented_shape_and_bounds():
    datamodule = built()
    batch = next(iter(datamodule.train_dataloader()))
    assert set(batch) == {"input_ids", "labels", "task_ids"}
    for value in batch.values():
        assert value.shape == (8, 96) and value.dtype == torch.long
    assert 0 <= batch["input_ids"].min() and batch["input_ids"].max() < datamodule.vocab_size
    targets = batch["labels"][batch["labels"] != IGNORE_INDEX]
    assert targets.min() >= FIRST_SYMBOL_TOKEN and targets.max() < datamodule.vocab_size
    assert batch["task_ids"].max() < len(datamodule.task_names)


def test_answers_are_correct_and_task_ids_follow_episodes():
    datamodule = built(num_symbols=7, markov_branching=2)
    table = datamodule.markov_table()
    seen = set()
    for index in range(len(datamodule.train_dataset)):
        sample = datamodule.train_dataset[index]
        task_ids = sample["task_ids"].tolist()
        for start, task, payload, answer in episodes(sample):
            seen.add(task)
            end = start + len(payload) + len(answer) + 2
            assert set(task_ids[start:end]) == {datamodule.task_names.index(task)}
            if task == "copy":
                assert answer == payload
            elif task == "reverse":
                assert answer == payload[::-1]
            elif task == "sort":
                assert answer == sorted(payload)
            elif task == "modular_add":
                half = len(payload) // 2
                assert len(payload) == 2 * half == 2 * len(answer)
                assert answer == [(a + b) % 7 for a, b in zip(payload[:half], payload[half:])]
            else:
                chain = payload + answer
                assert len(payload) == len(answer)
                assert all(table[a, b] > 0 for a, b in zip(chain, chain[1:]))
    assert seen == set(TASK_NAMES)


def test_labels_are_the_next_token_on_answers_only():
    sample = built().train_dataset[0]
    inputs, labels = sample["input_ids"].tolist(), sample["labels"].tolist()
    is_answer, after_sep = [], False
    for token in inputs:
        after_sep = token == SEP_TOKEN or (after_sep and token >= FIRST_SYMBOL_TOKEN)
        is_answer.append(after_sep and token != SEP_TOKEN)
    expected = [inputs[t + 1] if is_answer[t + 1] else IGNORE_INDEX for t in range(len(inputs) - 1)]
    assert labels[:-1] == expected
    assert any(label != IGNORE_INDEX for label in labels)


def test_task_subset_uses_its_own_task_ids():
    datamodule = built(tasks=["sort", "copy"])
    assert datamodule.task_names == ("sort", "copy")
    sample = datamodule.train_dataset[1]
    for start, task, _, _ in episodes(sample):
        assert sample["task_ids"][start] == ("sort", "copy").index(task)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"tasks": ["copy", "juggle"]}, ValueError, "juggle"),
        ({"tasks": "copy"}, TypeError, "'copy'"),
        ({"tasks": []}, ValueError, "tasks"),
        ({"tasks": ["copy", "copy"]}, ValueError, "tasks"),
        ({"min_payload_len": 5, "max_payload_len": 4}, ValueError, "max_payload_len=4"),
        ({"num_symbols": 1}, ValueError, "num_symbols=1"),
        ({"markov_branching": 17}, ValueError, "markov_branching=17"),
        ({"num_val_samples": 0}, ValueError, "num_val_samples=0"),
    ],
)
def test_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        SyntheticTasksDataModule(**kwargs)

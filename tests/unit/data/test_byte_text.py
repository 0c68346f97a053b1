import json

import pytest
import torch

from moe_lightning.data import ByteTextDataModule
from moe_lightning.data.byte_classes import BYTE_CLASS_NAMES, byte_class_table
from moe_lightning.data.corpus import DOCUMENT_END


def built(**kwargs) -> ByteTextDataModule:
    datamodule = ByteTextDataModule(**{"seq_len": 16, "batch_size": 4, **kwargs})
    datamodule.setup("fit")
    return datamodule


def stream_of(datamodule) -> bytes:
    return datamodule.train_dataset.tokens.tobytes()


@pytest.fixture
def user_files(tmp_path):
    (tmp_path / "notes.txt").write_text("The cat sat on 42 mats.\n" * 8)
    records = [{"text": "héllo jsonl"}, {"body": "other field", "text": "second line"}]
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps(record) for record in records) + "\n\n")
    tree = tmp_path / "tree"
    (tree / "b").mkdir(parents=True)
    (tree / "b" / "deep.md").write_text("deep file " * 10)
    (tree / "a.txt").write_text("first in the tree " * 5)
    (tree / ".hidden").write_text("never read")
    return tmp_path


def test_default_corpus_is_the_standard_library():
    datamodule = built(max_bytes=50_000)
    assert datamodule.val_dataset.stop == len(stream_of(datamodule)) == 50_000
    assert b"import" in stream_of(datamodule)
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["input_ids"].shape == batch["labels"].shape == batch["task_ids"].shape == (4, 16)
    assert batch["input_ids"].max() < datamodule.vocab_size == 256


def test_reads_text_jsonl_and_directories_in_order(user_files):
    paths = [str(user_files / "notes.txt"), str(user_files / "docs.jsonl"), str(user_files / "tree")]
    datamodule = built(paths=paths, max_bytes=None)
    documents = [
        (user_files / "notes.txt").read_bytes(),
        "héllo jsonl".encode(),
        b"second line",
        (user_files / "tree" / "a.txt").read_bytes(),
        (user_files / "tree" / "b" / "deep.md").read_bytes(),
    ]
    assert stream_of(datamodule) == b"".join(document + DOCUMENT_END for document in documents)


def test_max_bytes_cuts_the_corpus(user_files):
    datamodule = built(paths=[str(user_files)], max_bytes=100, val_fraction=0.5, batch_size=2)
    assert len(stream_of(datamodule)) == 100


def test_windows_match_the_byte_stream_and_splits_are_disjoint(user_files):
    datamodule = built(paths=[str(user_files)], val_fraction=0.25)
    stream = torch.tensor(list(stream_of(datamodule)))
    val_start = len(stream) - int(len(stream) * 0.25)
    for dataset, offset in ((datamodule.train_dataset, 0), (datamodule.val_dataset, val_start)):
        for index in range(len(dataset)):
            sample, first = dataset[index], offset + index * 16
            assert torch.equal(sample["input_ids"], stream[first : first + 16])
            assert torch.equal(sample["labels"], stream[first + 1 : first + 17])
    assert datamodule.train_dataset.stop == datamodule.val_dataset.start == val_start


def test_task_ids_are_byte_classes(user_files):
    sample = built(paths=[str(user_files / "notes.txt")], val_fraction=0.5).train_dataset[0]
    names = [BYTE_CLASS_NAMES[task] for task in sample["task_ids"][:8].tolist()]
    assert bytes(sample["input_ids"][:8].tolist()) == b"The cat "
    assert names == ["letter"] * 3 + ["whitespace"] + ["letter"] * 3 + ["whitespace"]
    assert [BYTE_CLASS_NAMES[byte_class_table()[ord(c)]] for c in "7.\n"] == ["digit", "punctuation", "whitespace"]
    assert BYTE_CLASS_NAMES[byte_class_table()[0xC3]] == "other"


def test_same_seed_same_batches(user_files):
    def first_batch(seed):
        return next(iter(built(paths=[str(user_files)], seed=seed).train_dataloader()))["input_ids"]

    assert torch.equal(first_batch(0), first_batch(0))
    assert not torch.equal(first_batch(0), first_batch(1))


def test_missing_path_fails_at_construction(tmp_path):
    missing = str(tmp_path / "foo" / "bar.txt")
    with pytest.raises(ValueError, match=f"data path '{missing}' does not exist"):
        ByteTextDataModule(paths=[missing])


def test_a_string_of_paths_is_a_type_error(tmp_path):
    with pytest.raises(TypeError, match="list of paths"):
        ByteTextDataModule(paths=str(tmp_path))


def test_empty_corpus_fails_at_setup(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty"):
        built(paths=[str(tmp_path)])


def test_jsonl_without_the_field_names_file_and_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"content": "no text field"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2 has no string field 'text'"):
        built(paths=[str(tmp_path)])


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"val_fraction": 1.0}, "val_fraction=1.0"), ({"max_bytes": 0}, "max_bytes=0")]
)
def test_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ByteTextDataModule(**kwargs)

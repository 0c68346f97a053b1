import pickle

import numpy as np
import pytest
import torch

from moe_lightning.data import TokenFileDataModule
from moe_lightning.data.token_files import TokenFile


def write_tokens(path, tokens, dtype="uint16"):
    np.asarray(tokens, dtype=dtype).tofile(path)
    return str(path)


def built(**kwargs) -> TokenFileDataModule:
    datamodule = TokenFileDataModule(**{"vocab_size": 1000, "seq_len": 8, "batch_size": 4, **kwargs})
    datamodule.setup("fit")
    return datamodule


def all_windows(dataset, key):
    return torch.stack([dataset[index][key] for index in range(len(dataset))])


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_roundtrip_with_a_held_out_tail(tmp_path, dtype):
    tokens = np.random.default_rng(0).integers(0, 1000, size=400)
    datamodule = built(train_path=write_tokens(tmp_path / "train.bin", tokens, dtype), dtype=dtype, val_fraction=0.2)
    val_start = 400 - 80
    for dataset, offset in ((datamodule.train_dataset, 0), (datamodule.val_dataset, val_start)):
        inputs, labels = all_windows(dataset, "input_ids"), all_windows(dataset, "labels")
        for index in range(len(dataset)):
            first = offset + index * 8
            assert inputs[index].tolist() == tokens[first : first + 8].tolist()
            assert labels[index].tolist() == tokens[first + 1 : first + 9].tolist()
    assert len(datamodule.train_dataset) == (val_start - 1) // 8
    batch = next(iter(datamodule.train_dataloader()))
    assert set(batch) == {"input_ids", "labels"} and batch["input_ids"].dtype == torch.long


def test_separate_val_file(tmp_path):
    train = write_tokens(tmp_path / "train.bin", np.arange(100))
    val = write_tokens(tmp_path / "val.bin", np.arange(500, 541))
    datamodule = built(train_path=train, val_path=val)
    assert len(datamodule.train_dataset) == 99 // 8
    assert all_windows(datamodule.val_dataset, "input_ids").flatten().tolist() == list(range(500, 540))


def test_same_seed_same_batches(tmp_path):
    path = write_tokens(tmp_path / "train.bin", np.arange(400))

    def first_batch(seed):
        return next(iter(built(train_path=path, seed=seed).train_dataloader()))["input_ids"]

    assert torch.equal(first_batch(0), first_batch(0))
    assert not torch.equal(first_batch(0), first_batch(1))


def test_token_file_pickles_without_its_data(tmp_path):
    write_tokens(tmp_path / "train.bin", np.arange(50_000))
    tokens = TokenFile(tmp_path / "train.bin", np.dtype("uint16"))
    assert len(tokens) == 50_000
    assert tokens[10:13].tolist() == [10, 11, 12]
    copy = pickle.loads(pickle.dumps(tokens))
    assert len(pickle.dumps(tokens)) < 1000
    assert copy[-2:].tolist() == [49_998, 49_999]


def test_missing_path(tmp_path):
    with pytest.raises(ValueError, match="data path 'nowhere.bin' does not exist"):
        TokenFileDataModule(train_path="nowhere.bin", vocab_size=10)


def test_bad_dtype(tmp_path):
    path = write_tokens(tmp_path / "train.bin", np.arange(10))
    with pytest.raises(ValueError, match="dtype='int8'"):
        TokenFileDataModule(train_path=path, vocab_size=10, dtype="int8")


@pytest.mark.parametrize(("size", "dtype"), [(7, "uint16"), (6, "uint32"), (0, "uint16")])
def test_file_size_must_fit_the_dtype(tmp_path, size, dtype):
    path = tmp_path / "train.bin"
    path.write_bytes(b"\x01" * size)
    with pytest.raises(ValueError, match=f"holds {size} bytes"):
        TokenFileDataModule(train_path=str(path), vocab_size=10, dtype=dtype)


def test_token_past_the_vocab_is_reported(tmp_path):
    path = write_tokens(tmp_path / "train.bin", np.r_[np.arange(100) % 50, 77])
    with pytest.raises(ValueError, match="token id 77 >= vocab_size=50"):
        built(train_path=path, vocab_size=50)


def test_vocab_must_fit_the_dtype(tmp_path):
    path = write_tokens(tmp_path / "train.bin", np.arange(10))
    with pytest.raises(ValueError, match="vocab_size=70000"):
        TokenFileDataModule(train_path=path, vocab_size=70_000)

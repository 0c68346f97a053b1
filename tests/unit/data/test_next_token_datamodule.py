import numpy as np
import pytest
import torch

from moe_lightning.data import NextTokenDataModule
from moe_lightning.data.windows import ContiguousWindows


class RangeDataModule(NextTokenDataModule):
    vocab_size = 1000

    def __init__(self, num_tokens: int, **kwargs):
        super().__init__(**kwargs)
        self.num_tokens = num_tokens

    def build_datasets(self):
        tokens = np.arange(self.num_tokens)
        return ContiguousWindows(tokens, self.seq_len), ContiguousWindows(tokens, self.seq_len)


@pytest.mark.parametrize("kwargs", [{"seq_len": 0}, {"batch_size": 0}, {"num_workers": -1}])
def test_rejects_bad_common_arguments(kwargs):
    arguments = {"seq_len": 4, "batch_size": 2, **kwargs}
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        RangeDataModule(100, **arguments)


def test_dataloaders_need_setup():
    with pytest.raises(RuntimeError, match="setup"):
        RangeDataModule(100, seq_len=4, batch_size=2).train_dataloader()


def test_train_split_smaller_than_a_batch_is_an_error():
    with pytest.raises(ValueError, match="batch_size=8"):
        RangeDataModule(20, seq_len=4, batch_size=8).setup("fit")


def test_shuffle_is_seeded_and_changes_per_epoch():
    def epochs(seed):
        datamodule = RangeDataModule(200, seq_len=4, batch_size=3, seed=seed)
        datamodule.setup("fit")
        loader = datamodule.train_dataloader()
        return [torch.cat([batch["input_ids"] for batch in loader]) for _ in range(2)]

    first, second = epochs(seed=1)
    assert all(torch.equal(a, b) for a, b in zip(epochs(seed=1), (first, second)))
    assert not torch.equal(first, second)
    assert not torch.equal(first, epochs(seed=2)[0])
    assert len(first) == (len(RangeDataModule(200, seq_len=4, batch_size=3).build_datasets()[0]) // 3) * 3


def test_val_loader_keeps_order_and_last_partial_batch():
    datamodule = RangeDataModule(41, seq_len=4, batch_size=3)
    datamodule.setup("validate")
    inputs = torch.cat([batch["input_ids"] for batch in datamodule.val_dataloader()])
    assert inputs.flatten().tolist() == list(range(40))

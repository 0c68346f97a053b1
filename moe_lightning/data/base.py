"""The base of every datamodule here: the shared arguments, the split checks and the DataLoaders."""

from __future__ import annotations

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from moe_lightning.data.resumable import ResumableDataLoader, ResumableSampler


class NextTokenDataModule(LightningDataModule):
    """Serves ``{"input_ids", "labels"[, "task_ids"]}`` batches of ``[batch_size, seq_len]`` tokens.

    Subclasses set ``vocab_size`` (the model's embedding must cover it) and implement :meth:`build_datasets`;
    this class builds the datasets once in :meth:`setup` and wraps them in DataLoaders.

    Args:
        seq_len: tokens per sequence L (each sample holds L + 1 tokens: inputs and next-token labels).
        batch_size: sequences per batch.
        num_workers: DataLoader worker processes; 0 loads in the main process.
        seed: seeds the data itself where it is random, and the training shuffle.
    """

    vocab_size: int

    def __init__(self, seq_len: int, batch_size: int, num_workers: int = 0, seed: int = 0) -> None:
        super().__init__()
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {name}={value}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got num_workers={num_workers}")
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None

    def build_datasets(self) -> tuple[Dataset, Dataset]:
        """Return the ``(train, val)`` datasets; called once, from :meth:`setup`, on every process."""
        raise NotImplementedError

    @override
    def setup(self, stage: str) -> None:
        if self.train_dataset is not None:
            return
        train, val = self.build_datasets()
        # drop_last would turn a train split smaller than one batch into an empty epoch.
        if len(train) < self.batch_size:
            raise ValueError(
                f"the train split holds {len(train)} sequences of seq_len={self.seq_len}, fewer than "
                f"batch_size={self.batch_size}; give more data or lower seq_len or batch_size"
            )
        if len(val) == 0:
            raise ValueError(
                f"the val split holds no sequence of seq_len={self.seq_len}; give more validation data or lower seq_len"
            )
        self.train_dataset, self.val_dataset = train, val

    @override
    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, train=True)

    @override
    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, train=False)

    # There is one held-out split: `test` and `predict` read it too.
    test_dataloader = val_dataloader
    predict_dataloader = val_dataloader

    def _loader(self, dataset: Dataset | None, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before its dataloaders are requested")
        common = dict(batch_size=self.batch_size, num_workers=self.num_workers, persistent_workers=self.num_workers > 0)
        if not train:
            return DataLoader(dataset, **common)
        # The shuffle is a function of (seed, epoch), yet different in every epoch; the loader's position is saved in
        # checkpoints. Its own generator seeds the workers, so starting a pass never draws from the global RNG.
        sampler = ResumableSampler(dataset, seed=self.seed, **self._replica())
        generator = torch.Generator().manual_seed(self.seed)
        return ResumableDataLoader(dataset, sampler=sampler, drop_last=True, generator=generator, **common)

    def _replica(self) -> dict[str, int]:
        """This process's share of the data: ``num_replicas`` and ``rank`` under a multi-process strategy."""
        kwargs = self.trainer.distributed_sampler_kwargs if self.trainer is not None else None
        return {"num_replicas": kwargs["num_replicas"], "rank": kwargs["rank"]} if kwargs else {}

"""A training DataLoader that resumes mid-epoch: Lightning saves its position in checkpoints and restores it.

Lightning stores the ``state_dict()`` of every train DataLoader that has one (with the fit loop's state) and hands
it back to ``load_state_dict()`` before the resumed run iterates. The state here is the epoch and how many batches
of it were handed out; the order of an epoch is a function of the seed and the epoch alone, so the resumed run
skips exactly the samples the interrupted one had consumed (by index: skipped samples are never loaded).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader, Dataset, DistributedSampler
from typing_extensions import override


class ResumableSampler(DistributedSampler):
    """This rank's share of a seeded shuffle that depends only on ``(seed, epoch)``, able to start part-way.

    A ``DistributedSampler`` (so Lightning uses it as it is instead of injecting its own): one process reads
    ``num_replicas=1, rank=0``. Lightning calls :meth:`set_epoch` before each epoch; outside a Trainer every
    full pass moves to the next epoch by itself, so iterating the loader again reshuffles.
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0, shuffle: bool = True) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self._skip = 0

    def skip_next(self, num_samples: int) -> None:
        """Leave out the first ``num_samples`` of this rank's samples in the next pass only."""
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got num_samples={num_samples}")
        self._skip = num_samples

    @override
    def __iter__(self) -> Iterator[int]:
        skip, self._skip = self._skip, 0
        yield from itertools.islice(super().__iter__(), skip, None)
        self.epoch += 1


class ResumableDataLoader(DataLoader):
    """A DataLoader over a :class:`ResumableSampler` whose ``state_dict`` is its position within the epoch.

    The position counts batches handed to the consumer (not those a worker prefetched), so it is exact with any
    ``num_workers``. A restored position applies to the next pass if it is of the same epoch; a checkpoint taken
    after the last batch of an epoch therefore resumes at the start of the next one.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, ResumableSampler):
            raise TypeError(f"ResumableDataLoader needs a ResumableSampler, got sampler={type(self.sampler).__name__}")
        self._epoch = self.sampler.epoch
        self._batches = 0
        self._restored: dict[str, int] | None = None

    @override
    def __iter__(self) -> Iterator[Any]:
        restored, self._restored = self._restored, None
        self._epoch = self.sampler.epoch
        self._batches = restored["batches"] if restored is not None and restored["epoch"] == self._epoch else 0
        self.sampler.skip_next(self._batches * self.batch_size)
        for batch in super().__iter__():
            self._batches += 1  # before handing it out: a checkpoint taken while it trains counts it
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batches": self._batches}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._restored = {"epoch": int(state_dict["epoch"]), "batches": int(state_dict["batches"])}

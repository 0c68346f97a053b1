"""Synthetic multi-task sequences whose task is known for every token.

Vocabulary layout (it does not depend on which tasks are chosen, so a model trained on some tasks can be
fine-tuned on others):

- ``0``: ``SEP_TOKEN``, between an episode's payload and its answer;
- ``1 .. 5``: one task token per entry of ``TASK_NAMES`` (copy, reverse, sort, modular_add, markov);
- ``6 .. 6 + num_symbols - 1``: the symbols, ``FIRST_SYMBOL_TOKEN + s`` for symbol ``s``.

A sample packs episodes ``[task token, payload..., SEP, answer...]`` until it holds L + 1 tokens (the last one
is cut). Only answer tokens are targets: payloads and the choice of task are uniformly random, and predicting
them would add a constant entropy floor that hides what the model learns, so every other label is -100.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset
from typing_extensions import override

from moe_lightning.data.base import NextTokenDataModule
from moe_lightning.data.synthetic_tasks import TASK_NAMES, EpisodeSampler, random_markov_table
from moe_lightning.data.windows import next_token_sample

SEP_TOKEN = 0
FIRST_TASK_TOKEN = 1
FIRST_SYMBOL_TOKEN = FIRST_TASK_TOKEN + len(TASK_NAMES)


def derive_seed(*parts: object) -> int:
    """A 63-bit seed that depends on every part, so each (seed, split, index) gets an independent stream."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class SyntheticTasksDataset(Dataset):
    """``num_samples`` packed sequences; sample ``i`` is drawn from a generator seeded by ``(seed, split, i)``.

    Args:
        episodes: draws the episodes.
        num_samples: the dataset length.
        seq_len: L.
        seed: the data seed.
        split: the split's name; different names give different samples.
    """

    def __init__(self, episodes: EpisodeSampler, num_samples: int, seq_len: int, seed: int, split: str) -> None:
        self.episodes = episodes
        self.num_samples = num_samples
        self.seq_len = seq_len
        self.seed = seed
        self.split = split
        # Task tokens of the chosen tasks, indexed by task id.
        self._task_tokens = [FIRST_TASK_TOKEN + TASK_NAMES.index(name) for name in episodes.task_names]

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"sample {index} is out of range for {self.num_samples} samples")
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.split, index))
        tokens, is_target, task_ids = [], [], []
        while len(tokens) <= self.seq_len:
            task_id, payload, answer = self.episodes.sample(generator)
            prompt = [self._task_tokens[task_id], *(FIRST_SYMBOL_TOKEN + s for s in payload), SEP_TOKEN]
            tokens += prompt + [FIRST_SYMBOL_TOKEN + s for s in answer]
            is_target += [False] * len(prompt) + [True] * len(answer)
            task_ids += [task_id] * (len(prompt) + len(answer))
        end = self.seq_len + 1
        return next_token_sample(
            torch.tensor(tokens[:end]), torch.tensor(is_target[:end]), torch.tensor(task_ids[:end])
        )


class SyntheticTasksDataModule(NextTokenDataModule):
    """Packed episodes of copy, reverse, sort, modular addition and a Markov grammar, with per-token task ids.

    Train and val samples come from different seed streams, so the splits differ and each is reproducible.
    See this module's docstring for the vocabulary layout and the labels.

    Args:
        tasks: names of the tasks to mix, from ``copy``, ``reverse``, ``sort``, ``modular_add``, ``markov``;
            ``None``: all. A task's index in this list is its ``task_ids`` value.
        num_symbols: size of the symbol alphabet, also the modulus of ``modular_add``.
        min_payload_len: shortest payload of an episode.
        max_payload_len: longest payload of an episode.
        markov_branching: how many successors each symbol has in the Markov grammar (1: deterministic).
        num_train_samples: sequences in the train split.
        num_val_samples: sequences in the val split.
        seq_len: tokens per sequence L.
        batch_size: sequences per batch.
        num_workers: DataLoader worker processes; 0 loads in the main process.
        seed: seeds the grammar, the samples and the training shuffle.
    """

    def __init__(
        self,
        tasks: list[str] | None = None,
        num_symbols: int = 16,
        min_payload_len: int = 2,
        max_payload_len: int = 8,
        markov_branching: int = 2,
        num_train_samples: int = 20_000,
        num_val_samples: int = 512,
        seq_len: int = 256,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(seq_len, batch_size, num_workers, seed)
        self.task_names = _check_task_names(TASK_NAMES if tasks is None else tasks)
        if num_symbols < 2:
            raise ValueError(f"num_symbols must be >= 2, got num_symbols={num_symbols}")
        if not 1 <= min_payload_len <= max_payload_len:
            raise ValueError(
                "need 1 <= min_payload_len <= max_payload_len, got "
                f"min_payload_len={min_payload_len}, max_payload_len={max_payload_len}"
            )
        if not 1 <= markov_branching <= num_symbols:
            raise ValueError(
                f"markov_branching must be in [1, num_symbols={num_symbols}], got markov_branching={markov_branching}"
            )
        for name, value in (("num_train_samples", num_train_samples), ("num_val_samples", num_val_samples)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {name}={value}")
        self.num_symbols = num_symbols
        self.min_payload_len = min_payload_len
        self.max_payload_len = max_payload_len
        self.markov_branching = markov_branching
        self.num_train_samples = num_train_samples
        self.num_val_samples = num_val_samples

    @property
    def vocab_size(self) -> int:
        return FIRST_SYMBOL_TOKEN + self.num_symbols

    def markov_table(self) -> Tensor:
        """The fixed Markov grammar of this seed, ``[num_symbols, num_symbols]``, rows summing to one."""
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "markov_grammar"))
        return random_markov_table(self.num_symbols, self.markov_branching, generator)

    @override
    def build_datasets(self) -> tuple[Dataset, Dataset]:
        episodes = EpisodeSampler(
            self.task_names, self.num_symbols, self.min_payload_len, self.max_payload_len, self.markov_table()
        )
        return (
            SyntheticTasksDataset(episodes, self.num_train_samples, self.seq_len, self.seed, "train"),
            SyntheticTasksDataset(episodes, self.num_val_samples, self.seq_len, self.seed, "val"),
        )


def _check_task_names(tasks: Sequence[str]) -> tuple[str, ...]:
    if isinstance(tasks, str):
        raise TypeError(f"tasks must be a list of task names, got the string {tasks!r}")
    unknown = [name for name in tasks if name not in TASK_NAMES]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; choose from {list(TASK_NAMES)}")
    if not tasks or len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks must name each task at most once and at least one task, got tasks={list(tasks)}")
    return tuple(tasks)

"""Pre-tokenised corpora: flat files of ``uint16`` or ``uint32`` token ids, read through numpy memmaps."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
from torch.utils.data import Dataset
from typing_extensions import override

from moe_lightning.data.base import NextTokenDataModule
from moe_lightning.data.windows import ContiguousWindows, validation_start

_DTYPES = ("uint16", "uint32")
_CHECKED_TOKENS = 2**20  # tokens read at each end of a file to check them against vocab_size


class TokenFile:
    """A read-only token file, memory-mapped on first use.

    Pickling keeps only the path, so DataLoader workers map the file themselves instead of receiving a copy.

    Args:
        path: the file.
        dtype: the numpy dtype of its tokens.
    """

    def __init__(self, path: Path, dtype: np.dtype) -> None:
        self.path = path
        self.dtype = dtype
        self.num_tokens = path.stat().st_size // dtype.itemsize
        self._memmap: np.memmap | None = None

    def __len__(self) -> int:
        return self.num_tokens

    def __getitem__(self, index: Any) -> np.ndarray:
        if self._memmap is None:
            self._memmap = np.memmap(self.path, dtype=self.dtype, mode="r")
        return self._memmap[index]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_memmap": None}


class TokenFileDataModule(NextTokenDataModule):
    """Trains on flat binary files of token ids (e.g. written with ``np.array(ids, np.uint16).tofile(path)``).

    Both splits are cut into consecutive windows, so the samples are deterministic and the seed only orders
    the training batches.

    Args:
        train_path: the training token file.
        vocab_size: the tokenizer's vocabulary size; every token id must be below it.
        val_path: the validation token file; ``None``: hold out the last ``val_fraction`` of ``train_path``.
        dtype: the token type of the files, ``"uint16"`` or ``"uint32"``.
        val_fraction: the fraction of ``train_path``, from its end, held out when ``val_path`` is ``None``.
        seq_len: tokens per sequence L.
        batch_size: sequences per batch.
        num_workers: DataLoader worker processes; 0 loads in the main process.
        seed: seeds the training shuffle.
    """

    def __init__(
        self,
        train_path: str,
        vocab_size: int,
        val_path: str | None = None,
        dtype: Literal["uint16", "uint32"] = "uint16",
        val_fraction: float = 0.05,
        seq_len: int = 256,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(seq_len, batch_size, num_workers, seed)
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {list(_DTYPES)}, got dtype={dtype!r}")
        self.dtype = np.dtype(dtype)
        largest_vocab = np.iinfo(self.dtype).max + 1
        if not 1 <= vocab_size <= largest_vocab:
            raise ValueError(
                f"vocab_size must be in [1, {largest_vocab}] for dtype={dtype!r}, got vocab_size={vocab_size}"
            )
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got val_fraction={val_fraction}")
        self.train_path = self._check_file(train_path)
        self.val_path = None if val_path is None else self._check_file(val_path)
        self.vocab_size = vocab_size
        self.val_fraction = val_fraction

    def _check_file(self, path: str) -> Path:
        file = Path(path)
        if not file.is_file():
            raise ValueError(f"data path {path!r} does not exist or is not a file")
        size = file.stat().st_size
        if size == 0 or size % self.dtype.itemsize:
            raise ValueError(
                f"token file {path!r} holds {size} bytes, not a positive multiple of {self.dtype.itemsize} "
                f"(the size of dtype={self.dtype.name!r}); is the dtype right?"
            )
        return file

    @override
    def build_datasets(self) -> tuple[Dataset, Dataset]:
        train = self._open(self.train_path)
        if self.val_path is None:
            val_start = validation_start(len(train), self.val_fraction)
            return (
                ContiguousWindows(train, self.seq_len, stop=val_start),
                ContiguousWindows(train, self.seq_len, start=val_start),
            )
        return ContiguousWindows(train, self.seq_len), ContiguousWindows(self._open(self.val_path), self.seq_len)

    def _open(self, path: Path) -> TokenFile:
        tokens = TokenFile(path, self.dtype)
        # A token id past the embedding fails late and obscurely (a device-side assert on GPU): check a sample now.
        for sample in (tokens[:_CHECKED_TOKENS], tokens[-_CHECKED_TOKENS:]):
            largest = int(sample.max())
            if largest >= self.vocab_size:
                raise ValueError(
                    f"token file '{path}' holds token id {largest} >= vocab_size={self.vocab_size}; "
                    "is vocab_size or the dtype wrong?"
                )
        return tokens

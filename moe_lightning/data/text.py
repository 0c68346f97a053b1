"""Byte-level language modelling on real text, with each byte's class as its task id."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import Dataset
from typing_extensions import override

from moe_lightning.data.base import NextTokenDataModule
from moe_lightning.data.byte_classes import BYTE_CLASS_NAMES, byte_class_table
from moe_lightning.data.corpus import expand_paths, read_byte_corpus, stdlib_source_files
from moe_lightning.data.windows import ContiguousWindows, validation_start


class ByteTextDataModule(NextTokenDataModule):
    """Bytes of text files as tokens (vocab 256); ``task_ids`` is each input byte's class (see ``task_names``).

    The corpus is the documents of ``paths`` (by default the Python standard library's own ``.py`` files) in
    sorted order, each followed by a NUL byte, cut at ``max_bytes``. Its last ``val_fraction`` is the val
    split; both splits are cut into consecutive windows, so the splits and the samples are deterministic and
    the seed only orders the training batches. Files are read in :meth:`setup`.

    Args:
        paths: text files, ``.jsonl`` files or directories (read recursively, hidden files skipped); any file
            but ``.jsonl`` is one document of raw UTF-8 bytes. ``None``: the standard library's ``.py`` files.
        jsonl_field: the field of each ``.jsonl`` line that holds its text.
        max_bytes: read at most this many bytes of the corpus; ``None`` reads all of it.
        val_fraction: the fraction of the corpus, from its end, held out for validation.
        seq_len: bytes per sequence L.
        batch_size: sequences per batch.
        num_workers: DataLoader worker processes; 0 loads in the main process.
        seed: seeds the training shuffle.
    """

    vocab_size = 256
    task_names = BYTE_CLASS_NAMES

    def __init__(
        self,
        paths: list[str] | None = None,
        jsonl_field: str = "text",
        max_bytes: int | None = 8 * 2**20,
        val_fraction: float = 0.05,
        seq_len: int = 256,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(seq_len, batch_size, num_workers, seed)
        if isinstance(paths, str):
            raise TypeError(f"paths must be a list of paths, got the string {paths!r}")
        for path in paths or ():
            if not Path(path).exists():
                raise ValueError(f"data path {path!r} does not exist")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1 or None, got max_bytes={max_bytes}")
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got val_fraction={val_fraction}")
        self.paths = paths
        self.jsonl_field = jsonl_field
        self.max_bytes = max_bytes
        self.val_fraction = val_fraction

    @override
    def build_datasets(self) -> tuple[Dataset, Dataset]:
        files = stdlib_source_files() if self.paths is None else expand_paths(self.paths)
        corpus = read_byte_corpus(files, self.jsonl_field, self.max_bytes)
        source = "the standard library's .py files" if self.paths is None else f"paths={self.paths}"
        if corpus.size == 0:
            raise ValueError(f"the text corpus is empty: no bytes found in {source}")
        rank_zero_info(f"ByteTextDataModule: {corpus.size:,} bytes of {source} (max_bytes={self.max_bytes})")
        val_start = validation_start(corpus.size, self.val_fraction)
        classes = byte_class_table()
        return (
            ContiguousWindows(corpus, self.seq_len, stop=val_start, token_classes=classes),
            ContiguousWindows(corpus, self.seq_len, start=val_start, token_classes=classes),
        )

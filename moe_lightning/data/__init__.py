"""Datamodules: synthetic multi-task sequences with known task labels, byte-level text and token files."""

from moe_lightning.data.base import NextTokenDataModule
from moe_lightning.data.synthetic import SyntheticTasksDataModule
from moe_lightning.data.text import ByteTextDataModule
from moe_lightning.data.token_files import TokenFileDataModule
from moe_lightning.data.windows import IGNORE_INDEX

__all__ = [
    "IGNORE_INDEX",
    "ByteTextDataModule",
    "NextTokenDataModule",
    "SyntheticTasksDataModule",
    "TokenFileDataModule",
]

"""Byte classes: the task ids of byte-level text, to measure which experts specialise in which kind of byte."""

from __future__ import annotations

import string

import torch
from torch import Tensor

BYTE_CLASS_NAMES = ("letter", "digit", "whitespace", "punctuation", "other")
"""Class names indexed by class id; ``other`` holds control bytes and every byte of non-ASCII characters."""


def _byte_class(byte: int) -> str:
    char = chr(byte)
    if byte >= 128:
        return "other"
    if char.isalpha():
        return "letter"
    if char.isdigit():
        return "digit"
    if char.isspace():
        return "whitespace"
    return "punctuation" if char in string.punctuation else "other"


def byte_class_table() -> Tensor:
    """The class id of each byte value, ``[256]``."""
    return torch.tensor([BYTE_CLASS_NAMES.index(_byte_class(byte)) for byte in range(256)])

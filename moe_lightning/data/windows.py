"""Next-token samples: the ``(input_ids, labels)`` split of L + 1 tokens, and windows over a flat token stream."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

IGNORE_INDEX = -100
"""The label of positions that are not predicted (``cross_entropy``'s default ``ignore_index``)."""


def next_token_sample(
    tokens_L1: Tensor, is_target_L1: Tensor | None = None, task_ids_L1: Tensor | None = None
) -> dict[str, Tensor]:
    """Split L + 1 tokens into ``input_ids`` (the first L) and ``labels`` (the token after each input).

    Args:
        tokens_L1: the L + 1 token ids.
        is_target_L1: which tokens are worth predicting; the label before any other token is ``IGNORE_INDEX``.
            ``None``: every token is a target.
        task_ids_L1: a task label per token, kept for the L inputs as ``task_ids``.
    """
    labels_L = tokens_L1[1:]
    if is_target_L1 is not None:
        labels_L = labels_L.masked_fill(~is_target_L1[1:], IGNORE_INDEX)
    sample = {"input_ids": tokens_L1[:-1], "labels": labels_L}
    if task_ids_L1 is not None:
        sample["task_ids"] = task_ids_L1[:-1]
    return sample


def validation_start(num_tokens: int, val_fraction: float) -> int:
    """Where the validation split starts when the last ``val_fraction`` of a token stream is held out."""
    return num_tokens - int(num_tokens * val_fraction)


class ContiguousWindows(Dataset):
    """Consecutive windows of L + 1 tokens over ``tokens[start:stop]``.

    Neighbouring windows share one token, so every token but the first is a label exactly once per epoch.

    Args:
        tokens: a 1-D array of token ids; anything with ``len`` and slicing that returns numpy arrays.
        seq_len: L.
        start: the first token of the range to cover.
        stop: the end of that range; ``None``: the end of ``tokens``.
        token_classes: a lookup table ``[vocab]``; if given, ``task_ids`` is the class of each input token.
    """

    def __init__(
        self, tokens: Any, seq_len: int, start: int = 0, stop: int | None = None, token_classes: Tensor | None = None
    ) -> None:
        self.tokens = tokens
        self.seq_len = seq_len
        self.start = start
        self.stop = len(tokens) if stop is None else stop
        self.token_classes = token_classes

    def __len__(self) -> int:
        return max(0, (self.stop - self.start - 1) // self.seq_len)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} is out of range for {len(self)} windows")
        first = self.start + index * self.seq_len
        tokens_L1 = torch.from_numpy(np.asarray(self.tokens[first : first + self.seq_len + 1]).astype(np.int64))
        task_ids_L1 = None if self.token_classes is None else self.token_classes[tokens_L1]
        return next_token_sample(tokens_L1, task_ids_L1=task_ids_L1)

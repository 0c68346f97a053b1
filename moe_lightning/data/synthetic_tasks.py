"""The synthetic tasks: each draws an episode, a payload of symbols and the answer it determines.

Symbols are integers in ``[0, num_symbols)``; the datamodule maps them to token ids. With payload length n:

- ``copy``: the answer is the payload.
- ``reverse``: the payload reversed.
- ``sort``: the payload sorted ascending.
- ``modular_add``: the payload is two n-digit operands ``a`` then ``b``; the answer is ``(a_j + b_j) mod
  num_symbols`` for each digit j.
- ``markov``: the payload is a chain of the fixed random grammar, the answer the next n symbols of the chain
  (predictable only as far as the grammar is: each symbol has a few possible successors).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import torch
from torch import Tensor

TASK_NAMES = ("copy", "reverse", "sort", "modular_add", "markov")

_ANSWER_OF_PAYLOAD = {"copy": list, "reverse": lambda payload: payload[::-1], "sort": sorted}


def random_markov_table(num_symbols: int, branching: int, generator: torch.Generator) -> Tensor:
    """A transition table ``[S, S]`` whose row s gives ``branching`` random successors of s random weights."""
    table = torch.zeros(num_symbols, num_symbols)
    for row in table:
        successors = torch.randperm(num_symbols, generator=generator)[:branching]
        row[successors] = torch.rand(branching, generator=generator) + 0.1  # no successor is near-impossible
    return table / table.sum(dim=1, keepdim=True)


class EpisodeSampler:
    """Draws episodes of the chosen tasks; all randomness comes from the generator passed to :meth:`sample`.

    Args:
        task_names: the tasks to draw from, uniformly; a task's index in this list is its task id.
        num_symbols: size of the symbol alphabet, also the modulus of ``modular_add``.
        min_payload_len: shortest payload length n.
        max_payload_len: longest payload length n.
        markov_table: the ``markov`` grammar, a row-stochastic ``[num_symbols, num_symbols]`` table.
    """

    def __init__(
        self,
        task_names: Sequence[str],
        num_symbols: int,
        min_payload_len: int,
        max_payload_len: int,
        markov_table: Tensor,
    ) -> None:
        self.task_names = tuple(task_names)
        self.num_symbols = num_symbols
        self.min_payload_len = min_payload_len
        self.max_payload_len = max_payload_len
        self._markov_cumulative = markov_table.cumsum(dim=1).tolist()

    def sample(self, generator: torch.Generator) -> tuple[int, list[int], list[int]]:
        """Return ``(task_id, payload, answer)``."""
        task_id = self._randint(len(self.task_names), generator)
        task = self.task_names[task_id]
        length = self.min_payload_len + self._randint(self.max_payload_len - self.min_payload_len + 1, generator)
        if task == "markov":
            chain = self._markov_chain(2 * length, generator)
            return task_id, chain[:length], chain[length:]
        if task == "modular_add":
            a, b = self._symbols(length, generator), self._symbols(length, generator)
            return task_id, a + b, [(x + y) % self.num_symbols for x, y in zip(a, b)]
        payload = self._symbols(length, generator)
        return task_id, payload, _ANSWER_OF_PAYLOAD[task](payload)

    def _symbols(self, length: int, generator: torch.Generator) -> list[int]:
        return torch.randint(self.num_symbols, (length,), generator=generator).tolist()

    def _markov_chain(self, length: int, generator: torch.Generator) -> list[int]:
        chain = [self._randint(self.num_symbols, generator)]
        for u in torch.rand(length - 1, generator=generator).tolist():
            cumulative = self._markov_cumulative[chain[-1]]
            # bisect_right never lands on a zero-probability successor: its cumulative equals its predecessor's.
            chain.append(bisect.bisect_right(cumulative, u * cumulative[-1]))
        return chain

    @staticmethod
    def _randint(high: int, generator: torch.Generator) -> int:
        return int(torch.randint(high, (), generator=generator))

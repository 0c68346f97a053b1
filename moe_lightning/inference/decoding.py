"""Decoders: how :func:`generate` runs the model. A decoder owns the KV cache of one generation (a session) and
turns the prompt (prefill) and each new token (step) into next-token logits.

Shape legend: B batch, P longest prompt, V vocab.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

from moe_lightning.models import KVCache, MoETransformer


class DecodeSession(Protocol):
    def prefill(self, ids_BP: Tensor, mask_BP: Tensor) -> Tensor:
        """Run the left-padded prompts (``mask_BP`` True for real tokens); the logits ``[B, V]`` after each."""

    def step(self, token_B: Tensor, real_B: Tensor) -> Tensor:
        """Append one token per row (``real_B`` False: a finished row's pad); the logits ``[B, V]`` after it."""


class Decoder(Protocol):
    model: MoETransformer

    def start(self, batch_size: int, max_len: int) -> DecodeSession:
        """A session for ``batch_size`` rows of at most ``max_len`` tokens (prompt and new tokens)."""


class EagerDecoder:
    """The model as it is, with a :class:`KVCache` sized for each session: the reference every decoder must match."""

    def __init__(self, model: MoETransformer) -> None:
        self.model = model

    def start(self, batch_size: int, max_len: int) -> EagerSession:
        return EagerSession(self.model, KVCache.for_model(self.model, batch_size, max_len))


class EagerSession:
    def __init__(self, model: MoETransformer, cache: KVCache) -> None:
        self.model, self.cache = model, cache

    def prefill(self, ids_BP: Tensor, mask_BP: Tensor) -> Tensor:
        return self.model(ids_BP, padding_mask=mask_BP, cache=self.cache).logits[:, -1]

    def step(self, token_B: Tensor, real_B: Tensor) -> Tensor:
        return self.model(token_B[:, None], padding_mask=real_B[:, None], cache=self.cache).logits[:, -1]

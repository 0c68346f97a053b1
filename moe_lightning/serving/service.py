"""GenerationService: what every generation endpoint shares. It turns prompts into token ids within the server's
limits, queues them on the :class:`MicroBatcher`, and turns the tokens that come back into text and finish reasons.

Every way a request can be wrong is answered here as an :class:`ApiError` naming the field and the value, before
anything is queued.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from moe_lightning.models import MoETransformerConfig
from moe_lightning.serving.batching import (
    BatcherClosedError, GenerationJob, MicroBatcher, QueueFullError, SamplingSettings,
)
from moe_lightning.serving.errors import ApiError
from moe_lightning.serving.schemas import FinishReason, Usage
from moe_lightning.serving.settings import ServerSettings
from moe_lightning.serving.text_stream import TextStream
from moe_lightning.serving.tokenizer import BYTE_VOCAB_SIZE, ByteTokenizer

logger = logging.getLogger(__name__)

GREEDY_BELOW_TEMPERATURE = 1e-5
"""Temperatures below this decode greedily (dividing logits by less overflows float32 to inf)."""
RETRY_AFTER_S = 1
"""The Retry-After of a full queue's 429 and of a 503."""


@dataclass(frozen=True)
class StreamEvent:
    """One prompt's new token (``token`` set), or its end (``finish_reason`` set, ``token`` None)."""

    index: int
    token: int | None
    text: str | None
    """The text this event released; None when the model has no tokenizer."""
    finish_reason: FinishReason | None = None


@dataclass(frozen=True)
class PromptOutput:
    index: int
    tokens: list[int]
    text: str | None
    finish_reason: FinishReason


class GenerationService:
    """Serves generation requests of one model through one batcher."""

    def __init__(
        self, model_config: MoETransformerConfig, settings: ServerSettings, batcher: MicroBatcher,
        tokenizer: ByteTokenizer | None,
    ) -> None:
        self.vocab_size, self.max_seq_len = model_config.vocab_size, model_config.max_seq_len
        self.settings, self.batcher, self.tokenizer = settings, batcher, tokenizer

    def encode_prompts(self, prompts: Sequence[str | Sequence[int]], field: str) -> list[list[int]]:
        """The token ids of each prompt; 413 for too many or too long prompts, 400/422 for ones the model can't take."""
        limit = self.settings.max_prompts_per_request
        if len(prompts) > limit:
            raise ApiError(413, f"{field} holds {len(prompts)} prompts > max_prompts_per_request={limit}", field)
        return [self._encode(prompt, f"{field}[{index}]") for index, prompt in enumerate(prompts)]

    def sampling(
        self, temperature: float, top_k: int | None, top_p: float | None, stop_tokens: Sequence[int] = (),
        seed: int | None = None, stop_field: str = "stop_tokens",
    ) -> SamplingSettings:
        """The sampling settings of a request: near-zero temperatures are greedy; stop tokens must be in the vocab."""
        bad = [token for token in stop_tokens if not 0 <= token < self.vocab_size]
        if bad:
            raise ApiError(422, f"{stop_field}: token ids outside [0, vocab_size={self.vocab_size}): {bad[:8]}",
                           stop_field, "invalid_value")
        greedy = temperature < GREEDY_BELOW_TEMPERATURE
        return SamplingSettings(
            temperature=0.0 if greedy else float(temperature), top_k=top_k,
            top_p=None if top_p is None or top_p >= 1 else float(top_p), stop_tokens=tuple(sorted(set(stop_tokens))),
            seed=seed,
        )

    def start(
        self, prompts: list[list[int]], max_new_tokens: int, sampling: SamplingSettings,
        stop_strings: Sequence[str] = (), prompts_field: str = "prompts", max_tokens_field: str = "max_new_tokens",
    ) -> GenerationStream:
        """Queue a request; raises 422/400 for a length the server or the model can't give, 429 when the queue is
        full, 503 when the server is shutting down."""
        deadline = time.monotonic() + self.settings.request_timeout_s
        limit = self.settings.max_new_tokens
        if max_new_tokens > limit:
            raise ApiError(422, f"{max_tokens_field}={max_new_tokens} > this server's max_new_tokens={limit}",
                           max_tokens_field, "invalid_value")
        for index, prompt in enumerate(prompts):
            if len(prompt) + max_new_tokens > self.max_seq_len:
                raise ApiError(
                    400, f"{prompts_field}[{index}] has {len(prompt)} tokens + {max_tokens_field}={max_new_tokens} > "
                    f"the model's context of max_seq_len={self.max_seq_len} tokens", max_tokens_field,
                    "context_length_exceeded",
                )
        if stop_strings and self.tokenizer is None:
            raise ApiError(400, self._no_tokenizer("stop strings") + ": use stop token ids", "stop", "no_tokenizer")
        job = GenerationJob(prompts, max_new_tokens, sampling)
        try:
            self.batcher.submit(job)
        except QueueFullError as error:
            raise ApiError(429, f"the server is busy: {error}; retry later", code="queue_full",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from error
        except BatcherClosedError as error:
            raise ApiError(503, str(error), code="unavailable", headers={"Retry-After": str(RETRY_AFTER_S)}) from error
        return GenerationStream(job, self.tokenizer, stop_strings, deadline, self.settings.request_timeout_s)

    def _encode(self, prompt: str | Sequence[int], field: str) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ApiError(400, self._no_tokenizer(f"{field} as text") + ": send prompts as token-id lists", field,
                               "no_tokenizer")
            try:
                ids = self.tokenizer.encode(prompt)
            except ValueError as error:
                raise ApiError(422, f"{field}: {error}", field, "invalid_value") from error
        else:
            ids = list(prompt)
            bad = [token for token in ids if not 0 <= token < self.vocab_size]
            if bad:
                raise ApiError(422, f"{field}: token ids outside [0, vocab_size={self.vocab_size}): {bad[:8]}", field,
                               "invalid_value")
        if not ids:
            raise ApiError(422, f"{field} is empty: every prompt needs at least one token", field, "invalid_value")
        limit = min(self.settings.max_prompt_tokens, self.max_seq_len - 1)
        if len(ids) > limit:
            bound = (f"max_prompt_tokens={self.settings.max_prompt_tokens}" if limit == self.settings.max_prompt_tokens
                     else f"{limit} (the model's max_seq_len={self.max_seq_len} less one new token)")
            raise ApiError(413, f"{field} has {len(ids)} tokens > {bound}", field, "prompt_too_long")
        return ids

    def _no_tokenizer(self, what: str) -> str:
        return (f"{what} needs a tokenizer, and this model has none (vocab_size={self.vocab_size} < "
                f"{BYTE_VOCAB_SIZE} bytes)")


class GenerationStream:
    """A queued request's tokens as they are decoded, with each prompt's text (cut at a stop string) and end."""

    def __init__(
        self, job: GenerationJob, tokenizer: ByteTokenizer | None, stop_strings: Sequence[str], deadline: float,
        timeout_s: float,
    ) -> None:
        self.job, self.deadline, self.timeout_s = job, deadline, timeout_s
        self.tokens: list[list[int]] = [[] for _ in job.prompts]
        self._texts = None if tokenizer is None else [TextStream(tokenizer, stop_strings) for _ in job.prompts]
        self._finish_reasons: list[FinishReason | None] = [None] * len(job.prompts)

    async def events(self) -> AsyncIterator[StreamEvent]:
        """Every new token, then each prompt's end; raises ApiError 503 past the deadline or at shutdown, 400 for
        arguments the model refused. Leaving early cancels the request."""
        steps = self.job.steps(self.deadline)
        completed = False
        try:
            while (step := await self._next_step(steps)) is not None:
                for index, token in enumerate(step):
                    if token is None or self._finish_reasons[index] is not None:
                        continue
                    self.tokens[index].append(token)
                    yield StreamEvent(index, token, None if self._texts is None else self._texts[index].push(token))
                    if token in self.job.sampling.stop_tokens or (self._texts and self._texts[index].stopped):
                        self.job.end_prompt(index)
                        yield self._end(index, "stop")
            for index, reason in enumerate(self._finish_reasons):
                if reason is None:
                    yield self._end(index, "length")
            completed = True
        finally:
            if not completed:
                self.job.cancel()

    async def collect(self) -> list[PromptOutput]:
        """Wait for the whole request (instead of iterating :meth:`events`); then :meth:`outputs`."""
        async for _ in self.events():
            pass
        return self.outputs()

    def outputs(self) -> list[PromptOutput]:
        """Each prompt's tokens, text and finish reason, once :meth:`events` is exhausted."""
        if None in self._finish_reasons:
            raise RuntimeError("outputs() before the request has ended: exhaust events() or await collect()")
        return [
            PromptOutput(index, tokens, None if self._texts is None else self._texts[index].text, reason)
            for index, (tokens, reason) in enumerate(zip(self.tokens, self._finish_reasons))
        ]

    def usage(self) -> Usage:
        prompt_tokens = sum(len(prompt) for prompt in self.job.prompts)
        completion_tokens = sum(len(tokens) for tokens in self.tokens)
        return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens)

    def _end(self, index: int, reason: FinishReason) -> StreamEvent:
        self._finish_reasons[index] = reason
        return StreamEvent(index, None, None if self._texts is None else self._texts[index].finish(), reason)

    async def _next_step(self, steps: AsyncIterator[list[int | None]]) -> list[int | None] | None:
        try:
            return await anext(steps)
        except StopAsyncIteration:
            return None
        except TimeoutError as error:
            raise ApiError(503, f"the request took longer than request_timeout_s={self.timeout_s}", code="timeout",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from error
        except BatcherClosedError as error:
            raise ApiError(503, str(error), code="unavailable", headers={"Retry-After": str(RETRY_AFTER_S)}) from error
        except (ValueError, TypeError) as error:  # an argument the model refused that the checks above let through
            raise ApiError(400, str(error), code="invalid_value") from error
        except Exception as error:  # the model failed (a bug, or out of memory): logged, answered 500, even mid-stream
            logger.exception("decoding failed for a request of %d prompts", len(self.job.prompts))
            raise ApiError(500, f"the model failed: {type(error).__name__} (logged on the server)") from error

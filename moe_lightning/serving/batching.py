"""MicroBatcher: a bounded queue of generation jobs and the single worker that runs the model for them.

Jobs arrive on the event loop. When the model is idle, the oldest job waits a short window for company; then it and
the waiting jobs that share its sampling settings (up to ``max_batch_size`` prompts) are decoded together by one
:func:`stream_generate` call on a worker thread, so the event loop never runs the model. Each step's tokens are
handed back to the loop, job by job, as they come. A seeded sampling job is decoded alone, so it draws exactly what
``generate(model, its_prompts, seed=...)`` draws.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from moe_lightning.inference.decoding import Decoder
from moe_lightning.inference.generate import stream_generate
from moe_lightning.models import MoETransformer


class QueueFullError(Exception):
    """The batcher already holds ``max_queue_size`` waiting jobs."""


class BatcherClosedError(Exception):
    """The batcher is shutting down: it takes no job and finishes none."""


@dataclass(frozen=True)
class SamplingSettings:
    """:func:`stream_generate`'s sampling arguments for one job."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    stop_tokens: tuple[int, ...] = ()
    seed: int | None = None

    def batch_key(self) -> tuple[Any, ...] | None:
        """Jobs with equal keys may be decoded together; None: this job is decoded alone (seeded sampling)."""
        if self.temperature == 0:  # greedy: top-k, top-p and the seed change nothing
            return (0.0, None, None, self.stop_tokens)
        if self.seed is not None:
            return None
        return (self.temperature, self.top_k, self.top_p, self.stop_tokens)

    def as_kwargs(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p,
                "stop_tokens": self.stop_tokens, "seed": self.seed}


@dataclass(frozen=True)
class BatchReport:
    """What one model call did, for metrics."""

    num_jobs: int
    num_prompts: int
    generated_tokens: int
    seconds: float


# What the worker hands a job: a step's tokens (one per prompt, None for a prompt that has ended), None when the job
# is finished, or the exception that ended it.
_JobEvent = list[int | None] | BaseException | None


class GenerationJob:
    """One request's prompts on their way through the batcher."""

    def __init__(self, prompts: list[list[int]], max_new_tokens: int, sampling: SamplingSettings) -> None:
        if not prompts or max_new_tokens < 1:
            raise ValueError(f"a job needs prompts and max_new_tokens >= 1, got {len(prompts)} prompts and "
                             f"max_new_tokens={max_new_tokens}")
        self.prompts, self.max_new_tokens, self.sampling = prompts, max_new_tokens, sampling
        self.enqueued_at = time.monotonic()
        self._events: asyncio.Queue[_JobEvent] = asyncio.Queue()
        # Written on the event loop, read by the worker thread: single set operations, atomic under the GIL.
        self._ended_prompts: set[int] = set()
        self._cancelled = threading.Event()

    @property
    def longest_prompt(self) -> int:
        return max(len(prompt) for prompt in self.prompts)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Nobody waits for this job any more: the worker drops it (and stops decoding once nothing else is left)."""
        self._cancelled.set()

    def end_prompt(self, index: int) -> None:
        """Prompt ``index`` needs no more tokens (a stop string ended it): the worker sends it None from now on."""
        self._ended_prompts.add(index)

    def prompt_ended(self, index: int) -> bool:
        return index in self._ended_prompts

    async def steps(self, deadline: float) -> AsyncIterator[list[int | None]]:
        """Each decoding step's tokens, until the job finishes; re-raises what ended it.

        Raises ``TimeoutError`` (and cancels the job) once ``time.monotonic()`` passes ``deadline``.
        """
        while True:
            try:
                event = await asyncio.wait_for(self._events.get(), max(deadline - time.monotonic(), 0))
            except TimeoutError:
                self.cancel()
                raise
            if event is None:
                return
            if isinstance(event, BaseException):
                raise event
            yield event

    def post(self, loop: asyncio.AbstractEventLoop, event: _JobEvent) -> None:
        """Hand ``event`` to the job's consumer, which waits on ``loop`` (callable from any thread)."""
        loop.call_soon_threadsafe(self._events.put_nowait, event)


@dataclass
class _Running:
    """A job inside one model call: where its prompts sit in the batch and which of them still decode."""

    job: GenerationJob
    start: int
    live: set[int] = field(default_factory=set)
    steps: int = 0


class MicroBatcher:
    """Queues :class:`GenerationJob` s and decodes them, batched, on one worker thread.

    Call :meth:`start` on the event loop that will :meth:`submit` jobs, and :meth:`close` on it at shutdown.
    """

    def __init__(
        self, model: MoETransformer, max_batch_size: int, max_queue_size: int, batch_window_s: float,
        decoder: Decoder | None = None, on_batch: Callable[[BatchReport], None] | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue_size < 1 or batch_window_s < 0:
            raise ValueError(
                f"need max_batch_size >= 1, max_queue_size >= 1 and batch_window_s >= 0, got "
                f"max_batch_size={max_batch_size}, max_queue_size={max_queue_size}, batch_window_s={batch_window_s}"
            )
        self.model, self.decoder, self.on_batch = model, decoder, on_batch
        self.max_batch_size, self.max_queue_size, self.batch_window_s = max_batch_size, max_queue_size, batch_window_s
        self._pending: deque[GenerationJob] = deque()
        self._wakeup = asyncio.Event()
        self._closed = False
        self._executor: ThreadPoolExecutor | None = None
        self._worker: asyncio.Task[None] | None = None

    @property
    def queue_depth(self) -> int:
        """Jobs waiting for the model (not those being decoded, nor cancelled ones)."""
        self._drop_cancelled()
        return len(self._pending)

    @property
    def running(self) -> bool:
        return self._worker is not None and not self._closed

    def start(self) -> None:
        """Start the worker on the running event loop (again after :meth:`close`: an app's lifespan may rerun)."""
        if self.running:
            raise RuntimeError("this MicroBatcher is already running")
        self._closed = False
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moe-lightning-model")
        self._worker = asyncio.get_running_loop().create_task(self._work(), name="moe-lightning-batcher")

    def submit(self, job: GenerationJob) -> None:
        """Queue ``job``; raises :class:`QueueFullError` or :class:`BatcherClosedError` instead."""
        if not self.running:
            raise BatcherClosedError("the server is not running (shutting down, or not started)")
        self._drop_cancelled()  # a cancelled job holds no place in the queue
        if len(self._pending) >= self.max_queue_size:
            raise QueueFullError(f"{len(self._pending)} requests are already waiting (max_queue_size)")
        self._pending.append(job)
        self._wakeup.set()

    async def close(self) -> None:
        """Refuse new jobs, fail the waiting and running ones with :class:`BatcherClosedError`, stop the worker."""
        if not self.running:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        while self._pending:
            self._pending.popleft().post(loop, BatcherClosedError("the server is shutting down"))
        self._wakeup.set()
        if self._worker is not None:
            await self._worker
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    def _drop_cancelled(self) -> None:
        if any(job.cancelled for job in self._pending):
            self._pending = deque(job for job in self._pending if not job.cancelled)

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closed:
            self._drop_cancelled()
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            wait_s = self._pending[0].enqueued_at + self.batch_window_s - time.monotonic()
            if wait_s > 0:  # the batching window; a new job or close() wakes us to look again
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), wait_s)
                continue
            batch = self._take_batch()
            report = await loop.run_in_executor(self._executor, self._decode, batch, loop)
            if self.on_batch is not None and report.num_prompts:
                self.on_batch(report)

    def _take_batch(self) -> list[GenerationJob]:
        """The oldest job and, in arrival order, the waiting jobs that may join it."""
        head = self._pending.popleft()
        batch, key = [head], head.sampling.batch_key()
        if key is None:
            return batch
        num_prompts, longest, max_new = len(head.prompts), head.longest_prompt, head.max_new_tokens
        for job in list(self._pending):
            if job.cancelled or job.sampling.batch_key() != key:
                continue
            joined_longest, joined_max_new = max(longest, job.longest_prompt), max(max_new, job.max_new_tokens)
            # One call decodes max_new steps after the longest prompt: the joined batch must fit the context.
            if (num_prompts + len(job.prompts) <= self.max_batch_size
                    and joined_longest + joined_max_new <= self.model.config.max_seq_len):
                self._pending.remove(job)
                batch.append(job)
                num_prompts, longest, max_new = num_prompts + len(job.prompts), joined_longest, joined_max_new
        return batch

    def _decode(self, batch: list[GenerationJob], loop: asyncio.AbstractEventLoop) -> BatchReport:
        """Runs on the worker thread: one :func:`stream_generate` call for the whole batch."""
        started = time.perf_counter()
        running, prompts, start = [], [], 0
        for job in batch:
            running.append(_Running(job, start, set(range(len(job.prompts)))))
            prompts += job.prompts
            start += len(job.prompts)
        stop_tokens = set(batch[0].sampling.stop_tokens)
        generated = 0
        steps = None
        try:
            steps = stream_generate(
                self.model, prompts, max(job.max_new_tokens for job in batch), **batch[0].sampling.as_kwargs(),
                decoder=self.decoder,
            )
            for tokens in steps:
                if self._closed:
                    raise BatcherClosedError("the server is shutting down")
                for entry in running:
                    generated += self._hand_over(entry, tokens, stop_tokens, loop)
                running = [entry for entry in running if entry.live and not entry.job.cancelled]
                if not running:  # every job has had its last step (decoding ends with the longest one)
                    break
        except Exception as error:  # every waiting request learns why its batch failed
            for entry in running:
                entry.job.post(loop, error)
        finally:
            if steps is not None:
                steps.close()
        return BatchReport(len(batch), len(prompts), generated, time.perf_counter() - started)

    @staticmethod
    def _hand_over(
        entry: _Running, tokens: list[int | None], stop_tokens: set[int], loop: asyncio.AbstractEventLoop,
    ) -> int:
        """Post one step's tokens of ``entry``'s prompts; returns how many tokens it got."""
        job = entry.job
        if job.cancelled:
            return 0
        own: list[int | None] = []
        for index in range(len(job.prompts)):
            token = tokens[entry.start + index] if index in entry.live and not job.prompt_ended(index) else None
            if token is None or token in stop_tokens:
                entry.live.discard(index)
            own.append(token)
        entry.steps += 1
        job.post(loop, own)
        if entry.steps == job.max_new_tokens:
            entry.live.clear()
        if not entry.live:
            job.post(loop, None)
        return sum(token is not None for token in own)

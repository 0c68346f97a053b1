"""CompiledDecoder: decode steps with static shapes, compiled with ``torch.compile`` and replayed as CUDA graphs.

At batch 1 a decode step of an MoE model is a few hundred small kernels, and launching them from Python costs
more than running them. Here each step has fixed shapes (a :class:`StaticKVCache` spanning the model's whole
context, batches padded up to a bucket size), so it compiles once per bucket and, on CUDA, is captured into one
CUDA graph that a step replays with a single launch. The prompt (prefill) runs eagerly on the same cache: its
length changes from request to request and its launches are amortised over many tokens.

On the CPU there are no CUDA graphs and the decoder runs the same static-shape step eagerly (or compiled, if
asked): the clean fallback, and what the CPU tests check against :class:`EagerDecoder`.

Shape legend: B batch, P longest prompt, V vocab.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from moe_lightning.models import MoETransformer
from moe_lightning.models.static_kv_cache import StaticKVCache

DEFAULT_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
WARMUP_STEPS = 2


class CompiledDecoder:
    """Static-shape decoding for one model (see the module docstring).

    Args:
        model: the model, in eval mode, with per-token routing and weights already on their device and dtype.
        compile: ``torch.compile`` the decode step (fullgraph). Off by default: the CUDA graph already removes the
            launch overhead that dominates a decode step (benchmarks/RESULTS.md), while compiling costs minutes per
            bucket for a large model and rounds bf16 differently from the eager model, which moves a few routing
            choices (tests/gpu/test_train_serve_routing_cuda.py counts them).
        cuda_graphs: capture each bucket's step as a CUDA graph. Default: on CUDA; refused elsewhere.
        max_len: cache slots per row (prompt + new tokens); default ``model.config.max_seq_len``.
        batch_buckets: a batch of B rows runs in the smallest bucket >= B (padding rows are masked out), so one
            compiled step and graph serve every batch size up to the largest bucket.

    One session runs at a time: starting a session ends the previous one on the same bucket.
    """

    def __init__(
        self, model: MoETransformer, compile: bool = False, cuda_graphs: bool | None = None,
        max_len: int | None = None, batch_buckets: Sequence[int] = DEFAULT_BATCH_BUCKETS,
    ) -> None:
        device = model.embed.weight.device
        on_cuda = device.type == "cuda"
        if cuda_graphs and not on_cuda:
            raise ValueError(f"cuda_graphs=True needs the model on a CUDA device, it is on {device}")
        if not batch_buckets or any(b < 1 for b in batch_buckets):
            raise ValueError(f"batch_buckets must be positive batch sizes, got {tuple(batch_buckets)}")
        self.model = model
        self.max_len = max_len or model.config.max_seq_len
        if not 1 <= self.max_len <= model.config.max_seq_len:
            raise ValueError(f"max_len must be in [1, max_seq_len={model.config.max_seq_len}], got {self.max_len}")
        self.compile = compile
        self.cuda_graphs = on_cuda if cuda_graphs is None else cuda_graphs
        self.batch_buckets = sorted(set(batch_buckets))
        self._steps: dict[int, _BucketStep] = {}

    def start(self, batch_size: int, max_len: int) -> CompiledSession:
        if max_len > self.max_len:
            raise ValueError(f"a session of max_len={max_len} does not fit this decoder's max_len={self.max_len}")
        if batch_size > self.batch_buckets[-1]:
            raise ValueError(f"batch_size={batch_size} exceeds the largest batch bucket {self.batch_buckets[-1]}")
        bucket = self.batch_buckets[bisect.bisect_left(self.batch_buckets, batch_size)]
        if bucket not in self._steps:
            self._steps[bucket] = _BucketStep(self.model, bucket, self.max_len, self.compile, self.cuda_graphs)
        return CompiledSession(self._steps[bucket], batch_size)


class _BucketStep:
    """The static cache, inputs and (compiled, captured) step of one bucket size."""

    def __init__(self, model: MoETransformer, bucket: int, max_len: int, compile: bool, cuda_graphs: bool) -> None:
        self.model = model
        self.cache = StaticKVCache.for_model(model, bucket, max_len)
        device = self.cache.key_mask_BS.device
        self.token_B = torch.zeros(bucket, dtype=torch.long, device=device)
        self.real_B = torch.ones(bucket, dtype=torch.bool, device=device)
        self.run: Callable[[], Tensor] = torch.compile(self._step, fullgraph=True, dynamic=False) if compile else self._step
        self.session_id = 0
        if cuda_graphs:
            self.run = self._capture()

    @torch.no_grad()
    def _step(self) -> Tensor:
        logits = self.model(self.token_B[:, None], padding_mask=self.real_B[:, None], cache=self.cache).logits
        return logits[:, -1]

    def _capture(self) -> Callable[[], Tensor]:
        # Warm up (compiles, autotunes, allocates) on a side stream as CUDA graphs require. The last warm-up step
        # runs in sync-debug mode, so a host synchronisation inside the step fails here with its cause instead of
        # breaking the capture (compiling itself synchronises, so the first steps run without it).
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self.run()
            previous = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("error")
            try:
                self.run()
            except RuntimeError as error:
                raise RuntimeError(
                    "the decode step synchronises with the host, so it cannot be captured as a CUDA graph "
                    f"({error}); use bf16 weights (grouped_mm experts) or CompiledDecoder(cuda_graphs=False)"
                ) from error
            finally:
                torch.cuda.set_sync_debug_mode(previous)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits_BV = self.run()
        self.cache.reset()

        def replay() -> Tensor:
            graph.replay()
            return logits_BV

        return replay


class CompiledSession:
    """One generation on a bucket: rows beyond ``batch_size`` are padding, masked out and dropped from the logits."""

    def __init__(self, bucket_step: _BucketStep, batch_size: int) -> None:
        bucket_step.session_id += 1
        self._bucket_step, self._id, self.batch_size = bucket_step, bucket_step.session_id, batch_size
        bucket_step.cache.reset()

    @torch.no_grad()
    def prefill(self, ids_BP: Tensor, mask_BP: Tensor) -> Tensor:
        bucket_step = self._live_bucket_step()
        padding = bucket_step.token_B.shape[0] - ids_BP.shape[0]
        ids_BP = torch.cat([ids_BP, ids_BP.new_zeros(padding, ids_BP.shape[1])])
        mask_BP = torch.cat([mask_BP, mask_BP.new_zeros(padding, mask_BP.shape[1])])
        logits = bucket_step.model(ids_BP, padding_mask=mask_BP, cache=bucket_step.cache).logits
        return logits[: self.batch_size, -1]

    def step(self, token_B: Tensor, real_B: Tensor) -> Tensor:
        bucket_step = self._live_bucket_step()
        bucket_step.token_B.zero_()[: self.batch_size].copy_(token_B)
        bucket_step.real_B.zero_()[: self.batch_size].copy_(real_B)
        # Clone: a replay overwrites the captured output buffer.
        return bucket_step.run()[: self.batch_size].clone()

    def _live_bucket_step(self) -> _BucketStep:
        if self._bucket_step.session_id != self._id:
            raise RuntimeError("this decoding session was ended by a newer session on the same CompiledDecoder")
        return self._bucket_step

"""ServerMetrics: the server's Prometheus metrics, in a registry of its own (two apps in one process never mix)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from moe_lightning.serving.batching import BatchReport

logger = logging.getLogger(__name__)

HitRate = Callable[[], float | None]
"""Reads a hit rate in [0, 1], or None while there is none yet (e.g. an expert cache's stats)."""


class ServerMetrics:
    """Requests by endpoint and status, their latency, generated tokens and throughput, queue depth, batch sizes, and
    the expert cache's hit rate when there is one."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, queue_depth: Callable[[], int], expert_cache_hit_rate: HitRate | None = None) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "moe_lightning_requests", "Requests answered, by endpoint (route path) and HTTP status",
            ["endpoint", "status"], registry=self.registry,
        )
        self.latency = Histogram(
            "moe_lightning_request_duration_seconds", "Time from a request's arrival to its response's last byte",
            ["endpoint"], registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
        )
        self.generated_tokens = Counter(
            "moe_lightning_generated_tokens", "New tokens handed to requests", registry=self.registry,
        )
        self.tokens_per_second = Gauge(
            "moe_lightning_tokens_per_second", "New tokens per second of the latest model call", registry=self.registry,
        )
        self.batch_size = Histogram(
            "moe_lightning_batch_size", "Prompts decoded together in one model call", registry=self.registry,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
        )
        queue = Gauge("moe_lightning_queue_depth", "Requests waiting for the model", registry=self.registry)
        queue.set_function(queue_depth)
        hit_rate = Gauge(
            "moe_lightning_expert_cache_hit_rate", "Expert cache hits per lookup (NaN: no cache, or no lookup yet)",
            registry=self.registry,
        )
        hit_rate.set_function(lambda: _read_rate(expert_cache_hit_rate))

    def observe_batch(self, report: BatchReport) -> None:
        self.batch_size.observe(report.num_prompts)
        self.generated_tokens.inc(report.generated_tokens)
        if report.seconds > 0:
            self.tokens_per_second.set(report.generated_tokens / report.seconds)

    def observe_request(self, endpoint: str, status: int | str, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


def _read_rate(read: HitRate | None) -> float:
    if read is None:
        return math.nan
    try:
        rate = read()
    except Exception:  # a failing stats source must not take /metrics down
        logger.exception("the expert cache hit rate callback failed")
        return math.nan
    return math.nan if rate is None else float(rate)

"""RateLimiter: a token bucket per API key; a key out of tokens gets 429 with Retry-After. Transport-free and
thread-safe, so the HTTP app and a gRPC servicer can share one (and so share each key's budget)."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from moe_lightning.serving.auth import Principal
from moe_lightning.serving.errors import ApiError
from moe_lightning.serving.keys import RateLimit


@dataclass
class _Bucket:
    limit: RateLimit
    tokens: float
    updated_at: float

    def take(self, now: float) -> float:
        """Spend a token if there is one: 0; else the seconds until there is one."""
        elapsed = max(now - self.updated_at, 0.0)
        self.tokens = min(float(self.limit.burst), self.tokens + elapsed * self.limit.requests_per_second)
        self.updated_at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.limit.requests_per_second


class RateLimiter:
    """Each key's bucket starts full (``burst`` tokens) and refills at its ``requests_per_second``."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def acquire(self, principal: Principal) -> None:
        """Spend one request of ``principal``'s budget; 429 with ``Retry-After`` (whole seconds) when it has none."""
        limit = principal.rate_limit
        if limit is None:
            return
        with self._lock:
            now = self._clock()
            bucket = self._buckets.get(principal.name)
            if bucket is None or bucket.limit != limit:
                bucket = self._buckets[principal.name] = _Bucket(limit, float(limit.burst), now)
            wait_s = bucket.take(now)
        if wait_s > 0:
            raise ApiError(
                429, f"the key {principal.name!r} is over its rate limit of {limit.requests_per_second:g} requests/s "
                     f"(burst {limit.burst}): retry in {wait_s:.2f} s", code="rate_limited",
                headers={"Retry-After": str(max(math.ceil(wait_s), 1))},
            )

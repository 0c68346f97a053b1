"""Roles of API keys and what each route needs.

========================================================  =======================
Route                                                     Roles that may call it
========================================================  =======================
``GET /health``                                           anyone (no key)
``/v1/generate``, ``/v1/generate/stream``, ``/v1/generate/ws``,
``/v1/completions``, ``/v1/models``                       ``user``, ``admin``
``GET /metrics``                                          ``metrics``, ``admin``
``GET /openapi.json``                                     any key
========================================================  =======================

No key is 401; a key without a needed role is 403.
"""

from __future__ import annotations

from enum import Enum


class Role(str, Enum):
    ADMIN = "admin"
    """Everything."""
    USER = "user"
    """Generation (native and OpenAI-compatible APIs)."""
    METRICS = "metrics"
    """The Prometheus metrics only: for a scraper, which should not be able to spend the model's time."""


GENERATION = frozenset({Role.USER, Role.ADMIN})
"""The roles that may generate."""
METRICS = frozenset({Role.METRICS, Role.ADMIN})
"""The roles that may read ``/metrics``."""
ANY_ROLE = frozenset(Role)
"""Any key at all (the OpenAPI schema)."""

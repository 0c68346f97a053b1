"""AuditLog: one JSON line per answered request, appended to a file: who (the key's name, never the key), what
route, when, the outcome and the latency; the prompts only when asked for. Transport-free: the HTTP middleware and a
gRPC servicer hand it :class:`RequestRecord` s."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

CLIENT_CLOSED_REQUEST = 499
"""The status recorded for a request whose client left before its answer (nginx's convention)."""


@dataclass(frozen=True)
class RequestRecord:
    """One answered request."""

    key: str | None
    """The name of the caller's key; None when no valid key was presented."""
    method: str
    """The HTTP method (``WEBSOCKET`` for a WebSocket session)."""
    route: str
    """The route template (e.g. ``/v1/generate``), ``unmatched`` for an unknown path."""
    path: str
    status: int | str
    """The HTTP status (:data:`CLIENT_CLOSED_REQUEST` when the client left), or ``websocket`` for a session."""
    started_at: float
    """``time.time()`` at arrival."""
    seconds: float
    """From arrival to the answer's last byte."""
    client: str | None = None
    """The client's address."""
    prompts: Any = None
    """The request's prompts as sent, when the route noted them."""


class AuditLog:
    """Appends records to ``path`` as JSON lines (thread-safe).

    The file is opened for each line, so a log rotator may move it away at any time."""

    def __init__(self, path: str | Path, include_prompts: bool = False) -> None:
        self.path, self.include_prompts = Path(path), include_prompts
        if not self.path.parent.is_dir():
            raise ValueError(f"audit log {self.path}: the directory {self.path.parent} does not exist")
        self._lock = threading.Lock()
        with self._lock, self.path.open("a", encoding="utf-8"):  # fail at start, not at the first request
            pass

    def record(self, record: RequestRecord) -> None:
        entry = {
            "time": datetime.fromtimestamp(record.started_at, timezone.utc).isoformat(timespec="milliseconds"),
            "key": record.key, "method": record.method, "route": record.route, "path": record.path,
            "status": record.status, "latency_ms": round(record.seconds * 1000, 3), "client": record.client,
        }
        if self.include_prompts and record.prompts is not None:
            entry["prompts"] = record.prompts
        line = json.dumps(entry) + "\n"  # ASCII: any text, lone surrogates included, can be written
        with self._lock, self.path.open("a", encoding="utf-8") as log:
            log.write(line)

"""RequestRecordMiddleware: the ASGI middleware that makes a :class:`RequestRecord` of every HTTP request (timed to
its response's last byte, streams included) and WebSocket session, and hands it to observers (metrics, audit log).

Routes tell it who called and with what prompts through :func:`note_principal` and :func:`note_prompts`."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from starlette.requests import HTTPConnection
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from moe_lightning.serving.audit import RequestRecord
from moe_lightning.serving.auth import Principal

RequestObserver = Callable[[RequestRecord], None]
UNMATCHED = "unmatched"
"""The route of a path no route matched (one label for all, so random URLs can't grow the metrics' label set)."""


def note_principal(connection: HTTPConnection, principal: Principal) -> None:
    connection.state.principal = principal


def note_prompts(connection: HTTPConnection, prompts: Any) -> None:
    connection.state.prompts = prompts


class RequestRecordMiddleware:
    def __init__(self, app: ASGIApp, observers: Sequence[RequestObserver]) -> None:
        self.app, self.observers = app, tuple(observers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        started_at, started = time.time(), time.perf_counter()
        status: int | str = "websocket" if scope["type"] == "websocket" else 500

        async def send_and_note_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note_status)
        finally:
            self._record(scope, status, started_at, time.perf_counter() - started)

    def _record(self, scope: Scope, status: int | str, started_at: float, seconds: float) -> None:
        route = scope.get("route")
        state = scope.get("state") or {}
        principal = state.get("principal")
        client = scope.get("client")
        record = RequestRecord(
            key=None if principal is None else principal.name,
            method="WEBSOCKET" if scope["type"] == "websocket" else scope["method"],
            route=route.path if isinstance(route, BaseRoute) and hasattr(route, "path") else UNMATCHED,
            path=scope["path"], status=status, started_at=started_at, seconds=seconds,
            client=None if client is None else client[0], prompts=state.get("prompts"),
        )
        for observe in self.observers:
            observe(record)

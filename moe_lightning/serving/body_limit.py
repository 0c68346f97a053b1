"""BodySizeLimitMiddleware: a request body over ``max_body_bytes`` gets 413 in the server's error shape, at once when
its Content-Length says so, else as soon as the bytes received pass the limit (a chunked body).

Starlette's own limit (FastAPI's ``max_body_size``) answers in plain text, and replaces any answer to a request whose
Content-Length is over it, so this one takes its place."""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from moe_lightning.serving.errors import ApiError


class BodySizeLimitMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app, self.max_body_bytes = app, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            error = self._too_large(f"Content-Length: {int(declared)}")
            await JSONResponse(error.body(), status_code=error.status_code)(scope, receive, send)
            return
        received = 0

        async def receive_within_limit() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:  # raised inside the route, answered by the error handlers
                    raise self._too_large(f"more than {self.max_body_bytes} bytes")
            return message

        await self.app(scope, receive_within_limit, send)

    def _too_large(self, size: str) -> ApiError:
        return ApiError(413, f"the request body ({size}) is larger than max_body_bytes={self.max_body_bytes}",
                        code="body_too_large")

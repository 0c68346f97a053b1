"""cancel_if_client_leaves: a non-streamed request whose client disconnects is cancelled, so its generation job
leaves the queue (or the running batch) instead of decoding for nobody. Streams need none of this: their response
stops when the client leaves, which closes the stream and cancels its job."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request
from starlette.types import Receive

from moe_lightning.serving.audit import CLIENT_CLOSED_REQUEST
from moe_lightning.serving.errors import ApiError

T = TypeVar("T")


async def cancel_if_client_leaves(request: Request, work: Awaitable[T]) -> T:
    """``work``'s result; if the client disconnects first, ``work`` is cancelled and the request ends with
    499 (client closed request), which nobody receives but the metrics and the audit log record."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request.receive))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this request itself is cancelled (the server stopping)
        watcher.cancel()
        task.cancel()
    if task in done:
        return task.result()
    await asyncio.gather(task, return_exceptions=True)  # let the cancelled work clean up (its job is cancelled)
    raise ApiError(CLIENT_CLOSED_REQUEST, "the client closed the connection before the answer",
                   code="client_closed_request")


async def _disconnected(receive: Receive) -> None:
    """Returns when the client has gone (the request's body has already been read)."""
    while (await receive())["type"] != "http.disconnect":
        pass

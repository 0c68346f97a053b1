"""The native generation API: ``POST /v1/generate`` (whole responses), ``POST /v1/generate/stream`` (Server-Sent
Events) and ``/v1/generate/ws`` (a WebSocket taking one request after another).

Streams send each new token as it is decoded (``token``), each prompt's end (``end``), then the whole response
(``done``); a failure after the stream began arrives as an ``error`` message in OpenAI's error shape.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from fastapi import APIRouter, Depends, Request, WebSocket, WebSocketDisconnect
from pydantic import ValidationError
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.websockets import WebSocketState

from moe_lightning.serving.access import AccessControl, require
from moe_lightning.serving.auth import Principal, check_role
from moe_lightning.serving.disconnect import cancel_if_client_leaves
from moe_lightning.serving.errors import ERROR_RESPONSES, ApiError, validation_error
from moe_lightning.serving.request_records import note_principal, note_prompts
from moe_lightning.serving.roles import GENERATION
from moe_lightning.serving.schemas import (
    DoneEvent, EndEvent, GeneratedOutput, GenerateRequest, GenerateResponse, TokenEvent,
)
from moe_lightning.serving.service import GenerationService, GenerationStream, PromptOutput

logger = logging.getLogger(__name__)

POLICY_VIOLATION = 1008
INTERNAL_ERROR = 1011

router = APIRouter(dependencies=[Depends(require(GENERATION))], responses=ERROR_RESPONSES, tags=["generation"])
websocket_router = APIRouter()
"""The WebSocket authenticates by itself (the header or a first message), so it sits outside ``router``."""


@router.post("/v1/generate", response_model=GenerateResponse)
async def generate(body: GenerateRequest, request: Request) -> GenerateResponse:
    """Continue every prompt; answers when all are done (a client that leaves first cancels the request)."""
    note_prompts(request, body.prompts)
    stream = _start(request.app.state.service, body)
    return _response(stream, await cancel_if_client_leaves(request, stream.collect()))


@router.post("/v1/generate/stream", response_class=EventSourceResponse, responses={
    200: {"content": {"text/event-stream": {}}, "description": "token, end, done (or error) events"}})
async def generate_stream(body: GenerateRequest, request: Request) -> EventSourceResponse:
    """Continue every prompt, streaming each new token as a Server-Sent Event."""
    note_prompts(request, body.prompts)
    stream = _start(request.app.state.service, body)

    async def events() -> AsyncIterator[ServerSentEvent]:
        async with aclosing(_stream_messages(stream)) as messages:  # a client that leaves cancels the request
            async for message in messages:
                yield ServerSentEvent(json.dumps(message, ensure_ascii=False), event=message["type"])

    return EventSourceResponse(events())


@websocket_router.websocket("/v1/generate/ws")
async def generate_ws(websocket: WebSocket) -> None:
    """Authenticate with ``Authorization: Bearer KEY`` on the handshake, or with a first message
    ``{"type": "auth", "api_key": KEY}`` (answered ``{"type": "authenticated"}``); then send requests as
    :class:`GenerateRequest` JSON, one after another, each answered by its stream of messages. The key needs the
    ``user`` or ``admin`` role; each request spends one of its rate limit's requests."""
    access: AccessControl = websocket.app.state.access
    service: GenerationService = websocket.app.state.service
    await websocket.accept()
    try:
        principal = await _authenticate(websocket, access)
        if principal is None:
            return
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            await _serve_ws_request(websocket, service, access, principal,
                                    message.get("text") or message.get("bytes") or b"")
    except WebSocketDisconnect:
        return
    except Exception:
        logger.exception("unexpected error on the generation WebSocket")
        if websocket.application_state == WebSocketState.CONNECTED:
            with contextlib.suppress(WebSocketDisconnect, RuntimeError):  # the client may be gone already
                await websocket.send_json(_error_message(ApiError(500, "internal server error (logged on the server)")))
                await websocket.close(INTERNAL_ERROR)


def _start(service: GenerationService, body: GenerateRequest) -> GenerationStream:
    prompts = service.encode_prompts(body.prompts, "prompts")
    sampling = service.sampling(body.temperature, body.top_k, body.top_p, body.stop_tokens, body.seed)
    return service.start(prompts, body.max_new_tokens, sampling)


def _response(stream: GenerationStream, outputs: list[PromptOutput]) -> GenerateResponse:
    return GenerateResponse(
        outputs=[GeneratedOutput(index=out.index, tokens=out.tokens, text=out.text, finish_reason=out.finish_reason)
                 for out in outputs],
        usage=stream.usage(),
    )


async def _stream_messages(stream: GenerationStream) -> AsyncIterator[dict[str, Any]]:
    """A request's stream as JSON-ready messages: tokens, ends, then done; or an error message."""
    try:
        async with aclosing(stream.events()) as events:
            async for event in events:
                if event.finish_reason is None:
                    yield TokenEvent(index=event.index, token=event.token, text=event.text).model_dump()
                else:
                    yield EndEvent(index=event.index, text=event.text, finish_reason=event.finish_reason).model_dump()
    except ApiError as error:
        yield _error_message(error)
        return
    response = _response(stream, stream.outputs())
    yield DoneEvent(outputs=response.outputs, usage=response.usage).model_dump()


async def _authenticate(websocket: WebSocket, access: AccessControl) -> Principal | None:
    """The socket's principal; None once it is refused (and closed)."""
    header = websocket.headers.get("authorization")
    if not access.authenticator.required:
        return _admit(websocket, access, None)
    if header is not None:
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer":
            return await _refuse(websocket, ApiError(401, "the Authorization header must read 'Bearer <key>'",
                                                     code="invalid_api_key"))
        return await _admit_or_refuse(websocket, access, key.strip())
    message = await websocket.receive()
    if message["type"] == "websocket.disconnect":
        return None
    try:
        first = json.loads(message.get("text") or message.get("bytes") or b"")
    except ValueError:
        first = None
    if not (isinstance(first, dict) and first.get("type") == "auth" and isinstance(first.get("api_key"), str)):
        return await _refuse(websocket, ApiError(
            401, 'missing API key: send {"type": "auth", "api_key": KEY} first, or the Authorization: Bearer header '
                 "on the handshake", code="invalid_api_key"))
    principal = await _admit_or_refuse(websocket, access, first["api_key"])
    if principal is not None:
        await websocket.send_json({"type": "authenticated"})
    return principal


def _admit(websocket: WebSocket, access: AccessControl, key: str | None) -> Principal:
    """Authenticate and check the role, spending no rate limit: each request on the socket spends its own."""
    principal = access.authenticator.authenticate(key)
    note_principal(websocket, principal)
    check_role(principal, GENERATION)
    return principal


async def _admit_or_refuse(websocket: WebSocket, access: AccessControl, key: str) -> Principal | None:
    try:
        return _admit(websocket, access, key)
    except ApiError as error:
        return await _refuse(websocket, error)


async def _refuse(websocket: WebSocket, error: ApiError) -> None:
    await websocket.send_json(_error_message(error))
    await websocket.close(POLICY_VIOLATION, str(error.detail)[:120])


async def _serve_ws_request(
    websocket: WebSocket, service: GenerationService, access: AccessControl, principal: Principal, text: str | bytes,
) -> None:
    try:
        access.rate_limiter.acquire(principal)
        body = GenerateRequest.model_validate_json(text)
        stream = _start(service, body)
    except ValidationError as error:
        await websocket.send_json(_error_message(validation_error(error.errors())))
        return
    except ApiError as error:
        await websocket.send_json(_error_message(error))
        return
    async with aclosing(_stream_messages(stream)) as messages:  # a client that leaves cancels the request
        async for message in messages:
            await websocket.send_json(message)


def _error_message(error: ApiError) -> dict[str, Any]:
    """A stream's error message: OpenAI's error JSON with ``type: error`` and the HTTP status it stands for."""
    return {"type": "error", "status": error.status_code, **error.body()}

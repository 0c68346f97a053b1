"""GenerationServicer: the ``Generation`` RPCs over the REST server's :class:`GenerationService` and
:class:`AccessControl`.

A call is admitted (key, role, the key's rate limit, shared with REST), its request checked and queued exactly as a
REST request is; every refusal is the service's :class:`ApiError`, sent as its gRPC status (see :mod:`.status`). A
caller that cancels, or whose deadline passes, cancels its queued or running job. Each call ends as a
:class:`RequestRecord` for the observers (metrics, audit log) with the HTTP status its outcome stands for, so both
transports count alike.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc

from moe_lightning.serving.access import AccessControl
from moe_lightning.serving.audit import CLIENT_CLOSED_REQUEST, RequestRecord
from moe_lightning.serving.auth import Principal
from moe_lightning.serving.errors import ApiError
from moe_lightning.serving.grpc import generation_pb2 as pb
from moe_lightning.serving.grpc import generation_pb2_grpc, messages
from moe_lightning.serving.grpc.bearer import bearer_key
from moe_lightning.serving.grpc.status import abort
from moe_lightning.serving.request_records import RequestObserver
from moe_lightning.serving.roles import GENERATION
from moe_lightning.serving.service import GenerationService, GenerationStream

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generation"].full_name
"""``moe_lightning.serving.v1.Generation``: the name health checks ask about."""
RECORD_METHOD = "GRPC"
"""The ``method`` of a gRPC call's :class:`RequestRecord` (its ``route`` is the RPC's path)."""


@dataclass
class _Call:
    """What one call has revealed so far, for its record."""

    principal: Principal | None = None
    prompts: Any = None
    status: int = 200


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    """Answers ``Generate`` and ``GenerateStream``; ``observers`` get a record of every call."""

    def __init__(
        self, service: GenerationService, access: AccessControl, observers: Sequence[RequestObserver] = (),
    ) -> None:
        self.service, self.access, self.observers = service, access, tuple(observers)

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        async with self._answering(context, "Generate") as call:
            stream = self._start(request, context, call)
            return messages.generate_response(stream, await stream.collect())

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.GenerateStreamMessage]:
        async with self._answering(context, "GenerateStream") as call:
            stream = self._start(request, context, call)
            async with aclosing(stream.events()) as events:  # leaving early (a cancelled call) cancels the job
                async for event in events:
                    yield messages.stream_message(event)
            yield messages.done_message(stream)

    def _start(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext, call: _Call) -> GenerationStream:
        """Admit the caller, check the request and queue it: what REST does before its first byte."""
        key = bearer_key(context.invocation_metadata()) if self.access.authenticator.required else None
        self.access.admit(key, GENERATION, lambda principal: setattr(call, "principal", principal))
        body = messages.generate_request(request)
        call.prompts = body.prompts
        prompts = self.service.encode_prompts(body.prompts, "prompts")
        sampling = self.service.sampling(body.temperature, body.top_k, body.top_p, body.stop_tokens, body.seed)
        return self.service.start(prompts, body.max_new_tokens, sampling)

    @asynccontextmanager
    async def _answering(self, context: grpc.aio.ServicerContext, method: str) -> AsyncIterator[_Call]:
        """Send an ApiError as its status and an unexpected exception as INTERNAL (logged); record the call."""
        started_at, started = time.time(), time.perf_counter()
        call = _Call()
        try:
            yield call
        except ApiError as error:
            call.status = error.status_code
            await abort(context, error)
        except Exception:
            call.status = 500
            logger.exception("unexpected error answering gRPC %s", method)
            await abort(context, ApiError(500, "internal server error (logged on the server)"))
        except BaseException:  # cancelled: by the caller, its deadline, or the server stopping
            call.status = CLIENT_CLOSED_REQUEST
            raise
        finally:
            self._record(call, context, f"/{SERVICE_NAME}/{method}", started_at, time.perf_counter() - started)

    def _record(self, call: _Call, context: grpc.aio.ServicerContext, route: str, started_at: float,
                seconds: float) -> None:
        record = RequestRecord(
            key=None if call.principal is None else call.principal.name, method=RECORD_METHOD, route=route,
            path=route, status=call.status, started_at=started_at, seconds=seconds, client=_peer_host(context.peer()),
            prompts=call.prompts,
        )
        for observe in self.observers:
            observe(record)


def _peer_host(peer: str | None) -> str | None:
    """The address of a gRPC peer such as ``ipv4:127.0.0.1:5000`` or ``ipv6:[::1]:5000``, without its port."""
    if not peer:
        return None
    kind, _, address = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return peer
    host = address.rpartition(":")[0]
    return host.removeprefix("[").removesuffix("]") or address

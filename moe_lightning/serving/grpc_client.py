"""MoELightningGrpcClient: a small synchronous client of the server's gRPC API (the ``grpc`` extra, and pydantic),
answering with the same response models as the REST :class:`~moe_lightning.serving.client.MoELightningClient`."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from moe_lightning.serving.grpc import generation_pb2 as pb
from moe_lightning.serving.grpc.generation_pb2_grpc import GenerationStub
from moe_lightning.serving.schemas import (
    DoneEvent, EndEvent, FinishReason, GeneratedOutput, GenerateResponse, TokenEvent, Usage,
)

StreamMessage = TokenEvent | EndEvent | DoneEvent
Prompts = str | Sequence[int] | Sequence[str | Sequence[int]]
SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "stop_tokens", "seed")
_FINISH_REASONS: dict[int, FinishReason] = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length"}


class MoELightningGrpcError(Exception):
    """A call that ended in an error: its gRPC code and message, and what the server's ``google.rpc`` details say:
    the request field at fault, the reason (e.g. ``QUEUE_FULL``, ``RATE_LIMITED``, ``INVALID_API_KEY``) and how long
    to wait before retrying."""

    def __init__(
        self, code: grpc.StatusCode, message: str, param: str | None = None, reason: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code, self.message, self.param, self.reason, self.retry_after_s = code, message, param, reason, retry_after_s


class MoELightningGrpcClient:
    """Talks to a moe-lightning server's gRPC port.

    Args:
        target: ``host:port``, e.g. ``127.0.0.1:50051``.
        api_key: one of the server's API keys (None for a server run with ``--insecure-no-auth``).
        timeout: seconds a call may take (a whole non-streamed generation included): its gRPC deadline.
        root_certificates: PEM certificates to trust for a TLS server (``--ssl-certfile``); None with ``tls=True``:
            the system's.
        tls: connect over TLS (implied by ``root_certificates``).
    """

    def __init__(
        self, target: str, api_key: str | None = None, timeout: float = 300.0, *,
        root_certificates: bytes | None = None, tls: bool = False,
    ) -> None:
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got timeout={timeout}")
        if tls or root_certificates is not None:
            self._channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates))
        else:
            self._channel = grpc.insecure_channel(target)
        self._metadata = () if api_key is None else (("authorization", f"Bearer {api_key}"),)
        self.timeout = timeout
        self._generation = GenerationStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def health(self, service: str = "") -> str:
        """The standard health check (no key needed): ``SERVING``, or ``NOT_SERVING`` while the server stops;
        ``service`` "" is the whole server, ``moe_lightning.serving.v1.Generation`` the generation service."""
        try:
            response = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout)
        except grpc.RpcError as error:
            raise _error(error) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def generate(self, prompts: Prompts, max_new_tokens: int = 64, **sampling: Any) -> GenerateResponse:
        """Continue ``prompts`` (one text, one token-id list, or a list of either); ``sampling``: ``temperature``,
        ``top_k``, ``top_p``, ``stop_tokens``, ``seed`` (as in :class:`~moe_lightning.serving.schemas.GenerateRequest`,
        checked by the server)."""
        request = _request(prompts, max_new_tokens, sampling)
        try:
            response = self._generation.Generate(request, metadata=self._metadata, timeout=self.timeout)
        except grpc.RpcError as error:
            raise _error(error) from None
        return _response(response)

    def stream(self, prompts: Prompts, max_new_tokens: int = 64, **sampling: Any) -> Iterator[StreamMessage]:
        """:meth:`generate`, message by message as the server decodes: a :class:`TokenEvent` per new token, an
        :class:`EndEvent` per prompt, then the :class:`DoneEvent` holding the whole response. Leaving the loop early
        cancels the call (and the server drops the request)."""
        request = _request(prompts, max_new_tokens, sampling)
        call = self._generation.GenerateStream(request, metadata=self._metadata, timeout=self.timeout)
        try:
            for message in call:
                yield _stream_message(message)
        except grpc.RpcError as error:
            raise _error(error) from None
        finally:
            call.cancel()  # a no-op once the call has ended

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> MoELightningGrpcClient:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def _request(prompts: Prompts, max_new_tokens: int, sampling: dict[str, Any]) -> pb.GenerateRequest:
    unknown = sorted(set(sampling) - set(SAMPLING_FIELDS))
    if unknown:
        raise TypeError(f"unknown sampling arguments {unknown}: expected some of {list(SAMPLING_FIELDS)}")
    if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)):
        prompts = [prompts]  # type: ignore[list-item]
    messages = [pb.Prompt(text=prompt) if isinstance(prompt, str) else pb.Prompt(token_ids=pb.TokenIds(ids=prompt))
                for prompt in prompts]
    given = {name: value for name, value in sampling.items() if value is not None}
    return pb.GenerateRequest(prompts=messages, max_new_tokens=max_new_tokens, **given)


def _output(output: pb.GeneratedOutput) -> GeneratedOutput:
    return GeneratedOutput(index=output.index, tokens=list(output.tokens),
                           text=output.text if output.HasField("text") else None,
                           finish_reason=_FINISH_REASONS[output.finish_reason])


def _response(response: pb.GenerateResponse) -> GenerateResponse:
    usage = response.usage
    return GenerateResponse(
        outputs=[_output(output) for output in response.outputs],
        usage=Usage(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                    total_tokens=usage.total_tokens),
    )


def _stream_message(message: pb.GenerateStreamMessage) -> StreamMessage:
    kind = message.WhichOneof("event")
    if kind == "token":
        token = message.token
        return TokenEvent(index=token.index, token=token.token, text=token.text if token.HasField("text") else None)
    if kind == "end":
        end = message.end
        return EndEvent(index=end.index, text=end.text if end.HasField("text") else None,
                        finish_reason=_FINISH_REASONS[end.finish_reason])
    if kind == "done":
        done = _response(message.done)
        return DoneEvent(outputs=done.outputs, usage=done.usage)
    raise MoELightningGrpcError(grpc.StatusCode.INTERNAL, f"the server sent a stream message without an event: "
                                                          f"{message!r}")


def _error(error: grpc.RpcError) -> MoELightningGrpcError:
    """The error of a failed call, with what its ``grpc-status-details-bin`` says."""
    code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
    message = error.details() if isinstance(error, grpc.Call) else str(error)
    param = reason = retry_after_s = None
    status = rpc_status.from_call(error) if isinstance(error, grpc.Call) else None
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, param = info.reason, info.metadata.get("param", param)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            param = bad_request.field_violations[0].field if bad_request.field_violations else param
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_after_s = retry.retry_delay.ToTimedelta().total_seconds()
    return MoELightningGrpcError(code, message or "", param, reason, retry_after_s)

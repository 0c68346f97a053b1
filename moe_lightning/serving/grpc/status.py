"""An :class:`ApiError` of the generation service as a gRPC status: the code its HTTP status stands for, the same
message, and the standard ``google.rpc`` details in ``grpc-status-details-bin``: ``ErrorInfo`` (the reason and the
HTTP status), ``BadRequest`` naming the field at fault, ``RetryInfo`` when the caller should retry later."""

from __future__ import annotations

from typing import NoReturn

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from moe_lightning.serving.errors import ApiError

ERROR_DOMAIN = "moe-lightning"
"""``ErrorInfo.domain`` of every error this server sends."""

GRPC_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT, 413: grpc.StatusCode.INVALID_ARGUMENT, 422: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED, 403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.NOT_FOUND,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED, 500: grpc.StatusCode.INTERNAL, 503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
"""The gRPC code of each HTTP status the service answers (any other is UNKNOWN)."""


def grpc_code(status_code: int) -> grpc.StatusCode:
    return GRPC_CODES.get(status_code, grpc.StatusCode.UNKNOWN)


def rich_status(error: ApiError) -> grpc.Status:
    """``error`` as a gRPC status with its ``google.rpc`` details."""
    code = grpc_code(error.status_code)
    info = error_details_pb2.ErrorInfo(
        reason=(error.code or f"http_{error.status_code}").upper(), domain=ERROR_DOMAIN,
        metadata={"http_status": str(error.status_code), **({"param": error.param} if error.param else {})},
    )
    details = [info]
    if error.param and code == grpc.StatusCode.INVALID_ARGUMENT:
        violation = error_details_pb2.BadRequest.FieldViolation(field=error.param, description=error.detail)
        details.append(error_details_pb2.BadRequest(field_violations=[violation]))
    retry_after = (error.headers or {}).get("Retry-After")
    if retry_after is not None:
        details.append(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=int(retry_after))))
    packed = []
    for detail in details:
        packed.append(any_pb2.Any())
        packed[-1].Pack(detail)
    return rpc_status.to_status(status_pb2.Status(code=code.value[0], message=error.detail, details=packed))


async def abort(context: grpc.aio.ServicerContext, error: ApiError) -> NoReturn:
    """End the call with ``error``'s status (raises, as ``context.abort`` does)."""
    status = rich_status(error)
    await context.abort(status.code, status.details, status.trailing_metadata)


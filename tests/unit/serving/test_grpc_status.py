"""Service errors as gRPC statuses: the code each HTTP status stands for and the google.rpc details beside it."""

import grpc
import pytest

pytest.importorskip("grpc_status", reason="the grpc extra (grpcio, grpcio-health-checking, grpcio-status) is missing")

from google.rpc import error_details_pb2, status_pb2  # noqa: E402
from grpc_status import rpc_status  # noqa: E402

from moe_lightning.serving.errors import ApiError  # noqa: E402
from moe_lightning.serving.grpc.status import ERROR_DOMAIN, rich_status  # noqa: E402


def details(status: grpc.Status) -> dict[str, object]:
    (key, value), = status.trailing_metadata
    assert key == rpc_status.GRPC_DETAILS_METADATA_KEY
    message = status_pb2.Status.FromString(value)
    assert (message.code, message.message) == (status.code.value[0], status.details)
    found = {}
    for kind in (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest, error_details_pb2.RetryInfo):
        for detail in message.details:
            if detail.Is(kind.DESCRIPTOR):
                found[kind.__name__] = kind()
                detail.Unpack(found[kind.__name__])
    return found


@pytest.mark.parametrize(("http", "code"), [
    (400, grpc.StatusCode.INVALID_ARGUMENT), (413, grpc.StatusCode.INVALID_ARGUMENT),
    (422, grpc.StatusCode.INVALID_ARGUMENT), (401, grpc.StatusCode.UNAUTHENTICATED),
    (403, grpc.StatusCode.PERMISSION_DENIED), (404, grpc.StatusCode.NOT_FOUND),
    (429, grpc.StatusCode.RESOURCE_EXHAUSTED), (500, grpc.StatusCode.INTERNAL), (503, grpc.StatusCode.UNAVAILABLE),
    (418, grpc.StatusCode.UNKNOWN),
])
def test_each_http_status_has_its_grpc_code(http, code):
    status = rich_status(ApiError(http, f"status {http}"))
    assert (status.code, status.details) == (code, f"status {http}")
    info = details(status)["ErrorInfo"]
    assert (info.reason, info.domain, dict(info.metadata)) == (f"HTTP_{http}", ERROR_DOMAIN, {"http_status": str(http)})


def test_a_field_error_names_the_field_and_a_busy_server_says_when_to_retry():
    found = details(rich_status(ApiError(422, "max_new_tokens=33 > 32", "max_new_tokens", "invalid_value")))
    assert found["ErrorInfo"].reason == "INVALID_VALUE" and found["ErrorInfo"].metadata["param"] == "max_new_tokens"
    assert [(v.field, v.description) for v in found["BadRequest"].field_violations] == [
        ("max_new_tokens", "max_new_tokens=33 > 32")]
    assert "RetryInfo" not in found
    for http, code in ((429, grpc.StatusCode.RESOURCE_EXHAUSTED), (503, grpc.StatusCode.UNAVAILABLE)):
        status = rich_status(ApiError(http, "busy", code="queue_full", headers={"Retry-After": "3"}))
        found = details(status)
        assert status.code == code and found["RetryInfo"].retry_delay.seconds == 3 and "BadRequest" not in found

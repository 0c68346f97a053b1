"""The gRPC API beside REST in one process (one model, one queue): the same tokens as REST and as generate(), streams
equal to unary calls, health, and every refusal as its gRPC status naming the value."""

import json
import threading
import time

import grpc
import httpx
import pytest

pytest.importorskip("grpc_health", reason="the grpc extra (grpcio, grpcio-health-checking, grpcio-status) is missing")

from google.rpc import error_details_pb2  # noqa: E402
from grpc_status import rpc_status  # noqa: E402

from moe_lightning.inference.decoding import EagerDecoder  # noqa: E402
from moe_lightning.serving.app import create_app  # noqa: E402
from moe_lightning.serving.grpc import generation_pb2 as pb  # noqa: E402
from moe_lightning.serving.grpc.generation_pb2_grpc import GenerationStub  # noqa: E402
from moe_lightning.serving.grpc.server import serve_grpc_beside  # noqa: E402
from moe_lightning.serving.grpc_client import MoELightningGrpcClient, MoELightningGrpcError  # noqa: E402
from moe_lightning.serving.keys import ApiKeyRecord, RateLimit  # noqa: E402
from moe_lightning.serving.schemas import DoneEvent, EndEvent, TokenEvent  # noqa: E402
from tests.unit.serving.conftest import ADMIN_KEY, API_KEY, AUTH, alone, live_server, settings  # noqa: E402

PROMPTS = ["Hello", [7, 8, 9, 10, 11, 12], "€uro"]
METRICS_KEY, LIMITED_KEY = "metrics-key-0123456789", "limited-key-0123456789"
SERVICE = "moe_lightning.serving.v1.Generation"


@pytest.fixture(scope="module")
def servers(engine):
    """REST and gRPC serving one app on loopback: (REST base URL, gRPC target)."""
    app = create_app(engine, settings(max_new_tokens=32, batch_window_ms=2))
    grpc_server = serve_grpc_beside(app, "127.0.0.1", 0)
    with live_server(app) as url:
        yield url, grpc_server.address


@pytest.fixture(scope="module")
def guarded(engine, tmp_path_factory):
    """A server with a metrics-only key, a rate-limited key, an audit log and a small body limit:
    (REST base URL, gRPC target, audit log path)."""
    audit = tmp_path_factory.mktemp("audit") / "audit.jsonl"
    keys = (ADMIN_KEY, ApiKeyRecord.of_key(METRICS_KEY, "scraper", ["metrics"]),
            ApiKeyRecord.of_key(LIMITED_KEY, "limited", ["user"], RateLimit(requests_per_second=0.01, burst=1)))
    app = create_app(engine, settings(api_keys=keys, audit_log=str(audit), max_body_bytes=2048))
    grpc_server = serve_grpc_beside(app, "127.0.0.1", 0)
    with live_server(app) as url:
        yield url, grpc_server.address, audit


def prompt_ids(prompt):
    return list(prompt.encode()) if isinstance(prompt, str) else prompt


def test_grpc_answers_as_rest_and_generate_do(servers, model):
    url, target = servers
    for sampling in ({}, {"stop_tokens": [alone(model, list(b"Hello"), 4)[1]]}, {"temperature": 0.8, "seed": 7}):
        body = {"prompts": PROMPTS, "max_new_tokens": 6, **sampling}
        rest = httpx.post(f"{url}/v1/generate", json=body, headers=AUTH, timeout=60)
        assert rest.status_code == 200, rest.text
        with MoELightningGrpcClient(target, API_KEY, timeout=60) as client:
            assert client.generate(PROMPTS, max_new_tokens=6, **sampling).model_dump() == rest.json()
    with MoELightningGrpcClient(target, API_KEY, timeout=60) as client:
        greedy = client.generate(PROMPTS, max_new_tokens=6)
        assert client.generate("Hello", max_new_tokens=6).outputs[0] == greedy.outputs[0]
    assert [out.tokens for out in greedy.outputs] == [alone(model, prompt_ids(p), 6) for p in PROMPTS]


def test_streaming_yields_the_tokens_of_the_unary_call(servers):
    _, target = servers
    with MoELightningGrpcClient(target, API_KEY, timeout=60) as client:
        for sampling in ({}, {"temperature": 0.9, "top_k": 50, "seed": 1234}):
            unary = client.generate(PROMPTS, max_new_tokens=8, **sampling)
            messages = list(client.stream(PROMPTS, max_new_tokens=8, **sampling))
            done = messages[-1]
            assert isinstance(done, DoneEvent) and done.outputs == unary.outputs and done.usage == unary.usage
            for out in unary.outputs:
                assert [m.token for m in messages if isinstance(m, TokenEvent) and m.index == out.index] == out.tokens
                ends = [m for m in messages if isinstance(m, EndEvent) and m.index == out.index]
                assert [end.finish_reason for end in ends] == [out.finish_reason]
                texts = [m.text for m in messages if not isinstance(m, DoneEvent) and m.index == out.index]
                assert "".join(texts) == out.text


def test_health_answers_serving_without_a_key(servers):
    _, target = servers
    with MoELightningGrpcClient(target, timeout=60) as client:
        assert client.health() == "SERVING" and client.health(SERVICE) == "SERVING"
        with pytest.raises(MoELightningGrpcError) as error:
            client.health("no.such.Service")
    assert error.value.code == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("metadata", [None, [("authorization", "Bearer wrong-key")], [("authorization", API_KEY)],
                                      [("authorization", "Bearer "), ("authorization", f"Bearer {API_KEY}")]])
def test_calls_without_a_valid_key_are_unauthenticated(servers, metadata):
    _, target = servers
    request = pb.GenerateRequest(prompts=[pb.Prompt(text="Hi")], max_new_tokens=2)
    with grpc.insecure_channel(target) as channel:
        stub = GenerationStub(channel)
        for call in (stub.Generate, lambda *args, **kwargs: list(stub.GenerateStream(*args, **kwargs))):
            with pytest.raises(grpc.RpcError) as error:
                call(request, metadata=metadata, timeout=60)
            assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "Bearer <key>" in error.value.details() and API_KEY not in error.value.details()


@pytest.mark.parametrize(("fields", "param", "shown"), [
    ({"max_new_tokens": 0}, "max_new_tokens", "greater than or equal to 1"),
    ({"max_new_tokens": 33}, "max_new_tokens", "max_new_tokens=33 > this server's max_new_tokens=32"),
    ({"temperature": -1.0}, "temperature", "got -1.0"),
    ({"top_p": 2.0}, "top_p", "got 2.0"),
    ({"seed": 2**63}, "seed", str(2**63)),
    ({"stop_tokens": [999]}, "stop_tokens", "[999]"),
    ({"prompts": []}, "prompts", "at least 1 item"),
    ({"prompts": [pb.Prompt(token_ids=pb.TokenIds(ids=[5, 300]))]}, "prompts[0]", "[300]"),
    ({"prompts": [pb.Prompt(text="Hi"), pb.Prompt()]}, "prompts", "prompts[1] sets neither text nor token_ids"),
    ({"prompts": [pb.Prompt(token_ids=pb.TokenIds(ids=[1] * 60))]}, "max_new_tokens",
     "60 tokens + max_new_tokens=8 > the model's context of max_seq_len=64"),
])
def test_bad_arguments_are_invalid_argument_naming_the_field_and_value(servers, fields, param, shown):
    _, target = servers
    request = pb.GenerateRequest(**{"prompts": [pb.Prompt(text="Hi")], "max_new_tokens": 8, **fields})
    with grpc.insecure_channel(target) as channel:
        stub = GenerationStub(channel)
        for call in (stub.Generate, lambda *args, **kwargs: list(stub.GenerateStream(*args, **kwargs))):
            with pytest.raises(grpc.RpcError) as error:
                call(request, metadata=[("authorization", f"Bearer {API_KEY}")], timeout=60)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and shown in error.value.details()
            bad_request = error_details_pb2.BadRequest()
            assert [detail.Unpack(bad_request) for detail in rpc_status.from_call(error.value).details
                    if detail.Is(bad_request.DESCRIPTOR)] == [True]
            assert [violation.field for violation in bad_request.field_violations] == [param]


def test_the_client_raises_the_code_field_and_reason(servers):
    _, target = servers
    with MoELightningGrpcClient(target, API_KEY, timeout=60) as client:
        with pytest.raises(MoELightningGrpcError) as error:
            list(client.stream("Hi", max_new_tokens=33))
        assert (error.value.code, error.value.param, error.value.reason) == (
            grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens", "INVALID_VALUE")
        with pytest.raises(TypeError, match="unknown sampling arguments .'temprature'."):
            client.generate("Hi", temprature=0.5)
    with MoELightningGrpcClient(target, "wrong-key", timeout=60) as intruder, pytest.raises(MoELightningGrpcError) as e:
        intruder.generate("Hi")
    assert (e.value.code, e.value.reason) == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_API_KEY")


def test_roles_rate_limits_body_size_and_the_audit_log_are_rest_s(guarded):
    url, target, audit = guarded
    with MoELightningGrpcClient(target, METRICS_KEY, timeout=60) as scraper, pytest.raises(MoELightningGrpcError) as e:
        scraper.generate("Hi", max_new_tokens=2)
    assert e.value.code == grpc.StatusCode.PERMISSION_DENIED and "'scraper'" in e.value.message

    # The limited key's one request of budget, spent over REST, is gone for gRPC too.
    rest = httpx.post(f"{url}/v1/generate", json={"prompts": ["Hi"], "max_new_tokens": 2},
                      headers={"Authorization": f"Bearer {LIMITED_KEY}"}, timeout=60)
    assert rest.status_code == 200
    with MoELightningGrpcClient(target, LIMITED_KEY, timeout=60) as limited, pytest.raises(MoELightningGrpcError) as e:
        limited.generate("Hi", max_new_tokens=2)
    assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and e.value.reason == "RATE_LIMITED"
    assert e.value.retry_after_s >= 1 and "'limited' is over its rate limit" in e.value.message

    with MoELightningGrpcClient(target, API_KEY, timeout=60) as client:
        with pytest.raises(MoELightningGrpcError) as e:
            client.generate([[200] * 1500], max_new_tokens=2)  # 3 kB of protobuf > max_body_bytes=2048
        assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in e.value.message
        assert client.generate("Hi", max_new_tokens=2).outputs[0].finish_reason == "length"

    grpc_records = [record for record in map(json.loads, audit.read_text().splitlines())
                    if record["method"] == "GRPC"]
    assert [(r["key"], r["route"], r["status"]) for r in grpc_records] == [
        ("scraper", f"/{SERVICE}/Generate", 403), ("limited", f"/{SERVICE}/Generate", 429),
        ("tester", f"/{SERVICE}/Generate", 200)]
    assert grpc_records[-1]["client"] == "127.0.0.1"


class GatedDecoder(EagerDecoder):
    """Eager decoding whose steps after the first token wait until ``release`` is set (30 s at most)."""

    def __init__(self, model) -> None:
        super().__init__(model)
        self.release = threading.Event()

    def start(self, batch_size, max_len):
        session = super().start(batch_size, max_len)
        step = session.step

        def gated_step(token_B, real_B):
            self.release.wait(30)
            return step(token_B, real_B)

        session.step = gated_step
        return session


def test_a_stream_left_early_is_cancelled_and_recorded_as_the_client_s_leaving(engine, tmp_path):
    decoder = GatedDecoder(engine.model)
    audit = tmp_path / "audit.jsonl"
    app = create_app(engine, settings(audit_log=str(audit)), decoder=decoder)
    grpc_server = serve_grpc_beside(app, "127.0.0.1", 0)
    with live_server(app), MoELightningGrpcClient(grpc_server.address, API_KEY, timeout=60) as client:
        try:
            for message in client.stream("Hi", max_new_tokens=8):  # the first token comes; the second waits
                assert isinstance(message, TokenEvent)
                break
            deadline = time.monotonic() + 30
            while not audit.read_text() and time.monotonic() < deadline:
                time.sleep(0.02)
        finally:
            decoder.release.set()
        assert client.generate("Hi", max_new_tokens=2).outputs[0].finish_reason == "length"  # the model moved on
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [(r["route"], r["status"]) for r in records][:1] == [(f"/{SERVICE}/GenerateStream", 499)]

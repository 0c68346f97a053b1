"""A bounded gRPC load on loopback: 500 calls, 64 at a time, against a small queue. Every call is answered: with its
own tokens, or with an explicit RESOURCE_EXHAUSTED (queue full, with a retry delay) or UNAVAILABLE; none is lost."""

import random
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest

pytest.importorskip("grpc_health", reason="the grpc extra (grpcio, grpcio-health-checking, grpcio-status) is missing")

from moe_lightning.serving.app import create_app  # noqa: E402
from moe_lightning.serving.grpc.server import serve_grpc_beside  # noqa: E402
from moe_lightning.serving.grpc_client import MoELightningGrpcClient, MoELightningGrpcError  # noqa: E402
from moe_lightning.serving.schemas import DoneEvent  # noqa: E402
from tests.unit.serving.conftest import API_KEY, AUTH, alone, live_server, settings  # noqa: E402

pytestmark = pytest.mark.slow
NUM_CALLS, CONCURRENCY, NUM_DISTINCT = 500, 64, 24
LOAD_DEADLINE_S = 120


def test_every_call_under_load_gets_its_tokens_or_an_explicit_refusal(engine, model):
    rng = random.Random(0)
    distinct = [([rng.randrange(256) for _ in range(rng.randint(1, 12))], rng.randint(1, 6)) for _ in range(NUM_DISTINCT)]
    expected = [alone(model, prompt, n) for prompt, n in distinct]
    app = create_app(engine, settings(max_new_tokens=8, max_queue_size=32, batch_window_ms=2))
    grpc_server = serve_grpc_beside(app, "127.0.0.1", 0)
    with live_server(app) as url, MoELightningGrpcClient(grpc_server.address, API_KEY, timeout=60) as client:
        def call(index: int):
            prompt, n = distinct[index % NUM_DISTINCT]
            try:
                if index % 5 == 0:
                    done = list(client.stream(prompt, max_new_tokens=n))[-1]
                    assert isinstance(done, DoneEvent)
                    return "OK", done.outputs[0].tokens, None
                return "OK", client.generate(prompt, max_new_tokens=n).outputs[0].tokens, None
            except MoELightningGrpcError as error:
                return error.code.name, error.reason, error.retry_after_s

        batches_before = model_calls(url)
        started = time.monotonic()
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            results = list(pool.map(call, range(NUM_CALLS), timeout=LOAD_DEADLINE_S))
        seconds = time.monotonic() - started
        batches = model_calls(url) - batches_before

    outcomes = Counter(code for code, _, _ in results)
    print(f"\ngRPC load: {NUM_CALLS} calls, {CONCURRENCY} concurrent, in {seconds:.1f} s: {dict(outcomes)}, "
          f"{batches:.0f} model calls")
    assert len(results) == NUM_CALLS and set(outcomes) <= {"OK", "RESOURCE_EXHAUSTED", "UNAVAILABLE"}
    assert outcomes["OK"] > 0
    for index, (code, tokens_or_reason, retry_after_s) in enumerate(results):
        if code == "OK":
            assert tokens_or_reason == expected[index % NUM_DISTINCT], f"call {index} got another prompt's tokens"
        elif code == "RESOURCE_EXHAUSTED":
            assert (tokens_or_reason, retry_after_s) == ("QUEUE_FULL", 1.0)
    assert batches < outcomes["OK"]  # calls shared model calls


def model_calls(url: str) -> float:
    metrics = httpx.get(f"{url}/metrics", headers=AUTH, timeout=60).text
    return next(float(line.split()[-1]) for line in metrics.splitlines()
                if line.startswith("moe_lightning_batch_size_count"))

"""A bounded load against a live uvicorn server on loopback: 500 requests, 64 at a time, through two keys (one rate
limited). Every request is answered, 200 with its own tokens or an explicit 429/503 with Retry-After, and the audit
log has one line for each."""

import asyncio
import collections
import json
import time

import httpx
import pytest

from moe_lightning.inference import InferenceEngine
from moe_lightning.serving.app import create_app
from moe_lightning.serving.keys import ApiKeyRecord, RateLimit
from tests.unit.serving.conftest import ADMIN_KEY, API_KEY, alone, live_server, settings

pytestmark = pytest.mark.slow
NUM_REQUESTS, CONCURRENCY = 500, 64
LIMITED_KEY = "load-limited-key-0123456789"
PROMPTS = [[(7 * i + j) % 256 for j in range(1 + i % 6)] for i in range(8)]
NEW_TOKENS = 4


def request_of(index: int) -> tuple[str, str, dict]:
    """Request ``index``: its key, URL and body (native and OpenAI APIs, over PROMPTS)."""
    key = LIMITED_KEY if index % 3 == 0 else API_KEY
    prompt = PROMPTS[index % len(PROMPTS)]
    if index % 2:
        return key, "/v1/completions", {"model": "moe-lightning", "prompt": prompt, "max_tokens": NEW_TOKENS,
                                        "temperature": 0}
    return key, "/v1/generate", {"prompts": [prompt], "max_new_tokens": NEW_TOKENS}


def tokens_of(url: str, body: dict) -> list[int]:
    return body["choices"][0]["token_ids"] if url == "/v1/completions" else body["outputs"][0]["tokens"]


def test_every_request_of_a_bounded_load_is_answered_and_audited(model, tmp_path):
    audit = tmp_path / "audit.jsonl"
    limited = ApiKeyRecord.of_key(LIMITED_KEY, "limited", ["user"], RateLimit(requests_per_second=20, burst=20))
    app = create_app(InferenceEngine(model), settings(
        api_keys=(ADMIN_KEY, limited), max_queue_size=16, max_new_tokens=NEW_TOKENS, batch_window_ms=2,
        audit_log=str(audit)))
    expected = [alone(model, prompt, NEW_TOKENS) for prompt in PROMPTS]

    async def load(url: str) -> list[tuple[str, httpx.Response, float]]:
        gate = asyncio.Semaphore(CONCURRENCY)
        limits = httpx.Limits(max_connections=CONCURRENCY)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
            async def one(index: int) -> tuple[str, httpx.Response, float]:
                key, path, body = request_of(index)
                async with gate:
                    started = time.perf_counter()
                    response = await client.post(path, json=body, headers={"Authorization": f"Bearer {key}"})
                    return path, response, time.perf_counter() - started
            return await asyncio.gather(*(one(index) for index in range(NUM_REQUESTS)))

    with live_server(app) as url:
        started = time.perf_counter()
        results = asyncio.run(asyncio.wait_for(load(url), 300))  # an exception here is a request lost
        seconds = time.perf_counter() - started

    statuses = collections.Counter(response.status_code for _, response, _ in results)
    refusals = collections.Counter(response.json()["error"]["code"] for _, response, _ in results
                                   if response.status_code != 200)
    assert set(statuses) <= {200, 429, 503}, statuses
    assert statuses[200] > 0
    for index, (path, response, _) in enumerate(results):
        if response.status_code == 200:
            assert tokens_of(path, response.json()) == expected[index % len(PROMPTS)], index
        else:
            assert int(response.headers["Retry-After"]) >= 1, index
            assert response.json()["error"]["code"] in ("queue_full", "rate_limited", "unavailable", "timeout")
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    assert len(lines) == NUM_REQUESTS
    assert collections.Counter(line["status"] for line in lines) == statuses
    assert collections.Counter(line["key"] for line in lines) == {"limited": 167, "tester": 333}
    latencies = sorted(latency for _, response, latency in results if response.status_code == 200)
    print(f"\nload: {NUM_REQUESTS} requests, {CONCURRENCY} concurrent, in {seconds:.1f} s "
          f"({NUM_REQUESTS / seconds:.0f} requests/s); statuses {dict(statuses)}, refusals {dict(refusals)}; 200s' p50 "
          f"{latencies[len(latencies) // 2] * 1000:.0f} ms, p99 {latencies[int(len(latencies) * 0.99)] * 1000:.0f} ms")

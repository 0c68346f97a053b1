"""Micro-batching: concurrent requests share model calls yet each gets its own prompt's tokens; a full queue answers
429, shutdown and timeouts 503."""

import asyncio

import pytest

from moe_lightning.serving.app import create_app
from tests.unit.serving.conftest import alone, serving, settings

pytestmark = pytest.mark.anyio


async def test_concurrent_requests_are_batched_without_mixing_them_up(engine, model):
    app = create_app(engine, settings(batch_window_ms=300, max_batch_size=16))
    greedy = [([3 + i] * (1 + i % 5), 2 + i % 4) for i in range(8)]
    seeded = {"temperature": 0.8, "seed": 7}
    async with serving(app) as client:
        requests = [client.post("/v1/generate", json={"prompts": [prompt], "max_new_tokens": n})
                    for prompt, n in greedy]
        requests.append(client.post("/v1/generate", json={"prompts": [[5, 6]], "max_new_tokens": 6, **seeded}))
        responses = await asyncio.gather(*requests)
    for (prompt, n), response in zip(greedy, responses):
        assert response.json()["outputs"][0]["tokens"] == alone(model, prompt, n)
    assert responses[-1].json()["outputs"][0]["tokens"] == alone(model, [5, 6], 6, **seeded)
    registry = app.state.metrics.registry
    # The eight greedy requests share one model call; the seeded one runs alone, so it draws what it draws alone.
    assert registry.get_sample_value("moe_lightning_batch_size_count") == 2
    assert registry.get_sample_value("moe_lightning_batch_size_bucket", {"le": "1.0"}) == 1
    assert registry.get_sample_value("moe_lightning_batch_size_sum") == 9


async def until(condition, timeout_s=10.0):
    for _ in range(int(timeout_s / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never held")


async def test_a_full_queue_answers_429_and_shutdown_503(engine):
    app = create_app(engine, settings(max_queue_size=2, batch_window_ms=60_000))
    batcher = app.state.service.batcher
    body = {"prompts": ["a"], "max_new_tokens": 2}
    async with serving(app) as client:
        waiting = [asyncio.create_task(client.post("/v1/generate", json=body)) for _ in range(2)]
        await until(lambda: batcher.queue_depth == 2)
        assert (await client.get("/health")).json()["queue_depth"] == 2
        refused = await client.post("/v1/completions", json={"model": "moe-lightning", "prompt": "a"})
        assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
        assert refused.json()["error"]["type"] == "rate_limit_error"
        await batcher.close()  # what the lifespan's end does
        for response in await asyncio.gather(*waiting):
            assert response.status_code == 503 and "shutting down" in response.json()["error"]["message"]
        assert (await client.get("/health")).status_code == 503
        assert (await client.post("/v1/generate", json=body)).status_code == 503


async def test_a_request_past_its_timeout_gets_503(engine):
    app = create_app(engine, settings(request_timeout_s=0.05, batch_window_ms=1000))
    async with serving(app) as client:
        response = await client.post("/v1/generate", json={"prompts": ["a"], "max_new_tokens": 2})
        assert response.status_code == 503 and response.json()["error"]["code"] == "timeout"
        streamed = await client.post("/v1/generate/stream", json={"prompts": ["a"], "max_new_tokens": 2})
        assert streamed.status_code == 200 and '"code": "timeout"' in streamed.text


async def test_a_consumer_that_leaves_early_cancels_its_request(engine):
    app = create_app(engine, settings())
    service = app.state.service
    async with serving(app):
        stream = service.start([[1, 2]], 20, service.sampling(0.0, None, None))
        events = stream.events()
        assert (await anext(events)).token is not None
        await events.aclose()
        assert stream.job.cancelled


async def test_a_failing_model_is_logged_and_answered_500_even_mid_stream(engine, monkeypatch, caplog):
    def broken(*args, **kwargs):
        yield [1]
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr("moe_lightning.serving.batching.stream_generate", broken)
    async with serving(create_app(engine, settings())) as client:
        whole = await client.post("/v1/generate", json={"prompts": ["a"], "max_new_tokens": 3})
        streamed = await client.post("/v1/generate/stream", json={"prompts": ["a"], "max_new_tokens": 3})
        assert (await client.get("/health")).json()["status"] == "ok"  # the worker lives on
    assert whole.status_code == 500 and whole.json()["error"]["message"] == (
        "the model failed: RuntimeError (logged on the server)")
    assert streamed.status_code == 200 and '"status": 500' in streamed.text.split("event: error")[1]
    assert "CUDA out of memory" in caplog.text


async def test_near_zero_temperatures_decode_greedily(engine, model):
    async with serving(create_app(engine, settings())) as client:
        response = await client.post("/v1/generate", json={"prompts": [[4, 5]], "max_new_tokens": 5,
                                                           "temperature": 1e-9, "seed": 1})
    assert response.json()["outputs"][0]["tokens"] == alone(model, [4, 5], 5)

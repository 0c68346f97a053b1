"""The SDK client and a bounded concurrent load against a live server on loopback."""

import asyncio
import random

import httpx
import pytest

from moe_lightning.serving.client import MoELightningClient, MoELightningError
from moe_lightning.serving.schemas import DoneEvent, EndEvent, TokenEvent
from tests.unit.serving.conftest import API_KEY, AUTH, alone

pytestmark = pytest.mark.slow


def test_client_generates_streams_and_reports_errors(live_url, model):
    with MoELightningClient(live_url, API_KEY) as client:
        assert client.health()["status"] == "ok"
        response = client.generate(["Hi", [9, 10]], max_new_tokens=6)
        assert [out.tokens for out in response.outputs] == [alone(model, list(b"Hi"), 6), alone(model, [9, 10], 6)]
        assert client.generate("Hi", max_new_tokens=6).outputs[0].tokens == response.outputs[0].tokens

        messages = list(client.stream([9, 10], max_new_tokens=6, temperature=0.5, seed=3))
        assert isinstance(messages[-1], DoneEvent) and isinstance(messages[-2], EndEvent)
        tokens = [m.token for m in messages if isinstance(m, TokenEvent)]
        assert tokens == messages[-1].outputs[0].tokens == alone(model, [9, 10], 6, temperature=0.5, seed=3)

        with pytest.raises(MoELightningError) as error:
            client.generate("Hi", max_new_tokens=33)
        assert error.value.status_code == 422 and error.value.param == "max_new_tokens"
    with MoELightningClient(live_url, "wrong") as intruder, pytest.raises(MoELightningError) as error:
        list(intruder.stream("Hi"))
    assert error.value.status_code == 401


def test_bounded_concurrent_load_answers_every_request_with_its_own_tokens(live_url, model):
    rng = random.Random(0)
    requests = []
    for i in range(64):
        prompt = [rng.randrange(256) for _ in range(rng.randint(1, 12))]
        sampling = {"temperature": 0.8, "seed": i} if i % 4 == 0 else {}
        requests.append((prompt, rng.randint(1, 8), sampling))
    expected = [alone(model, prompt, n, **sampling) for prompt, n, sampling in requests]

    async def run_all() -> list[httpx.Response]:
        gate = asyncio.Semaphore(16)
        async with httpx.AsyncClient(base_url=live_url, headers=AUTH, timeout=120) as client:
            async def one(prompt, n, sampling):
                async with gate:
                    return await client.post("/v1/generate", json={"prompts": [prompt], "max_new_tokens": n,
                                                                   **sampling})
            return await asyncio.gather(*(one(*request) for request in requests))

    batches_before = model_calls(live_url)
    responses = asyncio.run(run_all())
    assert [r.status_code for r in responses] == [200] * 64
    assert [r.json()["outputs"][0]["tokens"] for r in responses] == expected
    assert model_calls(live_url) - batches_before < 64  # some requests shared a model call


def model_calls(live_url: str) -> float:
    metrics = httpx.get(f"{live_url}/metrics", headers=AUTH).text
    return next(float(line.split()[-1]) for line in metrics.splitlines()
                if line.startswith("moe_lightning_batch_size_count"))

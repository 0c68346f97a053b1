"""A non-streamed request whose client leaves is cancelled: out of the queue at once, or stopped mid-generation."""

import asyncio
import inspect
import json
import threading
import time

import httpx
import pytest

from moe_lightning.inference import InferenceEngine
from moe_lightning.inference.decoding import EagerDecoder
from moe_lightning.serving.app import create_app
from tests.unit.serving.conftest import AUTH, live_server, settings

pytestmark = pytest.mark.slow
WAIT_S = 30
"""The longest the test waits for the server to get somewhere."""
GATE_S = 4 * WAIT_S
"""The longest a gated step waits: longer than any wait of the test, so a step never ends early by itself."""


class GatedDecoder:
    """The eager decoder whose steps (not prefills) wait for ``gate``: the test decides when the model moves on."""

    def __init__(self, model) -> None:
        self.model, self.gate, self.steps, self.sessions = model, threading.Event(), 0, 0
        self._eager = EagerDecoder(model)

    def start(self, batch_size, max_len):
        self.sessions += 1
        return GatedSession(self, self._eager.start(batch_size, max_len))


class GatedSession:
    def __init__(self, decoder: GatedDecoder, session) -> None:
        self.decoder, self.session = decoder, session

    def prefill(self, ids_BP, mask_BP):
        return self.session.prefill(ids_BP, mask_BP)

    def step(self, token_B, real_B):
        if not self.decoder.gate.wait(GATE_S):
            raise TimeoutError("the test never opened the gate")
        self.decoder.steps += 1
        return self.session.step(token_B, real_B)


async def until(condition, what: str) -> None:
    """Wait (boundedly) until ``condition()`` (a bool, or an awaitable of one) holds."""
    deadline = time.monotonic() + WAIT_S
    while not await _value(condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {WAIT_S} s for {what}")
        await asyncio.sleep(0.02)


def test_a_client_that_leaves_frees_its_queue_slot_and_stops_its_generation(model, tmp_path):
    decoder = GatedDecoder(model)
    audit = tmp_path / "audit.jsonl"
    app = create_app(InferenceEngine(model), settings(max_new_tokens=50, batch_window_ms=0, audit_log=str(audit)),
                     decoder=decoder)
    long_request = {"prompts": [[1, 2, 3]], "max_new_tokens": 50}

    async def scenario(url: str) -> None:
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=WAIT_S) as observer:
            async def queue_depth_is(expected: int) -> bool:
                return (await observer.get("/health")).json()["queue_depth"] == expected

            running_client = httpx.AsyncClient(base_url=url, headers=AUTH, timeout=WAIT_S)
            waiting_client = httpx.AsyncClient(base_url=url, headers=AUTH, timeout=WAIT_S)
            running = asyncio.create_task(running_client.post("/v1/generate", json=long_request))
            await until(lambda: decoder.sessions == 1, "the first request to reach the model")
            # The model is busy with the first request, so the second waits in the queue.
            waiting = asyncio.create_task(waiting_client.post("/v1/completions", json={
                "model": "moe-lightning", "prompt": [4, 5], "max_tokens": 50}))
            await until(lambda: queue_depth_is(1), "the second request to be queued")
            waiting.cancel()
            await waiting_client.aclose()  # the client leaves
            await until(lambda: queue_depth_is(0), "the left request to leave the queue")
            running.cancel()
            await running_client.aclose()
            await until(lambda: audit.read_text().count('"status": 499') == 2, "both requests to be answered 499")
            decoder.gate.set()
            steps_before = decoder.steps
            after = await observer.post("/v1/generate", json={"prompts": [[1, 2, 3]], "max_new_tokens": 3})
            assert after.status_code == 200 and len(after.json()["outputs"][0]["tokens"]) == 3
            # The first request's generation stopped after the step it was in, not at 50 tokens.
            assert steps_before <= 1 and decoder.sessions == 2

    with live_server(app) as url:
        try:
            asyncio.run(scenario(url))
        finally:  # a failed scenario must not leave the model waiting at the gate
            decoder.gate.set()
    lines = [json.loads(line) for line in audit.read_text().splitlines() if '"/health"' not in line]
    assert [(line["route"], line["status"]) for line in lines] == [
        ("/v1/completions", 499), ("/v1/generate", 499), ("/v1/generate", 200)]


async def _value(result):
    return await result if inspect.isawaitable(result) else result

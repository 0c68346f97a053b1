"""The native API against generate(): the same tokens whole, over SSE and over the WebSocket; limits and bad input
answered 4xx naming the field."""

import asyncio
import json

import pytest
from fastapi.testclient import TestClient

from moe_lightning.inference import InferenceEngine, generate
from moe_lightning.serving.app import create_app
from moe_lightning.serving.tokenizer import ByteTokenizer
from tests.unit.serving.conftest import AUTH, alone, serving, settings, tiny_model

pytestmark = pytest.mark.anyio
PROMPTS = ["Hello", [7, 8, 9, 10, 11, 12], "€uro"]


def prompt_ids(prompt):
    return list(prompt.encode()) if isinstance(prompt, str) else prompt


async def test_greedy_generation_equals_generate_per_prompt(engine, model):
    async with serving(create_app(engine, settings())) as client:
        response = await client.post("/v1/generate", json={"prompts": PROMPTS, "max_new_tokens": 6})
    assert response.status_code == 200
    body = response.json()
    for prompt, out in zip(PROMPTS, body["outputs"]):
        assert out["tokens"] == alone(model, prompt_ids(prompt), 6)
        assert out["text"] == ByteTokenizer().decode(out["tokens"]) and out["finish_reason"] == "length"
    prompt_tokens = sum(len(prompt_ids(p)) for p in PROMPTS)
    assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 18,
                             "total_tokens": prompt_tokens + 18}


async def test_seeded_sampling_equals_generate_with_the_seed(engine, model):
    sampling = {"temperature": 0.9, "top_k": 50, "top_p": 0.95, "seed": 1234}
    async with serving(create_app(engine, settings())) as client:
        response = await client.post("/v1/generate", json={"prompts": PROMPTS, "max_new_tokens": 8, **sampling})
    expected = generate(model, [prompt_ids(p) for p in PROMPTS], 8, **sampling)
    assert [out["tokens"] for out in response.json()["outputs"]] == expected


async def test_a_stop_token_ends_its_prompt(engine, model):
    first = alone(model, list(b"Hello"), 4)
    async with serving(create_app(engine, settings())) as client:
        body = (await client.post("/v1/generate", json={"prompts": ["Hello"], "max_new_tokens": 4,
                                                         "stop_tokens": [first[1]]})).json()
    assert body["outputs"][0]["tokens"] == first[:first.index(first[1]) + 1]
    assert body["outputs"][0]["finish_reason"] == "stop"


def parse_sse(text):
    events = []
    for block in text.replace("\r\n", "\n").strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.split("\n") if not line.startswith(":"))
        events.append((fields["event"], json.loads(fields["data"])))
    return events


async def test_sse_streams_the_tokens_of_generate(engine, model):
    async with serving(create_app(engine, settings())) as client:
        response = await client.post("/v1/generate/stream", json={"prompts": PROMPTS, "max_new_tokens": 5})
    assert response.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(response.text)
    assert [name for name, _ in events][-1] == "done"
    for index, prompt in enumerate(PROMPTS):
        tokens = [data["token"] for name, data in events if name == "token" and data["index"] == index]
        assert tokens == alone(model, prompt_ids(prompt), 5)
        text = "".join(data["text"] for name, data in events if name in ("token", "end") and data["index"] == index)
        assert text == events[-1][1]["outputs"][index]["text"]


def test_websocket_streams_the_tokens_of_generate_request_after_request(engine, model):
    with TestClient(create_app(engine, settings())) as client, \
            client.websocket_connect("/v1/generate/ws", headers=AUTH) as ws:
        for prompts in (PROMPTS, ["again"]):
            ws.send_json({"prompts": prompts, "max_new_tokens": 5})
            messages = []
            while not messages or messages[-1]["type"] != "done":
                messages.append(ws.receive_json())
            for index, prompt in enumerate(prompts):
                tokens = [m["token"] for m in messages if m["type"] == "token" and m["index"] == index]
                assert tokens == alone(model, prompt_ids(prompt), 5)
            assert [m["finish_reason"] for m in messages if m["type"] == "end"] == ["length"] * len(prompts)
        ws.send_text("{not json")
        assert ws.receive_json()["status"] == 400
        ws.send_json({"prompts": ["a"], "max_new_tokens": 0})
        error = ws.receive_json()
        assert error["status"] == 422 and error["error"]["param"] == "max_new_tokens"


@pytest.mark.parametrize(
    ("body", "status", "param", "message"),
    [
        ({"prompts": ["x" * 41]}, 413, "prompts[0]", "prompts[0] has 41 tokens > max_prompt_tokens=40"),
        ({"prompts": ["a"] * 5}, 413, "prompts", "prompts holds 5 prompts > max_prompts_per_request=4"),
        ({"prompts": ["a"], "max_new_tokens": 31}, 422, "max_new_tokens", "max_new_tokens=31 > this server's max_new_"),
        ({"prompts": ["a"], "max_new_tokens": 0}, 422, "max_new_tokens", "greater than or equal to 1 (got 0)"),
        ({"prompts": ["x" * 40], "max_new_tokens": 25}, 400, "max_new_tokens", "the model's context of max_seq_len=64"),
        ({"prompts": []}, 422, "prompts", "at least 1 item"),
        ({"prompts": [""]}, 422, "prompts", "prompts.0.constrained-str: String should have at least 1 character"),
        ({"prompts": [[1, 256]]}, 422, "prompts[0]", "token ids outside [0, vocab_size=256): [256]"),
        ({"prompts": [[1, True]]}, 422, "prompts", "prompts.0.list[int].1: Input should be a valid integer"),
        ('{"prompts": ["a\\ud800"]}', 422, "prompts", "unable to parse raw data as a unicode string"),
        ({"prompts": ["a"], "temperature": -1}, 422, "temperature", "greater than or equal to 0"),
        ({"prompts": ["a"], "top_p": 0}, 422, "top_p", "greater than or equal to 0.000001"),
        ({"prompts": ["a"], "seed": -1}, 422, "seed", "greater than or equal to 0"),
        ({"prompts": ["a"], "stop_tokens": [999]}, 422, "stop_tokens", "outside [0, vocab_size=256): [999]"),
        ({"prompts": ["a"], "max_tokens": 3}, 422, "max_tokens", "Extra inputs are not permitted"),
        ({"max_new_tokens": 3}, 422, "prompts", "Field required"),
    ],
)
async def test_bad_requests_get_4xx_naming_the_field(engine, body, status, param, message):
    app = create_app(engine, settings(max_prompt_tokens=40, max_new_tokens=30, max_prompts_per_request=4))
    async with serving(app) as client:
        if isinstance(body, str):  # JSON that Python's own strings can't carry
            response = await client.post("/v1/generate", content=body, headers={"content-type": "application/json"})
        else:
            response = await client.post("/v1/generate", json=body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param and message in response.json()["error"]["message"]


async def test_malformed_bodies_get_400_or_413(engine):
    async with serving(create_app(engine, settings(max_body_bytes=1000))) as client:
        for content in (b"{", b'{"prompts": ["a"], "temperature": NaN}', b"[1, 2"):
            response = await client.post("/v1/generate", content=content, headers={"content-type": "application/json"})
            assert response.status_code in (400, 422) and "error" in response.json(), content
        response = await client.post("/v1/generate", json={"prompts": ["x" * 2000]})
        assert response.status_code == 413


async def test_text_prompts_need_a_tokenizer(engine):
    small_vocab = InferenceEngine(tiny_model(vocab_size=64))
    async with serving(create_app(small_vocab, settings())) as client:
        text = await client.post("/v1/generate", json={"prompts": ["hi"]})
        ids = await client.post("/v1/generate", json={"prompts": [[1, 2]], "max_new_tokens": 2})
    assert text.status_code == 400
    assert "this model has none (vocab_size=64 < 256 bytes)" in text.json()["error"]["message"]
    assert ids.status_code == 200 and ids.json()["outputs"][0]["text"] is None


async def test_health_and_metrics(engine):
    hit_rate = [None]
    app = create_app(engine, settings(), expert_cache_hit_rate=lambda: hit_rate[0])
    async with serving(app) as client:
        assert (await client.get("/health")).json() == {
            "status": "ok", "model_loaded": True, "model": "moe-lightning", "queue_depth": 0}
        await client.post("/v1/generate", json={"prompts": ["a", "b"], "max_new_tokens": 3})
        await client.post("/v1/generate", json={"prompts": ["a"], "max_new_tokens": 0})
        # A batch is recorded when its model call returns, a moment after its last request was answered.
        for _ in range(200):
            first = (await client.get("/metrics")).text
            if "moe_lightning_batch_size_count 1.0" in first:
                break
            await asyncio.sleep(0.01)
        hit_rate[0] = 0.75
        second = (await client.get("/metrics")).text
    assert 'moe_lightning_requests_total{endpoint="/v1/generate",status="200"} 1.0' in first
    assert 'moe_lightning_requests_total{endpoint="/v1/generate",status="422"} 1.0' in first
    assert 'moe_lightning_request_duration_seconds_count{endpoint="/v1/generate"} 2.0' in first
    assert "moe_lightning_generated_tokens_total 6.0" in first and "moe_lightning_batch_size_sum 2.0" in first
    assert "moe_lightning_queue_depth 0.0" in first and "moe_lightning_tokens_per_second " in first
    assert "moe_lightning_expert_cache_hit_rate NaN" in first and "moe_lightning_expert_cache_hit_rate 0.75" in second

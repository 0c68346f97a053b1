"""A table of bad requests, each answered 4xx in the server's JSON error shape (never 5xx, never plain text)."""

import pytest

from moe_lightning.serving.app import create_app
from tests.unit.serving.conftest import serving, settings

pytestmark = pytest.mark.anyio
MIB = 1 << 20
JSON = {"content-type": "application/json"}
COMPLETION = {"model": "moe-lightning", "prompt": "hi"}

# (name, url, body: dict for JSON, bytes sent as they are, status, error code)
CASES = [
    ("negative max_new_tokens", "/v1/generate", {"prompts": ["a"], "max_new_tokens": -1}, 422, "invalid_value"),
    ("huge max_new_tokens", "/v1/generate", {"prompts": ["a"], "max_new_tokens": 10**30}, 422, "invalid_value"),
    ("negative max_tokens", "/v1/completions", {**COMPLETION, "max_tokens": -5}, 422, "invalid_value"),
    ("huge max_tokens", "/v1/completions", {**COMPLETION, "max_tokens": 2**63}, 422, "invalid_value"),
    ("NaN temperature", "/v1/generate", b'{"prompts": ["a"], "temperature": NaN}', 422, "invalid_value"),
    ("Infinity temperature", "/v1/completions", b'{"model": "moe-lightning", "prompt": "a", "temperature": Infinity}',
     422, "invalid_value"),
    ("top_p above 1", "/v1/generate", {"prompts": ["a"], "temperature": 1, "top_p": 1.5}, 422, "invalid_value"),
    ("top_p above 1 (OpenAI)", "/v1/completions", {**COMPLETION, "top_p": 1.01}, 422, "invalid_value"),
    ("1 MB prompt", "/v1/generate", {"prompts": ["x" * 1_000_000]}, 413, "prompt_too_long"),
    ("1 MB prompt (OpenAI)", "/v1/completions", {**COMPLETION, "prompt": "x" * 1_000_000}, 413, "prompt_too_long"),
    ("1 MiB prompt: body over max_body_bytes", "/v1/generate", {"prompts": ["x" * MIB]}, 413, "body_too_large"),
    ("invalid UTF-8", "/v1/generate", b'{"prompts": ["\xff\xfe\xc3"]}', 400, "invalid_json"),
    ("lone surrogate", "/v1/completions", b'{"model": "moe-lightning", "prompt": "\\udc80"}', 422, "invalid_value"),
    ("not JSON", "/v1/generate", b"prompts=hi", 400, "invalid_json"),
    ("truncated JSON", "/v1/completions", b'{"model": "moe-lightning", "prompt": ', 400, "invalid_json"),
    ("prompts a string", "/v1/generate", {"prompts": "hi"}, 422, "invalid_value"),
    ("max_new_tokens a string", "/v1/generate", {"prompts": ["a"], "max_new_tokens": "5"}, 422, "invalid_value"),
    ("temperature a string", "/v1/completions", {**COMPLETION, "temperature": "hot"}, 422, "invalid_value"),
    ("a prompt an object", "/v1/generate", {"prompts": [{"text": "a"}]}, 422, "invalid_value"),
    ("the body a list", "/v1/generate", b'[{"prompts": ["a"]}]', 422, "invalid_value"),
    ("missing prompts", "/v1/generate", {"max_new_tokens": 3}, 422, "invalid_value"),
    ("missing model", "/v1/completions", {"prompt": "hi"}, 422, "invalid_value"),
    ("empty body", "/v1/completions", b"", 422, "invalid_value"),
]


@pytest.mark.parametrize(("url", "body", "status", "code"), [case[1:] for case in CASES],
                         ids=[case[0] for case in CASES])
async def test_bad_input_gets_4xx_in_the_error_shape(engine, url, body, status, code):
    async with serving(create_app(engine, settings())) as client:
        if isinstance(body, bytes):
            response = await client.post(url, content=body, headers=JSON)
        else:
            response = await client.post(url, json=body)
    assert response.status_code == status, response.text[:300]
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code
    assert error["type"] == "invalid_request_error" and error["message"]


async def test_a_chunked_body_over_the_limit_gets_413_in_the_error_shape(engine):
    async def chunks():  # no Content-Length: the limit is found while the body arrives
        yield b'{"prompts": ["'
        for _ in range(8):
            yield b"x" * 1000
        yield b'"]}'

    async with serving(create_app(engine, settings(max_body_bytes=4000))) as client:
        response = await client.post("/v1/generate", content=chunks(), headers=JSON)
    assert response.status_code == 413
    assert response.json()["error"]["message"] == ("the request body (more than 4000 bytes) is larger than "
                                                   "max_body_bytes=4000")


async def test_a_declared_length_over_the_limit_is_refused_naming_both(engine):
    async with serving(create_app(engine, settings(max_body_bytes=4000))) as client:
        response = await client.post("/v1/generate", content=b'{"prompts": ["' + b"x" * 5000 + b'"]}', headers=JSON)
    assert response.status_code == 413
    assert response.json()["error"]["message"] == ("the request body (Content-Length: 5017) is larger than "
                                                   "max_body_bytes=4000")

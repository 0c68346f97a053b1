"""API keys: where they come from, refusing to start without one, and who gets in."""

import pytest
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from moe_lightning.serving.app import create_app
from moe_lightning.serving.settings import ServerSettings, load_api_keys
from tests.unit.serving.conftest import API_KEY, AUTH, serving, settings

pytestmark = pytest.mark.anyio
GENERATE = {"prompts": ["hi"], "max_new_tokens": 2}
PROTECTED = [
    ("POST", "/v1/generate", GENERATE), ("POST", "/v1/generate/stream", GENERATE),
    ("POST", "/v1/completions", {"model": "moe-lightning", "prompt": "hi"}), ("GET", "/v1/models", None),
    ("GET", "/metrics", None), ("GET", "/openapi.json", None),
]


def test_no_key_refuses_to_start_and_says_how_to_fix_it():
    with pytest.raises(ValueError, match=r"no API key configured: set MOE_LIGHTNING_API_KEYS=.*--insecure-no-auth"):
        ServerSettings()
    assert ServerSettings(insecure_no_auth=True).api_keys == ()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"api_keys": ("k",), "insecure_no_auth": True}, "contradicts the 1 configured API key"),
        ({"api_keys": ("k", " padded")}, r"API keys \[1\] \(0-based\) are empty or hold whitespace"),
        ({"api_keys": ("k",), "max_new_tokens": 0}, "max_new_tokens must be >= 1, got max_new_tokens=0"),
        ({"api_keys": ("k",), "max_prompts_per_request": 9, "max_batch_size": 8}, "max_prompts_per_request=9 > max_b"),
        ({"api_keys": ("k",), "request_timeout_s": 0}, "request_timeout_s must be > 0"),
    ],
)
def test_bad_settings_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ServerSettings(**kwargs)


def test_keys_come_from_the_environment_and_a_file(tmp_path):
    key_file = tmp_path / "keys"
    key_file.write_text("# ops keys\nfile-key\n\nenv-key\n")
    environ = {"MOE_LIGHTNING_API_KEYS": "env-key, other ,"}
    assert load_api_keys(key_file, environ) == ("env-key", "other", "file-key")
    assert load_api_keys(None, {}) == ()
    with pytest.raises(ValueError, match="missing does not exist"):
        load_api_keys(tmp_path / "missing", {})


@pytest.mark.parametrize(
    ("headers", "message"),
    [({}, "missing API key"), ({"Authorization": "Bearer wrong"}, "invalid API key"),
     ({"Authorization": f"Basic {API_KEY}"}, "missing API key")],
)
async def test_every_endpoint_but_health_needs_the_key(engine, headers, message):
    async with serving(create_app(engine, settings()), headers=headers) as client:
        assert (await client.get("/health")).json()["status"] == "ok"
        for method, url, body in PROTECTED:
            response = await client.request(method, url, json=body)
            assert response.status_code == 401, url
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
            assert response.json()["error"]["message"].startswith(message)
            assert response.json()["error"]["type"] == "authentication_error"


async def test_the_right_key_gets_in_and_insecure_mode_needs_none(engine):
    async with serving(create_app(engine, settings(api_keys=("other", API_KEY)))) as client:
        assert (await client.post("/v1/generate", json=GENERATE)).status_code == 200
    async with serving(create_app(engine, ServerSettings(insecure_no_auth=True)), headers={}) as client:
        assert (await client.post("/v1/generate", json=GENERATE)).status_code == 200


def test_websocket_takes_the_key_in_the_header_or_the_first_message(engine):
    with TestClient(create_app(engine, settings())) as client:
        with client.websocket_connect("/v1/generate/ws", headers=AUTH) as ws:
            ws.send_json(GENERATE)
            assert ws.receive_json()["type"] == "token"
        with client.websocket_connect("/v1/generate/ws") as ws:
            ws.send_json({"type": "auth", "api_key": API_KEY})
            assert ws.receive_json() == {"type": "authenticated"}
        for first in [{"type": "auth", "api_key": "wrong"}, GENERATE]:
            with client.websocket_connect("/v1/generate/ws") as ws:
                ws.send_json(first)
                refusal = ws.receive_json()
                assert refusal["type"] == "error" and refusal["status"] == 401
                with pytest.raises(WebSocketDisconnect) as closed:
                    ws.receive_json()
                assert closed.value.code == 1008
        with client.websocket_connect("/v1/generate/ws", headers={"Authorization": "Bearer wrong"}) as ws:
            assert ws.receive_json()["error"]["message"] == "invalid API key in the Authorization header"

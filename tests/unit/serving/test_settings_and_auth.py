"""API keys: refusing to start without one, who gets in, and which role may call what."""

import pytest
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from moe_lightning.serving.app import create_app
from moe_lightning.serving.keys import ApiKeyRecord
from moe_lightning.serving.settings import ServerSettings
from tests.unit.serving.conftest import ADMIN_KEY, API_KEY, AUTH, serving, settings

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
        ({"api_keys": (ADMIN_KEY,), "insecure_no_auth": True}, "contradicts the 1 configured API key"),
        ({"api_keys": (ADMIN_KEY, ADMIN_KEY.model_copy(update={"sha256": "0" * 64}))},
         r"each API key needs its own name, got \['tester', 'tester'\]"),
        ({"api_keys": (ADMIN_KEY,), "audit_prompts": True}, "audit_prompts=True needs an audit_log"),
        ({"api_keys": (ADMIN_KEY,), "max_new_tokens": 0}, "max_new_tokens must be >= 1, got max_new_tokens=0"),
        ({"api_keys": (ADMIN_KEY,), "max_prompts_per_request": 9, "max_batch_size": 8},
         "max_prompts_per_request=9 > max_b"),
        ({"api_keys": (ADMIN_KEY,), "request_timeout_s": 0}, "request_timeout_s must be > 0"),
    ],
)
def test_bad_settings_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ServerSettings(**kwargs)


def test_plain_keys_are_refused_with_how_to_hash_them():
    with pytest.raises(TypeError, match=r"api_keys must be ApiKeyRecords \(ApiKeyRecord.of_key hashes .*\['str'\]"):
        ServerSettings(api_keys=("plain-key",))


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
    other = ApiKeyRecord.of_key("another-key-0123456789", "other", ["user"])
    async with serving(create_app(engine, settings(api_keys=(other, ADMIN_KEY)))) as client:
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
            assert ws.receive_json()["error"]["message"].startswith("invalid API key")


ROLE_KEYS = {role: (f"{role}-key-0123456789", ApiKeyRecord.of_key(f"{role}-key-0123456789", f"{role}-holder", [role]))
             for role in ("admin", "user", "metrics")}
# Who may call what: written out here rather than derived from moe_lightning.serving.roles.
ALLOWED = {
    "/v1/generate": {"admin", "user"}, "/v1/generate/stream": {"admin", "user"}, "/v1/completions": {"admin", "user"},
    "/v1/models": {"admin", "user"}, "/metrics": {"admin", "metrics"}, "/openapi.json": {"admin", "user", "metrics"},
}


@pytest.mark.parametrize("role", sorted(ROLE_KEYS))
async def test_each_role_reaches_its_routes_and_gets_403_elsewhere(engine, role):
    key, _ = ROLE_KEYS[role]
    app = create_app(engine, settings(api_keys=tuple(record for _, record in ROLE_KEYS.values())))
    async with serving(app, headers={"Authorization": f"Bearer {key}"}) as client:
        for method, url, body in PROTECTED:
            response = await client.request(method, url, json=body)
            if role in ALLOWED[url]:
                assert response.status_code == 200, (url, response.text)
            else:
                assert response.status_code == 403, url
                error = response.json()["error"]
                assert error["type"] == "permission_error" and error["code"] == "forbidden"
                assert f"the key '{role}-holder' has roles ['{role}']; this needs one of" in error["message"]


def test_websocket_needs_a_generation_role(engine):
    key, record = ROLE_KEYS["metrics"]
    with TestClient(create_app(engine, settings(api_keys=(record,)))) as client, \
            client.websocket_connect("/v1/generate/ws", headers={"Authorization": f"Bearer {key}"}) as ws:
        refusal = ws.receive_json()
        assert refusal["status"] == 403 and "this needs one of ['admin', 'user']" in refusal["error"]["message"]
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
        assert closed.value.code == 1008

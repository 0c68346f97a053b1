"""Per-key token buckets (429 with Retry-After) and the audit log's one JSON line per request."""

import json

import pytest

from moe_lightning.serving.app import create_app
from moe_lightning.serving.auth import Principal
from moe_lightning.serving.errors import ApiError
from moe_lightning.serving.keys import ApiKeyRecord, RateLimit
from moe_lightning.serving.rate_limit import RateLimiter
from moe_lightning.serving.roles import Role
from tests.unit.serving.conftest import ADMIN_KEY, API_KEY, serving, settings

GENERATE = {"prompts": ["hi"], "max_new_tokens": 2}
LIMITED_KEY = "limited-key-0123456789"


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def principal(name: str, per_second: float, burst: int) -> Principal:
    return Principal(name, frozenset({Role.USER}), RateLimit(requests_per_second=per_second, burst=burst))


def test_a_bucket_allows_its_burst_then_refills_at_its_rate():
    clock = FakeClock()
    limiter, alice = RateLimiter(clock), principal("alice", per_second=0.5, burst=3)
    for _ in range(3):
        limiter.acquire(alice)
    with pytest.raises(ApiError) as refused:
        limiter.acquire(alice)
    # Empty bucket at 0.5 tokens/s: the next token is 2 s away.
    assert refused.value.status_code == 429 and refused.value.headers == {"Retry-After": "2"}
    assert "'alice' is over its rate limit of 0.5 requests/s (burst 3): retry in 2.00 s" in refused.value.detail
    clock.now += 1.5  # 0.75 of a token
    with pytest.raises(ApiError) as refused:
        limiter.acquire(alice)
    assert refused.value.headers == {"Retry-After": "1"}  # 0.5 s, rounded up to whole seconds
    clock.now += 0.5
    limiter.acquire(alice)
    clock.now += 3600  # an idle hour refills to the burst, not beyond
    for _ in range(3):
        limiter.acquire(alice)
    with pytest.raises(ApiError):
        limiter.acquire(alice)


def test_buckets_are_per_key_and_unlimited_keys_have_none():
    limiter = RateLimiter(FakeClock())
    alice, bob = principal("alice", 1, 1), principal("bob", 1, 1)
    limiter.acquire(alice)
    limiter.acquire(bob)
    with pytest.raises(ApiError):
        limiter.acquire(alice)
    unlimited = Principal("ops", frozenset({Role.ADMIN}))
    for _ in range(1000):
        limiter.acquire(unlimited)


def audited_settings(tmp_path, **overrides):
    limited = ApiKeyRecord.of_key(LIMITED_KEY, "limited", ["user"], RateLimit(requests_per_second=0.001, burst=2))
    return settings(api_keys=(ADMIN_KEY, limited), audit_log=str(tmp_path / "audit.jsonl"), **overrides)


def audit_lines(tmp_path):
    return [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]


@pytest.mark.anyio
async def test_a_key_over_its_limit_gets_429_in_the_error_shape_and_others_go_on(engine, tmp_path):
    async with serving(create_app(engine, audited_settings(tmp_path)),
                       headers={"Authorization": f"Bearer {LIMITED_KEY}"}) as client:
        statuses = [(await client.post("/v1/generate", json=GENERATE)).status_code for _ in range(2)]
        refused = await client.post("/v1/generate", json=GENERATE)
        admin = await client.post("/v1/generate", json=GENERATE, headers={"Authorization": f"Bearer {API_KEY}"})
    assert statuses == [200, 200] and admin.status_code == 200
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
    assert refused.json()["error"]["type"] == "rate_limit_error" and refused.json()["error"]["code"] == "rate_limited"


@pytest.mark.anyio
async def test_the_audit_log_has_one_line_per_request_naming_the_key_never_the_key_itself(engine, tmp_path):
    async with serving(create_app(engine, audited_settings(tmp_path)), headers={}) as client:
        admin, limited = {"Authorization": f"Bearer {API_KEY}"}, {"Authorization": f"Bearer {LIMITED_KEY}"}
        await client.post("/v1/generate", json=GENERATE, headers=admin)
        await client.get("/metrics", headers=limited)
        await client.post("/v1/generate", json=GENERATE, headers={"Authorization": "Bearer not-a-key"})
        await client.post("/v1/completions", json={"model": "moe-lightning", "prompt": "secret", "max_tokens": 1},
                          headers=limited)
        await client.get("/health")
        await client.get("/no/such/path", headers=admin)
    lines = audit_lines(tmp_path)
    assert [(line["key"], line["method"], line["route"], line["status"]) for line in lines] == [
        ("tester", "POST", "/v1/generate", 200), ("limited", "GET", "/metrics", 403),
        (None, "POST", "/v1/generate", 401), ("limited", "POST", "/v1/completions", 200),
        (None, "GET", "/health", 200), (None, "GET", "unmatched", 404),
    ]
    assert lines[-1]["path"] == "/no/such/path"
    assert all(line["latency_ms"] >= 0 and line["time"].endswith("+00:00") for line in lines)
    text = (tmp_path / "audit.jsonl").read_text()
    assert API_KEY not in text and LIMITED_KEY not in text and "not-a-key" not in text
    assert "secret" not in text and all("prompts" not in line for line in lines)


@pytest.mark.anyio
async def test_prompts_reach_the_audit_log_only_when_asked_for(engine, tmp_path):
    async with serving(create_app(engine, audited_settings(tmp_path, audit_prompts=True))) as client:
        await client.post("/v1/generate", json={"prompts": ["h\u00e9llo", [1, 2]], "max_new_tokens": 1})
        await client.post("/v1/completions", json={"model": "moe-lightning", "prompt": "secret", "max_tokens": 1})
    assert [line["prompts"] for line in audit_lines(tmp_path)] == [["h\u00e9llo", [1, 2]], "secret"]


def test_an_audit_log_in_a_missing_directory_is_refused_at_start(engine, tmp_path):
    with pytest.raises(ValueError, match=f"audit log {tmp_path}/nope/audit.jsonl: the directory .* does not exist"):
        create_app(engine, settings(audit_log=str(tmp_path / "nope" / "audit.jsonl")))

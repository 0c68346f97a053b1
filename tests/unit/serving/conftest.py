"""A tiny byte-level model, apps serving it, in-process clients and a live uvicorn server on loopback."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn, sse-starlette, prometheus-client) is missing")
pytest.importorskip("sse_starlette", reason="the serve extra is missing")
import httpx  # noqa: E402
import torch  # noqa: E402
import uvicorn  # noqa: E402
from fastapi import FastAPI  # noqa: E402

from moe_lightning.inference import InferenceEngine, generate  # noqa: E402
from moe_lightning.models import MoETransformer, MoETransformerConfig  # noqa: E402
from moe_lightning.serving.app import create_app  # noqa: E402
from moe_lightning.serving.keys import ApiKeyRecord  # noqa: E402
from moe_lightning.serving.settings import ServerSettings  # noqa: E402

API_KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
ADMIN_KEY = ApiKeyRecord.of_key(API_KEY, "tester", ["admin"])
# As in the inference tests: a large init_std makes the logits peaked, so greedy choices are not near-ties.
TINY_BYTES = dict(
    vocab_size=256, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, num_experts=4, expert_hidden_dim=32,
    first_k_dense=1, max_seq_len=64, init_std=0.2,
)


def tiny_model(**overrides: Any) -> MoETransformer:
    torch.manual_seed(0)
    return MoETransformer(MoETransformerConfig(**{**TINY_BYTES, **overrides})).eval()


@pytest.fixture(scope="package")
def model() -> MoETransformer:
    return tiny_model()


@pytest.fixture(scope="package")
def engine(model) -> InferenceEngine:
    return InferenceEngine(model)


def settings(**overrides: Any) -> ServerSettings:
    return ServerSettings(**{"api_keys": (ADMIN_KEY,), **overrides})


def alone(model: MoETransformer, prompt: list[int], max_new_tokens: int, **sampling: Any) -> list[int]:
    """What ``prompt`` generates by itself, outside any server."""
    return generate(model, [prompt], max_new_tokens, **sampling)[0]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@asynccontextmanager
async def serving(app: FastAPI, headers: dict[str, str] | None = None) -> AsyncIterator[httpx.AsyncClient]:
    """The app started (its lifespan runs the batcher) behind an in-process httpx client, with the API key."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver",
                                     headers=AUTH if headers is None else headers) as client:
            yield client


@contextmanager
def live_server(app: FastAPI, **config: Any) -> Iterator[str]:
    """``app`` served by uvicorn (with these ``uvicorn.Config`` options) on a free loopback port, in a thread; yields
    its base URL (https with ``ssl_certfile``)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", **config))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"{'https' if 'ssl_certfile' in config else 'http'}://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture(scope="package")
def live_url(engine) -> Iterator[str]:
    """One live server for the loopback tests (OpenAI client, SDK, load test)."""
    with live_server(create_app(engine, settings(max_new_tokens=32, batch_window_ms=2))) as url:
        yield url

"""create_app(): the secured serving app of one :class:`InferenceEngine`.

Routes: ``GET /health`` (open), ``GET /metrics`` (Prometheus text), ``GET /openapi.json``, the native API
(``/v1/generate``, ``/v1/generate/stream``, ``/v1/generate/ws``; see :mod:`native_api`) and the OpenAI-compatible one
(``/v1/completions``, ``/v1/models``; see :mod:`openai_compat`). All but ``/health`` need an API key with a role that
may call them (see :mod:`roles`), within the key's rate limit; every request is counted in the metrics and, with
``settings.audit_log``, written to the audit log. The model runs on one worker thread, fed by the
:class:`MicroBatcher` that the app starts and stops with its lifespan.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse, Response

from moe_lightning.inference import InferenceEngine
from moe_lightning.inference.decoding import Decoder
from moe_lightning.serving import native_api, openai_compat
from moe_lightning.serving.access import AccessControl, require
from moe_lightning.serving.audit import AuditLog
from moe_lightning.serving.auth import Authenticator
from moe_lightning.serving.batching import MicroBatcher
from moe_lightning.serving.body_limit import BodySizeLimitMiddleware
from moe_lightning.serving.errors import documented_errors, install_error_handlers
from moe_lightning.serving.metrics import HitRate, ServerMetrics
from moe_lightning.serving.request_records import RequestObserver, RequestRecordMiddleware
from moe_lightning.serving.roles import ANY_ROLE, METRICS
from moe_lightning.serving.schemas import HealthResponse
from moe_lightning.serving.service import GenerationService
from moe_lightning.serving.settings import ServerSettings
from moe_lightning.serving.tokenizer import tokenizer_for


def create_app(
    engine: InferenceEngine, settings: ServerSettings, *, decoder: Decoder | None = None,
    expert_cache_hit_rate: HitRate | None = None,
) -> FastAPI:
    """The app serving ``engine`` within ``settings``.

    Args:
        engine: the loaded model; text prompts need a byte-level one (vocab_size >= 256).
        settings: limits and API keys.
        decoder: how to run the model (default: eager; e.g. a ``CompiledDecoder`` built for ``engine.model``).
        expert_cache_hit_rate: read for the ``moe_lightning_expert_cache_hit_rate`` gauge (None while unknown).
    """
    if not isinstance(engine, InferenceEngine):
        raise TypeError(f"create_app() needs an InferenceEngine, got {type(engine).__name__}")
    if not isinstance(settings, ServerSettings):
        raise TypeError(f"create_app() needs ServerSettings, got {type(settings).__name__}")
    model = engine.model
    metrics = ServerMetrics(lambda: batcher.queue_depth, expert_cache_hit_rate)
    batcher = MicroBatcher(
        model, settings.max_batch_size, settings.max_queue_size, settings.batch_window_ms / 1000, decoder,
        on_batch=metrics.observe_batch,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        try:
            yield
        finally:
            await batcher.close()

    app = FastAPI(
        title="moe-lightning server", summary="Generation with a Mixture-of-Experts model: native and OpenAI APIs",
        lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None,
    )
    app.state.service = GenerationService(model.config, settings, batcher, tokenizer_for(model.config.vocab_size))
    app.state.access = AccessControl(Authenticator(settings.api_keys, settings.insecure_no_auth))
    app.state.metrics = metrics
    app.state.audit = None if settings.audit_log is None else AuditLog(settings.audit_log, settings.audit_prompts)
    app.state.started_at = int(time.time())
    install_error_handlers(app)
    observers: list[RequestObserver] = [lambda record: metrics.observe_request(record.route, record.status,
                                                                               record.seconds)]
    if app.state.audit is not None:
        observers.append(app.state.audit.record)
    app.state.observers = tuple(observers)  # the gRPC server records its calls through the same ones
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(RequestRecordMiddleware, observers=observers)  # outermost: it records the 413s too
    app.include_router(native_api.router)
    app.include_router(native_api.websocket_router)
    app.include_router(openai_compat.router)

    @app.get("/health", tags=["server"], response_model=HealthResponse,
             responses=documented_errors((503, "not taking requests (starting or shutting down)")))
    async def health() -> JSONResponse:
        """Open to all: whether the model is loaded and taking requests, and how many wait for it."""
        ready = batcher.running
        body = {"status": "ok" if ready else "unavailable", "model_loaded": True, "model": settings.model_name,
                "queue_depth": batcher.queue_depth}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics", tags=["server"], dependencies=[Depends(require(METRICS))], response_class=Response,
             responses={200: {"content": {metrics.content_type: {}}, "description": "Prometheus text"},
                        **documented_errors((401, "missing or invalid API key"),
                                            (403, "the key lacks the metrics role"),
                                            (429, "the key is over its rate limit (see Retry-After)"))})
    async def prometheus_metrics() -> Response:
        """The Prometheus metrics, in the text exposition format."""
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(require(ANY_ROLE))])
    async def openapi() -> dict[str, Any]:
        return app.openapi()

    return app

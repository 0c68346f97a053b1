"""Serving: a secured REST, WebSocket and OpenAI-compatible server of a trained model (the ``serve`` extra:
FastAPI, uvicorn, sse-starlette, prometheus-client), and a small client.

- :func:`moe_lightning.serving.app.create_app` builds the app of an ``InferenceEngine`` within
  :class:`moe_lightning.serving.settings.ServerSettings`; ``moe-lightning serve`` (:mod:`.cli`) runs it.
- :class:`moe_lightning.serving.client.MoELightningClient` calls it (httpx and pydantic only).

The package imports nothing itself, so the client works without the server's dependencies.
"""

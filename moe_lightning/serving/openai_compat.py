"""OpenAI-compatible endpoints: ``POST /v1/completions`` (whole or streamed) and ``GET /v1/models``, so OpenAI's
clients and tools can talk to the server.

Stop strings end a choice and are cut from its text; with a byte tokenizer, a stop string of one token also stops the
model at that token. Each choice also carries its ``token_ids`` (an extension; OpenAI clients ignore it).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import APIRouter, Depends, Request
from sse_starlette import EventSourceResponse, ServerSentEvent

from moe_lightning.serving.access import require
from moe_lightning.serving.disconnect import cancel_if_client_leaves
from moe_lightning.serving.errors import ERROR_RESPONSES, ApiError, documented_errors
from moe_lightning.serving.openai_schemas import (
    UNSUPPORTED_NEUTRAL_VALUES, Completion, CompletionChoice, CompletionRequest, ModelCard, ModelList,
)
from moe_lightning.serving.request_records import note_prompts
from moe_lightning.serving.roles import GENERATION
from moe_lightning.serving.service import GenerationService, GenerationStream

DEFAULT_MAX_TOKENS = 16
_CHUNK_LEAVES_OUT = {"usage": True, "choices": {"__all__": {"token_ids"}}}
"""A streamed chunk is OpenAI's: no usage (until the last chunk, when asked) and no token_ids."""
DEFAULT_TEMPERATURE = 1.0

router = APIRouter(
    dependencies=[Depends(require(GENERATION))],
    responses={**ERROR_RESPONSES, **documented_errors((404, "unknown model"))},
    tags=["openai"],
)


@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    """The one served model."""
    return ModelList(data=[ModelCard(id=request.app.state.service.settings.model_name,
                                     created=request.app.state.started_at)])


@router.post("/v1/completions", response_model=Completion,
             responses={200: {"content": {"text/event-stream": {}}, "description": "a completion, or its chunks"}})
async def create_completion(body: CompletionRequest, request: Request) -> Completion | EventSourceResponse:
    """Complete each prompt, in OpenAI's completions format; ``stream: true`` sends chunks then ``data: [DONE]``."""
    service: GenerationService = request.app.state.service
    note_prompts(request, body.prompt)
    stream = _start(service, body)
    completion_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    if not body.stream:
        outputs = await cancel_if_client_leaves(request, stream.collect())
        choices = [CompletionChoice(index=out.index, text=out.text or "", finish_reason=out.finish_reason,
                                    token_ids=out.tokens) for out in outputs]
        return Completion(id=completion_id, created=created, model=body.model, choices=choices, usage=stream.usage())

    include_usage = body.stream_options is not None and body.stream_options.include_usage

    async def chunks() -> AsyncIterator[ServerSentEvent]:
        try:
            async with aclosing(stream.events()) as events:  # a client that leaves cancels the request
                async for event in events:
                    if event.text or event.finish_reason is not None:
                        choice = CompletionChoice(index=event.index, text=event.text or "",
                                                  finish_reason=event.finish_reason)
                        chunk = Completion(id=completion_id, created=created, model=body.model, choices=[choice])
                        yield ServerSentEvent(chunk.model_dump_json(exclude=_CHUNK_LEAVES_OUT))
            if include_usage:
                usage = stream.usage()
                chunk = Completion(id=completion_id, created=created, model=body.model, choices=[], usage=usage)
                yield ServerSentEvent(chunk.model_dump_json())
        except ApiError as error:
            yield ServerSentEvent(json.dumps(error.body(), ensure_ascii=False))
        yield ServerSentEvent("[DONE]")

    return EventSourceResponse(chunks())


def _start(service: GenerationService, body: CompletionRequest) -> GenerationStream:
    """Check what only this API asks, then queue the request."""
    if body.model != service.settings.model_name:
        raise ApiError(404, f"model={body.model!r} is not served here; this server serves "
                            f"{service.settings.model_name!r}", "model", "model_not_found")
    if body.n not in (None, 1):
        raise ApiError(400, f"n={body.n} is not supported: only one choice per prompt (n=1)", "n", "unsupported")
    for name, neutral in UNSUPPORTED_NEUTRAL_VALUES.items():
        if getattr(body, name) not in neutral:
            raise ApiError(400, f"{name}={getattr(body, name)!r} is not supported (leave it out, or one of "
                                f"{list(neutral)})", name, "unsupported")
    prompts = body.prompts()
    if not prompts:
        raise ApiError(422, "prompt is empty: give a text, texts, token ids or lists of token ids", "prompt",
                       "invalid_value")
    ids = service.encode_prompts(prompts, "prompt")
    stop_strings = body.stop_strings()
    temperature = DEFAULT_TEMPERATURE if body.temperature is None else body.temperature
    sampling = service.sampling(temperature, None, body.top_p, _stop_tokens(service, stop_strings), body.seed, "stop")
    max_tokens = DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
    return service.start(ids, max_tokens, sampling, stop_strings, prompts_field="prompt", max_tokens_field="max_tokens")


def _stop_tokens(service: GenerationService, stop_strings: list[str]) -> list[int]:
    """The stop strings that are one token, as that token (the model then stops there)."""
    if service.tokenizer is None:
        return []
    encoded = [service.tokenizer.encode(stop) for stop in stop_strings]  # valid Unicode: the schema checked it
    return [tokens[0] for tokens in encoded if len(tokens) == 1]

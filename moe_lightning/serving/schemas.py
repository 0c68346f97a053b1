"""Request and response bodies of the native API (``/v1/generate`` and its streams), with their fixed bounds.

The server's own limits (prompt length, tokens to generate, prompts per request) depend on its settings and are
checked when a request arrives; these models hold what is true of every server.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

MAX_SEED = 2**63 - 1

TokenIds = list[StrictInt]
PromptText = Annotated[str, Field(min_length=1)]
PromptIds = Annotated[TokenIds, Field(min_length=1)]
Prompt = Annotated[PromptText | PromptIds, Field(description="text (needs a byte-level model) or token ids")]
FinishReason = Literal["stop", "length"]


class GenerateRequest(BaseModel):
    """Prompts and how to continue them; every prompt gets the same sampling settings."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prompts: list[Prompt] = Field(min_length=1, description="the prompts, each text or a list of token ids")
    max_new_tokens: StrictInt = Field(64, ge=1, description="the most new tokens per prompt")
    temperature: float = Field(0.0, ge=0, le=100, description="0 (or below 1e-5): greedy; else sampling temperature")
    top_k: StrictInt | None = Field(None, ge=1, description="sample only among the k best tokens")
    top_p: float | None = Field(None, ge=1e-6, le=1, description="sample only among the best tokens reaching top_p")
    stop_tokens: TokenIds = Field(
        default_factory=list, max_length=256, description="a prompt ends after generating one of these token ids"
    )
    seed: StrictInt | None = Field(
        None, ge=0, le=MAX_SEED, description="reproducible sampling: the result equals generating these prompts alone"
    )


class GeneratedOutput(BaseModel):
    """One prompt's continuation."""

    index: int = Field(description="the prompt's position in the request")
    tokens: list[int] = Field(description="the new token ids, a stop token included")
    text: str | None = Field(description="the new tokens as text (None when the model has no tokenizer)")
    finish_reason: FinishReason = Field(description="stop: a stop token ended it; length: max_new_tokens did")


class Usage(BaseModel):
    """Token counts of one request."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class GenerateResponse(BaseModel):
    outputs: list[GeneratedOutput]
    usage: Usage


class TokenEvent(BaseModel):
    """A streamed new token of one prompt, with the text it completed (empty inside a multi-byte character)."""

    type: Literal["token"] = "token"
    index: int
    token: int
    text: str | None


class EndEvent(BaseModel):
    """A streamed prompt's end: the text still held back (an unfinished character) and why it ended."""

    type: Literal["end"] = "end"
    index: int
    text: str | None
    finish_reason: FinishReason


class DoneEvent(GenerateResponse):
    """The last message of a streamed request: the whole response."""

    type: Literal["done"] = "done"


class ErrorDetail(BaseModel):
    message: str = Field(description="what was wrong, naming the value")
    type: str = Field(description="invalid_request_error, authentication_error, permission_error, rate_limit_error "
                                  "or server_error")
    param: str | None = Field(description="the request field at fault")
    code: str | None = Field(description="a machine-readable reason, e.g. invalid_value, queue_full, timeout")


class ErrorResponse(BaseModel):
    """Every error answer, in OpenAI's error shape."""

    error: ErrorDetail


class HealthResponse(BaseModel):
    status: Literal["ok", "unavailable"]
    model_loaded: bool
    model: str
    queue_depth: int = Field(description="requests waiting for the model")

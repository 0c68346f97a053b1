"""Request and response bodies of OpenAI's completions API, as far as this server implements it.

Parameters the server does not implement are accepted only at their neutral values (what OpenAI's own clients and
wrappers send by default); anything else is refused with 400 naming the parameter.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from moe_lightning.serving.schemas import MAX_SEED, FinishReason, PromptIds, PromptText, Usage

MAX_STOP_STRINGS = 4
StopString = Annotated[str, Field(min_length=1)]

UNSUPPORTED_NEUTRAL_VALUES: dict[str, tuple[Any, ...]] = {
    "best_of": (None, 1), "echo": (None, False), "frequency_penalty": (None, 0), "presence_penalty": (None, 0),
    "logit_bias": (None, {}), "logprobs": (None,), "suffix": (None, ""),
}
"""The parameters accepted only at one of these values."""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = Field(False, description="send a last chunk with the usage and no choices")


class CompletionRequest(BaseModel):
    """``POST /v1/completions``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str = Field(description="the served model's id (see /v1/models)")
    prompt: PromptText | list[PromptText] | PromptIds | list[PromptIds] = Field(
        description="a text, texts, token ids, or lists of token ids; one choice per prompt"
    )
    max_tokens: StrictInt | None = Field(16, ge=1, description="the most new tokens per prompt (default 16)")
    temperature: float | None = Field(1.0, ge=0, le=2, description="0 (or below 1e-5): greedy")
    top_p: float | None = Field(1.0, ge=1e-6, le=1, description="nucleus sampling")
    n: StrictInt | None = Field(1, description="choices per prompt: only 1")
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = Field(
        None, description=f"up to {MAX_STOP_STRINGS} strings ending a choice (not included in its text)"
    )
    stream: bool | None = Field(False, description="stream Server-Sent Events, ending with data: [DONE]")
    stream_options: StreamOptions | None = None
    seed: StrictInt | None = Field(None, ge=0, le=MAX_SEED, description="reproducible sampling")
    user: str | None = Field(None, description="ignored")
    best_of: StrictInt | None = None
    echo: bool | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, int] | None = None
    logprobs: StrictInt | None = None
    suffix: str | None = None

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list, one per choice."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if self.prompt and all(isinstance(token, int) for token in self.prompt):
            return [self.prompt]  # type: ignore[list-item]
        return list(self.prompt)  # type: ignore[arg-type]

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: FinishReason | None
    token_ids: list[int] | None = Field(None, description="(extension) the new token ids of a whole response")


class Completion(BaseModel):
    """A completion, or one chunk of a streamed one (``finish_reason`` None until a choice ends)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "moe-lightning"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]

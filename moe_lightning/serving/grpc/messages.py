"""Between the protobuf messages of ``generation.proto`` and the service: a request becomes the native API's
:class:`GenerateRequest` (so it is checked by the same bounds as a REST body), the service's outputs and stream events
become response messages."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from moe_lightning.serving.errors import ApiError, validation_error
from moe_lightning.serving.grpc import generation_pb2 as pb
from moe_lightning.serving.schemas import FinishReason, GenerateRequest
from moe_lightning.serving.service import GenerationStream, PromptOutput, StreamEvent

FINISH_REASONS: dict[FinishReason, int] = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH}
_OPTIONAL_FIELDS = ("max_new_tokens", "temperature", "top_k", "top_p", "seed")
"""Proto3 ``optional`` fields: unset ones take :class:`GenerateRequest`'s defaults."""


def generate_request(request: pb.GenerateRequest) -> GenerateRequest:
    """The native API's request for ``request``; raises ApiError 422 naming each field out of its bounds."""
    fields: dict[str, Any] = {
        "prompts": [_prompt(prompt, index) for index, prompt in enumerate(request.prompts)],
        "stop_tokens": list(request.stop_tokens),
    }
    fields.update({name: getattr(request, name) for name in _OPTIONAL_FIELDS if request.HasField(name)})
    try:
        return GenerateRequest.model_validate(fields)
    except ValidationError as error:
        raise validation_error(error.errors()) from error


def generate_response(stream: GenerationStream, outputs: list[PromptOutput]) -> pb.GenerateResponse:
    usage = stream.usage()
    return pb.GenerateResponse(
        outputs=[pb.GeneratedOutput(index=out.index, tokens=out.tokens, text=out.text,
                                    finish_reason=FINISH_REASONS[out.finish_reason]) for out in outputs],
        usage=pb.Usage(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                       total_tokens=usage.total_tokens),
    )


def stream_message(event: StreamEvent) -> pb.GenerateStreamMessage:
    """A new token, or a prompt's end."""
    if event.finish_reason is None:
        return pb.GenerateStreamMessage(token=pb.TokenEvent(index=event.index, token=event.token, text=event.text))
    return pb.GenerateStreamMessage(end=pb.EndEvent(index=event.index, text=event.text,
                                                    finish_reason=FINISH_REASONS[event.finish_reason]))


def done_message(stream: GenerationStream) -> pb.GenerateStreamMessage:
    """The last message of a stream: the whole response."""
    return pb.GenerateStreamMessage(done=generate_response(stream, stream.outputs()))


def _prompt(prompt: pb.Prompt, index: int) -> str | list[int]:
    kind = prompt.WhichOneof("content")
    if kind is None:
        raise ApiError(422, f"prompts[{index}] sets neither text nor token_ids", "prompts", "invalid_value")
    return prompt.text if kind == "text" else list(prompt.token_ids.ids)

"""MoELightningClient: a small synchronous client of the server's native API (httpx)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Annotated, Any

import httpx
from pydantic import Field, TypeAdapter

from moe_lightning.serving.schemas import DoneEvent, EndEvent, GenerateRequest, GenerateResponse, TokenEvent

StreamMessage = TokenEvent | EndEvent | DoneEvent
_STREAM_MESSAGE: TypeAdapter[StreamMessage] = TypeAdapter(Annotated[StreamMessage, Field(discriminator="type")])
Prompts = str | Sequence[int] | Sequence[str | Sequence[int]]


class MoELightningError(Exception):
    """An error answer of the server: its status, message, and the request field at fault."""

    def __init__(self, status_code: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(f"{status_code}: {message}")
        self.status_code, self.message, self.param, self.code = status_code, message, param, code


class MoELightningClient:
    """Talks to a moe-lightning server.

    Args:
        base_url: e.g. ``http://127.0.0.1:8000``.
        api_key: one of the server's API keys (None for a server run with ``--insecure-no-auth``).
        timeout: seconds to wait for the server (a whole non-streamed generation included).
    """

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 300.0) -> None:
        headers = {} if api_key is None else {"Authorization": f"Bearer {api_key}"}
        self._http = httpx.Client(base_url=base_url, headers=headers, timeout=timeout)

    def health(self) -> dict[str, Any]:
        """The server's ``/health``: status (``ok``, or ``unavailable`` while starting or stopping), model, queue
        depth (no key needed)."""
        response = self._http.get("/health")
        return response.json() if response.status_code == 503 else self._checked(response).json()

    def generate(self, prompts: Prompts, max_new_tokens: int = 64, **sampling: Any) -> GenerateResponse:
        """Continue ``prompts`` (one text, one token-id list, or a list of either); ``sampling``: ``temperature``,
        ``top_k``, ``top_p``, ``stop_tokens``, ``seed`` (see :class:`GenerateRequest`)."""
        body = _request_body(prompts, max_new_tokens, sampling)
        return GenerateResponse.model_validate_json(self._checked(self._http.post("/v1/generate", json=body)).content)

    def stream(self, prompts: Prompts, max_new_tokens: int = 64, **sampling: Any) -> Iterator[StreamMessage]:
        """:meth:`generate`, message by message as the server decodes: a :class:`TokenEvent` per new token, an
        :class:`EndEvent` per prompt, then the :class:`DoneEvent` holding the whole response."""
        body = _request_body(prompts, max_new_tokens, sampling)
        with self._http.stream("POST", "/v1/generate/stream", json=body) as response:
            if response.is_error:
                response.read()
                self._checked(response)
            for data in _sse_data(response.iter_lines()):
                message = json.loads(data)
                if message.get("type") == "error":
                    raise _error(int(message.get("status", 500)), message)
                yield _STREAM_MESSAGE.validate_python(message)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> MoELightningClient:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    @staticmethod
    def _checked(response: httpx.Response) -> httpx.Response:
        if response.is_error:
            try:
                body = response.json()
            except ValueError:
                body = {"error": {"message": response.text}}
            raise _error(response.status_code, body)
        return response


def _request_body(prompts: Prompts, max_new_tokens: int, sampling: dict[str, Any]) -> dict[str, Any]:
    if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)):
        prompts = [prompts]  # type: ignore[list-item]
    return GenerateRequest(prompts=list(prompts), max_new_tokens=max_new_tokens, **sampling).model_dump(mode="json")


def _error(status_code: int, body: dict[str, Any]) -> MoELightningError:
    error = body.get("error") if isinstance(body.get("error"), dict) else {"message": str(body)}
    return MoELightningError(status_code, str(error.get("message")), error.get("param"), error.get("code"))


def _sse_data(lines: Iterator[str]) -> Iterator[str]:
    """The data of each Server-Sent Event (comments such as keep-alive pings skipped)."""
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
            data = []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    if data:
        yield "\n".join(data)

"""ServerSettings: the serving limits, the API keys and the audit log, checked once when the server starts."""

from __future__ import annotations

from dataclasses import dataclass

from moe_lightning.serving.keys import API_KEYS_ENV, ApiKeyRecord


@dataclass(frozen=True)
class ServerSettings:
    """Limits and credentials of one server; every request is checked against them before it reaches the model."""

    api_keys: tuple[ApiKeyRecord, ...] = ()
    """The keys (hashed, with roles and rate limits) accepted as bearer tokens; see :mod:`moe_lightning.serving.keys`
    and, for what each role may call, :mod:`moe_lightning.serving.roles`."""
    insecure_no_auth: bool = False
    """Serve without authentication. Required explicitly when ``api_keys`` is empty."""
    model_name: str = "moe-lightning"
    """The model id of the OpenAI-compatible API (``/v1/models`` and the ``model`` field of completions)."""
    max_prompt_tokens: int = 2048
    """The most tokens in one prompt (the model's context is a second bound); longer prompts get 413."""
    max_new_tokens: int = 512
    """The most tokens one request may ask to generate per prompt."""
    max_prompts_per_request: int = 16
    """The most prompts in one request; more get 413."""
    max_batch_size: int = 32
    """The most prompts decoded together in one model call (concurrent requests are batched up to it)."""
    max_queue_size: int = 128
    """The most requests waiting for the model; a request beyond it gets 429 with Retry-After."""
    batch_window_ms: float = 5.0
    """How long the first waiting request waits for others to batch with, when the model is idle."""
    request_timeout_s: float = 300.0
    """The most time from a request's arrival to its last token; past it the request gets 503."""
    max_body_bytes: int = 1_048_576
    """The largest request body; a larger one gets 413 before it is parsed."""
    audit_log: str | None = None
    """A file to append one JSON line per request to (who, what route, when, status, latency); None: no audit log."""
    audit_prompts: bool = False
    """Write each request's prompts into the audit log too (they may be confidential: off unless asked for)."""

    def __post_init__(self) -> None:
        if not self.api_keys and not self.insecure_no_auth:
            raise ValueError(
                f"no API key configured: set {API_KEYS_ENV}=key1,key2 or pass --api-key-file FILE (made by "
                "`moe-lightning serve add-key`); "
                "to serve without authentication pass --insecure-no-auth (insecure_no_auth=True) explicitly"
            )
        if self.api_keys and self.insecure_no_auth:
            raise ValueError(
                f"insecure_no_auth=True contradicts the {len(self.api_keys)} configured API key(s): choose one"
            )
        not_records = [type(key).__name__ for key in self.api_keys if not isinstance(key, ApiKeyRecord)]
        if not_records:
            raise TypeError(
                f"api_keys must be ApiKeyRecords (ApiKeyRecord.of_key hashes a plain key), got {not_records}"
            )
        names = [key.name for key in self.api_keys]
        if len(set(names)) < len(names):
            raise ValueError(f"each API key needs its own name, got {names}")
        if self.audit_prompts and self.audit_log is None:
            raise ValueError("audit_prompts=True needs an audit_log to write the prompts to")
        if not self.model_name:
            raise ValueError("model_name must not be empty")
        for name in ("max_prompt_tokens", "max_new_tokens", "max_prompts_per_request", "max_batch_size",
                     "max_queue_size", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {name}={getattr(self, name)}")
        if self.batch_window_ms < 0:
            raise ValueError(f"batch_window_ms must be >= 0, got batch_window_ms={self.batch_window_ms}")
        if not self.request_timeout_s > 0:
            raise ValueError(f"request_timeout_s must be > 0, got request_timeout_s={self.request_timeout_s}")
        if self.max_prompts_per_request > self.max_batch_size:
            raise ValueError(
                f"max_prompts_per_request={self.max_prompts_per_request} > max_batch_size={self.max_batch_size}: "
                "a request is decoded in one batch, so its prompts must fit one"
            )


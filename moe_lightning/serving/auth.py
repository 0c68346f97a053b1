"""Bearer-token authentication: :class:`ApiKeyAuth` checks keys in constant time; :func:`require_api_key` is the
FastAPI dependency of every protected route (all but ``/health``)."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from moe_lightning.serving.errors import ApiError
from moe_lightning.serving.settings import ServerSettings

bearer_scheme = HTTPBearer(auto_error=False, description="an API key of the server, as `Authorization: Bearer KEY`")


class ApiKeyAuth:
    """The server's API keys; with none (``insecure_no_auth``) every caller is let in."""

    def __init__(self, settings: ServerSettings) -> None:
        self._keys = [key.encode() for key in settings.api_keys]
        self.required = bool(self._keys)

    def accepts(self, key: str | None) -> bool:
        """Whether ``key`` is one of the keys. Compares against every key in constant time, so timing reveals
        neither which key nor how much of one matched."""
        if not self.required:
            return True
        given = (key or "").encode("utf-8", errors="surrogateescape")
        matched = False
        for known in self._keys:
            matched |= hmac.compare_digest(known, given)
        return matched

    def check(self, key: str | None) -> None:
        """Raise 401 (with ``WWW-Authenticate: Bearer``) unless ``key`` is accepted."""
        if not self.accepts(key):
            reason = "missing API key" if not key else "invalid API key"
            raise ApiError(401, f"{reason}: send 'Authorization: Bearer <key>'", code="invalid_api_key",
                           headers={"WWW-Authenticate": 'Bearer realm="moe-lightning"'})


async def require_api_key(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> None:
    """The dependency guarding a route with the app's :class:`ApiKeyAuth` (``app.state.auth``)."""
    auth: ApiKeyAuth = request.app.state.auth
    auth.check(None if credentials is None else credentials.credentials)
